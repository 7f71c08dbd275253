"""Fault tests: identityd over real HTTP on loopback while one dependency is down, slow
or restarting, and the clock to the second when it comes back.

Every answer while in doubt must be a deny (403) or a 503 with UPPER_SNAKE reason
codes: never a 500, never an allow the healthy parts could not vouch for. After the
dependency is back, a legitimate request is polled every 20 ms and its first 200
must come within :data:`RECOVERY_SECONDS`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from identityd.app import Edges, build_edges, create_app
from identityd.callback.decision_log import DecisionLog
from identityd.callback.http import PIPELINE_KEY
from identityd.callback.pipeline import Pipeline
from identityd.devca.workload import DevCluster
from identityd.inventory.watch import WatchInventory, WatchSettings
from identityd.kubeapi import KubeConnection
from identityd.metrics import Metrics
from identityd.settings import ClusterSettings, Settings
from tests.conftest import Pods, Service, make_settings
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import write_kubeconfig

# The bound: the first allow within 1 s of the dependency coming back.
RECOVERY_SECONDS = 1.0
POLL_SECONDS = 0.02
# How long a recovery poll goes on before giving up (so a miss reports its time).
GIVE_UP_SECONDS = 4.0

ALLOW = (200, "")  # an allow, as (status, code) in the sets the helpers take

_CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Answer:
    status: int
    codes: tuple[str, ...]  # the reason codes of a deny or 503; () for an allow

    @property
    def code(self) -> str:
        return ", ".join(self.codes)


async def ask(svc: Service, body: dict[str, Any], kind: str = "instance") -> Answer:
    """One callback; fails the test on anything but an allow or a well-formed refusal."""
    async with svc.http.post(f"{svc.url}/{kind}", json=body) as resp:
        status = resp.status
        document = await resp.json()
    if status == 200:
        assert document["attributes"]["instanceId"] == body["attributes"]["instanceId"]
        return Answer(200, ())
    assert status in (403, 503), (status, document)  # in doubt: a deny or a 503, never 500
    assert document["code"] == status, document
    codes = tuple(code.strip() for code in document["message"].split(","))
    assert codes and all(_CODE.match(code) for code in codes), document
    assert "INTERNAL_ERROR" not in codes, document  # the catch-all: a bug, not a refusal
    return Answer(status, codes)


async def ready(svc: Service) -> int:
    status, _ = await svc.get("/readyz")
    return status


async def answers_during(
    svc: Service,
    body: dict[str, Any],
    seconds: float,
    *,
    expect: Collection[tuple[int, str]],
) -> list[Answer]:
    """Ask every POLL_SECONDS for ``seconds``; every answer must be one of ``expect``
    (status, code; :data:`ALLOW` for an allow). Returns them (at least one)."""
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds
    while True:
        answer = await ask(svc, body)
        assert (answer.status, answer.code) in expect, answer
        answers.append(answer)
        if time.monotonic() >= deadline:
            return answers
        await asyncio.sleep(POLL_SECONDS)


async def time_to_allow(
    svc: Service,
    body: dict[str, Any],
    *,
    since: float,
    refusals: Collection[tuple[int, str]] | None = None,
) -> float:
    """Seconds from ``since`` (time.monotonic() when the dependency came back) to the
    first 200 for ``body``, polling every POLL_SECONDS. Each earlier answer must be a
    well-formed refusal (one of ``refusals`` when given). Gives up after GIVE_UP_SECONDS
    with +inf, so a miss reports itself through the caller's assert."""
    while time.monotonic() - since < GIVE_UP_SECONDS:
        answer = await ask(svc, body)
        if answer.status == 200:
            return time.monotonic() - since
        if refusals is not None:
            assert (answer.status, answer.code) in refusals, answer
        await asyncio.sleep(POLL_SECONDS)
    return float("inf")


async def eventually_answers(
    svc: Service,
    body: dict[str, Any],
    want: Collection[tuple[int, str]],
    *,
    within: float = 3.0,
) -> float:
    """Seconds until ``body`` is answered one of ``want`` (status, code); every answer
    on the way is checked by :func:`ask`."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        answer = await ask(svc, body)
        if (answer.status, answer.code) in want:
            return time.monotonic() - started
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"not answered {want} within {within}s; last {answer}")


async def wait_ready(svc: Service, *, within: float = 5.0) -> None:
    started = time.monotonic()
    while await ready(svc) != 200:
        if time.monotonic() - started > within:
            raise AssertionError(f"/readyz not 200 within {within}s")
        await asyncio.sleep(POLL_SECONDS)


@asynccontextmanager
async def serving(
    settings: Settings,
    *,
    edges: Edges | None = None,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Service]:
    """identityd as ``start_service`` builds it (build_edges, create_app, loopback HTTP);
    with ``clock``, the pipeline's token clock is that one instead of time.time."""
    metrics = Metrics()
    edges = edges or await build_edges(settings, metrics)
    app = create_app(settings, edges, metrics=metrics, decision_log=DecisionLog())
    if clock is not None:
        app[PIPELINE_KEY] = Pipeline(
            identity=settings.identity,
            verifier=edges.verifier,
            inventory=edges.inventory,
            engine=edges.engine,
            clock=clock,
        )
    server = TestServer(app, host="127.0.0.1")
    http = aiohttp.ClientSession()
    try:
        await server.start_server()
        svc = Service(f"http://127.0.0.1:{server.port}", http, settings, edges, metrics)
        yield svc
        # No crash: the process still answers its liveness probe after the fault.
        assert (await svc.get("/healthz"))[0] == 200
    finally:
        await http.close()
        await server.close()
        await edges.aclose()


# --- the API server ----------------------------------------------------------------------


@pytest.fixture
async def api(pods: Pods) -> AsyncIterator[KubeAPIServer]:
    """The API-server double holding the running pods of the dev cluster."""
    async with KubeAPIServer() as server:
        for pod in (pods.api, pods.other, pods.billing):
            server.add_pod(
                pod.namespace,
                pod.name,
                uid=pod.uid,
                service_account=pod.service_account,
                ip=pod.ip,
                node=pod.node,
            )
        yield server


def watch_settings(
    cluster: DevCluster, tmp_path: Path, api: KubeAPIServer, *, staleness_seconds: float
) -> Settings:
    """No --pods: the inventory watches ``api`` through a kubeconfig, never resyncing
    (a resync would repair what the test wants the watch itself to repair)."""
    cluster_settings = ClusterSettings(
        kubeconfig=write_kubeconfig(tmp_path / "kubeconfig", api),
        staleness_seconds=staleness_seconds,
        resync_seconds=0,
    )
    return replace(make_settings(cluster, tmp_path), pods=None, cluster=cluster_settings)


async def edges_with_watch(settings: Settings, watch: WatchSettings) -> Edges:
    """build_edges, with the pod watch built from ``watch`` rather than ClusterSettings:
    for bounds the CLI does not expose (reconnect backoff, read-through timeout)."""
    edges = await build_edges(settings, start=False)
    await edges.inventory.aclose()  # never opened: start=False
    cluster = settings.cluster
    inventory = WatchInventory(
        KubeConnection(kubeconfig=cluster.kubeconfig, context=cluster.context),
        replace(
            watch,
            staleness_seconds=cluster.staleness_seconds,
            resync_seconds=cluster.resync_seconds,
        ),
    )
    edges.inventory = inventory
    await inventory.start()
    return edges
