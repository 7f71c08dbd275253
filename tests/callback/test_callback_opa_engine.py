"""The callback with --engine opa against the OPA REST double: same answers as the
embedded engine, 503 while OPA is slow, gone or restarted empty, then recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from identityd.devca.workload import DevCluster
from tests.conftest import Pods, Service, make_settings, start_service
from tests.doubles.opa_server import OPADouble


@pytest.fixture
async def opa() -> AsyncIterator[OPADouble]:
    async with OPADouble() as double:
        yield double


@pytest.fixture
async def opa_service(
    opa: OPADouble, cluster: DevCluster, pods: Pods, tmp_path: Path
) -> AsyncIterator[Service]:
    settings = replace(
        make_settings(cluster, tmp_path),
        engine="opa",
        opa_url=opa.url,
        decision_timeout_seconds=0.5,
    )
    server, svc = await start_service(settings)
    try:
        yield svc
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()


async def test_allow_and_deny_through_opa(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    assert any(pid.startswith("identityd/") for pid in opa.policies)
    status, answer = await opa_service.post("instance", cluster.confirmation(pods.api))
    assert status == 200, answer
    status, answer = await opa_service.post(
        "instance", cluster.confirmation(pods.api, san_ip=[pods.other.ip])
    )
    assert (status, answer["message"]) == (403, "SAN_IP_NOT_ALLOWED")
    assert len(opa.data_requests()) == 2


async def test_slow_opa_is_503_then_recovers(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    opa.set_delay(1.0)
    status, answer = await opa_service.post("instance", cluster.confirmation(pods.api))
    assert (status, answer["message"]) == (503, "POLICY_TIMEOUT")
    opa.set_delay(0)
    await asyncio.sleep(1.0)  # the delayed call drains
    status, _ = await opa_service.post("instance", cluster.confirmation(pods.api))
    assert status == 200


async def test_opa_restarted_empty_is_never_an_allow_and_recovers(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    await opa.restart_empty()
    status, answer = await opa_service.post("instance", cluster.confirmation(pods.api))
    assert status == 503, answer
    for _ in range(100):
        status, _ = await opa_service.post("instance", cluster.confirmation(pods.api))
        if status == 200:
            break
        assert status == 503
        await asyncio.sleep(0.05)
    assert status == 200
    assert (await opa_service.get("/readyz"))[0] == 200


async def test_opa_down_is_503_and_not_ready(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    await opa.refuse()
    status, answer = await opa_service.post("instance", cluster.confirmation(pods.api))
    assert (status, answer["message"]) == (503, "POLICY_UNAVAILABLE")
    await opa.accept()
    status, _ = await opa_service.post("instance", cluster.confirmation(pods.api))
    assert status == 200
