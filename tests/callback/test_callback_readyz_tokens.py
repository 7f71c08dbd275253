"""/readyz reports the token keys: 503 with ``checks.tokens`` false while no key set is
held (a JWKS URL down at start), 200 once the prefetch has one, with no callback asked.

identityd as start_service builds it (build_edges, create_app, loopback HTTP); the keys
come from the JWKS file DevCluster writes or from the JWKS double over loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from identityd.app import Edges, build_edges
from identityd.devca.workload import DevCluster
from identityd.settings import Settings
from tests.conftest import Pods, Service, make_settings, start_service
from tests.doubles.jwks_server import JWKSDouble
from tests.doubles.waiting import eventually

# One cold retry (0.5 s) and a fetch, with room for a loaded machine.
RECOVERY_SECONDS = 1.0
ALL_READY = {"inventory": True, "policy": True, "tokens": True}


@pytest.fixture
async def jwks(cluster: DevCluster) -> AsyncIterator[JWKSDouble]:
    async with JWKSDouble(cluster.issuer.jwks()) as double:
        yield double


def url_settings(cluster: DevCluster, tmp_path: Path, jwks: JWKSDouble) -> Settings:
    settings = make_settings(cluster, tmp_path)
    return replace(
        settings, tokens=replace(settings.tokens, jwks=jwks.url, fetch_timeout_seconds=0.3)
    )


async def readyz(svc: Service) -> tuple[int, dict[str, Any]]:
    status, text = await svc.get("/readyz")
    document: dict[str, Any] = json.loads(text)
    return status, document


@asynccontextmanager
async def running(settings: Settings, edges: Edges | None = None) -> AsyncIterator[Service]:
    server, svc = await start_service(settings, edges)
    try:
        yield svc
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()


async def ready_within(svc: Service, seconds: float) -> dict[str, Any]:
    """The /readyz document once it is 200; fails after ``seconds``."""
    answers: list[tuple[int, dict[str, Any]]] = []

    async def check() -> bool:
        answers.append(await readyz(svc))
        return answers[-1][0] == 200

    async with asyncio.timeout(seconds):
        while not await check():  # noqa: ASYNC110 - polls the server over HTTP
            await asyncio.sleep(0.02)
    return answers[-1][1]


async def test_keys_from_the_file_make_readyz_200(cluster: DevCluster, tmp_path: Path) -> None:
    async with running(make_settings(cluster, tmp_path)) as svc:
        document = await ready_within(svc, RECOVERY_SECONDS)
        assert document == {"status": "ready", "checks": ALL_READY}


async def test_jwks_url_down_at_start_is_503_then_200_within_a_second_of_recovery(
    jwks: JWKSDouble, cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    await jwks.refuse()
    async with running(url_settings(cluster, tmp_path, jwks)) as svc:
        not_ready = {
            "status": "not ready",
            "checks": {"inventory": True, "policy": True, "tokens": False},
        }
        assert await readyz(svc) == (503, not_ready)
        status, answer = await svc.post("instance", cluster.confirmation(pods.api))
        assert (status, answer["message"]) == (503, "TOKEN_KEYS_UNAVAILABLE")
        assert await readyz(svc) == (503, not_ready)

        await jwks.accept()
        # No callback asked for the keys: the prefetch's own retry finds them.
        document = await ready_within(svc, RECOVERY_SECONDS)
        assert document == {"status": "ready", "checks": ALL_READY}
        assert jwks.fetches == 1
        assert (await svc.post("instance", cluster.confirmation(pods.api)))[0] == 200


async def test_keys_cached_keep_readyz_200_while_the_url_is_down(
    jwks: JWKSDouble, cluster: DevCluster, pods: Pods, tmp_path: Path
) -> None:
    async with running(url_settings(cluster, tmp_path, jwks)) as svc:
        await ready_within(svc, RECOVERY_SECONDS)
        await jwks.refuse()
        # Another signing key: its kid sends the verifier to the endpoint, which is down.
        stranger = cluster.confirmation(pods.api, token=DevCluster().token(pods.api))
        status, answer = await svc.post("instance", stranger)
        assert (status, answer["message"]) == (403, "TOKEN_UNKNOWN_KID")
        assert await readyz(svc) == (200, {"status": "ready", "checks": ALL_READY})
        assert (await svc.post("instance", cluster.confirmation(pods.api)))[0] == 200


async def test_edges_built_without_start_fetch_their_keys_once_served(
    jwks: JWKSDouble, cluster: DevCluster, tmp_path: Path
) -> None:
    settings = url_settings(cluster, tmp_path, jwks)
    edges = await build_edges(settings, start=False)
    assert not edges.verifier.ready and jwks.fetches == 0
    async with running(settings, edges) as svc:
        document = await ready_within(svc, RECOVERY_SECONDS)
        assert document["checks"] == ALL_READY
        assert jwks.fetches == 1


async def test_started_edges_fetch_their_keys_without_an_app(
    jwks: JWKSDouble, cluster: DevCluster, tmp_path: Path
) -> None:
    edges = await build_edges(url_settings(cluster, tmp_path, jwks))
    try:
        await eventually(lambda: edges.verifier.ready, within=RECOVERY_SECONDS)
        assert jwks.fetches == 1
    finally:
        await edges.aclose()
