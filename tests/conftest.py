"""Shared fixtures: a dev cluster (real keys, real tokens, real CSRs) and identityd
served over real HTTP on loopback with the embedded engine and default policies."""

from __future__ import annotations

# isort: off
import identityd  # noqa: F401 - first: loads regopy before aiohttp (see identityd/__init__)
# isort: on

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from identityd.app import Edges, build_edges, create_app
from identityd.callback.decision_log import DecisionLog
from identityd.devca.workload import DevCluster, DevPod
from identityd.metrics import Metrics
from identityd.settings import Settings

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"


@dataclass
class Pods:
    api: DevPod
    other: DevPod
    billing: DevPod
    terminating: DevPod
    pending: DevPod
    gone: DevPod  # never in the inventory


@pytest.fixture
def cluster() -> DevCluster:
    return DevCluster()


@pytest.fixture
def pods(cluster: DevCluster) -> Pods:
    return Pods(
        api=cluster.add_pod("sports-web", "api-1", "api", "10.1.2.3"),
        other=cluster.add_pod("sports-web", "api-2", "api", "10.1.2.4"),
        billing=cluster.add_pod("payments", "billing-0", "billing", "10.2.0.7", node="node-2"),
        terminating=cluster.add_pod("sports-web", "api-3", "api", "10.1.2.5", terminating=True),
        pending=cluster.add_pod("sports-web", "api-4", "api", "10.1.2.6", phase="Pending"),
        gone=DevPod("sports-web", "api-gone", "api", "10.1.2.9"),
    )


def make_settings(cluster: DevCluster, tmp_path: Path, **overrides: Any) -> Settings:
    return replace(cluster.settings(tmp_path, policies=POLICIES), **overrides)


@dataclass
class Service:
    url: str
    http: aiohttp.ClientSession
    settings: Settings
    edges: Edges
    metrics: Metrics

    async def post(self, kind: str, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict | list):
            kwargs.setdefault("headers", {"Content-Type": "application/json"})
            async with self.http.post(f"{self.url}/{kind}", data=body, **kwargs) as resp:
                return resp.status, await resp.json()
        async with self.http.post(f"{self.url}/{kind}", json=body, **kwargs) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(f"{self.url}{path}") as resp:
            return resp.status, await resp.text()


async def start_service(
    settings: Settings, edges: Edges | None = None
) -> tuple[TestServer, Service]:
    metrics = Metrics()
    edges = edges or await build_edges(settings, metrics)
    app = create_app(settings, edges, metrics=metrics, decision_log=DecisionLog())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    http = aiohttp.ClientSession()
    url = f"http://127.0.0.1:{server.port}"
    return server, Service(url=url, http=http, settings=settings, edges=edges, metrics=metrics)


@pytest.fixture
async def service(cluster: DevCluster, pods: Pods, tmp_path: Path) -> AsyncIterator[Service]:
    server, svc = await start_service(make_settings(cluster, tmp_path))
    try:
        yield svc
    finally:
        await svc.http.close()
        await server.close()
        await svc.edges.aclose()
