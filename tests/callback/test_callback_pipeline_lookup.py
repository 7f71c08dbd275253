"""The pipeline's pod lookup against a live watch (the API-server double), over HTTP:
a pod recreated under its name ahead of the watch is read through for its new
token, while the old pod's token is denied."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from identityd.app import build_edges
from identityd.devca.workload import DevCluster, DevPod
from identityd.inventory.watch import WatchInventory
from tests.conftest import Service, make_settings, start_service
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import fast_settings, watching
from tests.doubles.waiting import eventually

NAMESPACE, NAME = "sports-web", "web-0"
POD_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods/{NAME}"


@dataclass
class Stack:
    service: Service
    api: KubeAPIServer
    inventory: WatchInventory
    cluster: DevCluster
    old: DevPod  # in the double and in the watch's cache

    def pod_gets(self) -> int:
        return sum(1 for r in self.api.requests if r.method == "GET" and r.path == POD_PATH)

    def recreate(self, ip: str) -> DevPod:
        """Delete the pod and create it again under its name: a new uid (and IP)."""
        new = DevPod(NAMESPACE, NAME, "api", ip)
        self.api.delete_pod(NAMESPACE, NAME)
        add_pod(self.api, new)
        return new

    def caught_up(self) -> bool:
        return self.inventory.resource_versions[None] == str(self.api.store.rv)

    async def post(self, pod: DevPod) -> tuple[int, dict[str, Any]]:
        return await self.service.post("instance", self.cluster.confirmation(pod))


def add_pod(api: KubeAPIServer, pod: DevPod) -> None:
    """The dev cluster's pod (whose tokens it signs) in the API server."""
    api.add_pod(pod.namespace, pod.name, uid=pod.uid, ip=pod.ip, node=pod.node,
                service_account=pod.service_account)


def codes(answer: dict[str, Any]) -> set[str]:
    return set(str(answer["message"]).split(", "))


@pytest.fixture
async def stack(cluster: DevCluster, tmp_path: Path) -> AsyncIterator[Stack]:
    old = DevPod(NAMESPACE, NAME, "api", "10.1.2.3")
    settings = make_settings(cluster, tmp_path)  # tokens from the dev cluster's keys
    # A window long enough that a replayed token's read-throughs can be counted.
    watch_settings = fast_settings(read_through_cache_seconds=30.0)
    async with KubeAPIServer() as api:
        api.add_pod("sports-web", "api-1", service_account="api", ip="10.1.2.9")
        add_pod(api, old)
        async with watching(api, watch_settings) as inventory:
            await api.wait_for_watches(1)
            edges = replace(await build_edges(settings), inventory=inventory)
            server, service = await start_service(settings, edges)
            try:
                yield Stack(service, api, inventory, cluster, old)
            finally:
                await service.http.close()
                await server.close()
                await edges.aclose()


async def test_pod_in_the_watch_is_served_from_the_cache(stack: Stack) -> None:
    status, answer = await stack.post(stack.old)
    assert status == 200, answer
    assert stack.pod_gets() == 0


async def test_recreated_pod_ahead_of_the_watch_is_read_through_for_the_new_token(
    stack: Stack,
) -> None:
    with stack.api.muted():  # the watch delivers neither the DELETED nor the ADDED
        new = stack.recreate("10.1.2.30")
    assert (await stack.inventory.get(NAMESPACE, NAME)).uid == stack.old.uid  # type: ignore[union-attr]

    status, answer = await stack.post(new)
    assert status == 200, answer
    assert answer["attributes"]["instanceId"] == new.uid
    assert stack.pod_gets() == 1
    # The new pod entered the cache in place of the old one.
    assert (await stack.inventory.get_by_uid(new.uid)) is not None
    assert (await stack.inventory.get_by_uid(stack.old.uid)) is None

    # The old pod's token meets the new uid under its name; replaying it costs no
    # GET per request (the read-through answer is remembered for the window).
    for _ in range(3):
        status, answer = await stack.post(stack.old)
        assert status == 403, answer
        assert codes(answer) & {"POD_UID_MISMATCH", "POD_NOT_FOUND"}, answer
    assert stack.pod_gets() == 1


async def test_old_token_is_denied_once_the_watch_delivers_the_recreation(
    stack: Stack,
) -> None:
    new = stack.recreate("10.1.2.31")
    await eventually(stack.caught_up)
    status, answer = await stack.post(stack.old)
    assert status == 403, answer
    assert codes(answer) & {"POD_UID_MISMATCH", "POD_NOT_FOUND"}, answer
    status, answer = await stack.post(new)
    assert status == 200, answer
    assert stack.pod_gets() == 1  # only the old token's uid mismatch read through


async def test_a_read_through_that_finds_the_name_empty_drops_the_old_uid(
    stack: Stack,
) -> None:
    with stack.api.muted():  # recreated, then deleted again: the watch saw neither
        new = stack.recreate("10.1.2.32")
        stack.api.delete_pod(NAMESPACE, NAME)
    status, answer = await stack.post(new)
    assert (status, codes(answer)) == (403, {"POD_NOT_FOUND"}), answer
    # The GET found no pod of that name, so the uid cached under it is gone too:
    # the old token is no longer answered from the cache.
    assert (await stack.inventory.get_by_uid(stack.old.uid)) is None
    status, answer = await stack.post(stack.old)
    assert (status, codes(answer)) == (403, {"POD_NOT_FOUND"}), answer
    assert stack.pod_gets() == 1
