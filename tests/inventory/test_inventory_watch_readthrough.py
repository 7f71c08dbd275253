"""Read-through on a cache miss: one GET of the pod the token names, through the real
client against the API-server double; coalesced, bounded, remembered briefly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from identityd.errors import InventoryUnavailable
from identityd.inventory.watch import WatchInventory, WatchMetrics
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to, fast_settings, watching
from tests.doubles.waiting import eventually


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        server.add_pod("ns", "known")
        yield server


def gets(api: KubeAPIServer, name: str) -> int:
    return sum(1 for r in api.requests if r.path == f"/api/v1/namespaces/ns/pods/{name}")


async def test_brand_new_pod_is_read_through_and_cached(api: KubeAPIServer) -> None:
    registry = CollectorRegistry()
    async with watching(api, metrics=WatchMetrics(registry)) as inv:
        await api.wait_for_watches(1)
        with api.muted():  # the pod is ahead of the watch
            new = api.add_pod("ns", "new", ip="10.9.9.9")
        uid = new["metadata"]["uid"]
        assert await inv.get_by_uid(uid) is None
        record = await inv.get("ns", "new")
        assert record is not None and record.uid == uid and record.ips == ("10.9.9.9",)
        assert gets(api, "new") == 1
        # It entered the cache: found by uid now, and no second GET by name.
        assert await inv.get_by_uid(uid) == record
        assert await inv.get("ns", "new") == record
        assert gets(api, "new") == 1
        assert registry.get_sample_value(
            "identityd_inventory_read_through_total", {"result": "hit"}) == 1


async def test_cache_hit_does_not_read_through(api: KubeAPIServer) -> None:
    async with watching(api) as inv:
        assert (await inv.get("ns", "known")) is not None
        assert gets(api, "known") == 0


async def test_unknown_pod_is_none_and_remembered_briefly(api: KubeAPIServer) -> None:
    registry = CollectorRegistry()
    settings = fast_settings(read_through_cache_seconds=0.2)
    async with watching(api, settings, metrics=WatchMetrics(registry)) as inv:
        assert await inv.get("ns", "ghost") is None
        assert await inv.get("ns", "ghost") is None
        assert gets(api, "ghost") == 1  # a replayed token costs one GET per window
        await asyncio.sleep(0.25)
        assert await inv.get("ns", "ghost") is None
        assert gets(api, "ghost") == 2
        assert registry.get_sample_value(
            "identityd_inventory_read_through_total", {"result": "miss"}) == 2


async def test_concurrent_misses_for_one_name_share_one_get(api: KubeAPIServer) -> None:
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        with api.muted():
            api.add_pod("ns", "new")
        api.set_delay(0.1, path="/pods/new")
        results = await asyncio.gather(*(inv.get("ns", "new") for _ in range(20)))
        assert len({r.uid for r in results if r is not None}) == 1
        assert all(r is not None for r in results)
        assert gets(api, "new") == 1


async def test_read_throughs_run_a_few_at_a_time(api: KubeAPIServer) -> None:
    settings = fast_settings(read_through_concurrency=2, read_through_timeout_seconds=2.0)
    async with watching(api, settings) as inv:
        api.set_delay(0.1, path="/pods/ghost")
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(inv.get("ns", f"ghost-{i}") for i in range(6)))
        elapsed = asyncio.get_running_loop().time() - start
        assert elapsed >= 0.3  # 6 GETs of 0.1 s, 2 at a time


async def test_slow_api_server_makes_the_lookup_unavailable(api: KubeAPIServer) -> None:
    registry = CollectorRegistry()
    settings = fast_settings(read_through_timeout_seconds=0.1)
    async with watching(api, settings, metrics=WatchMetrics(registry)) as inv:
        api.set_delay(0.5, path="/pods/slow")
        with pytest.raises(InventoryUnavailable) as caught:
            await inv.get("ns", "slow")
        assert caught.value.code == "INVENTORY_LOOKUP_FAILED"
        assert caught.value.status == 503
        assert registry.get_sample_value(
            "identityd_inventory_read_through_total", {"result": "error"}) == 1
        assert inv.ready  # one failed GET does not make the inventory stale


async def test_api_error_makes_the_lookup_unavailable(api: KubeAPIServer) -> None:
    async with watching(api) as inv:
        api.fail_next(1, 500, path="/pods/broken")
        with pytest.raises(InventoryUnavailable) as caught:
            await inv.get("ns", "broken")
        assert caught.value.code == "INVENTORY_LOOKUP_FAILED"
        # An error is not remembered: the next lookup asks again.
        assert await inv.get("ns", "broken") is None
        assert gets(api, "broken") == 2


async def test_uid_hint_reads_through_a_pod_recreated_ahead_of_the_watch(
    api: KubeAPIServer,
) -> None:
    old = api.pod("ns", "known")
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        with api.muted():
            api.delete_pod("ns", "known")
            new = api.add_pod("ns", "known")
        new_uid = new["metadata"]["uid"]
        assert (await inv.get("ns", "known")).uid == old["metadata"]["uid"]  # type: ignore[union-attr]
        assert gets(api, "known") == 0
        record = await inv.get("ns", "known", uid=new_uid)
        assert record is not None and record.uid == new_uid
        assert await inv.get_by_uid(old["metadata"]["uid"]) is None
        assert await inv.get_by_uid(new_uid) == record


async def test_read_through_keeps_to_the_label_selector(api: KubeAPIServer) -> None:
    settings = fast_settings(label_selector="team=a")
    async with watching(api, settings) as inv:
        await api.wait_for_watches(1)
        with api.muted():
            api.add_pod("ns", "ours", labels={"team": "a"})
            api.add_pod("ns", "theirs", labels={"team": "b"})
        assert (await inv.get("ns", "ours")) is not None
        assert await inv.get("ns", "theirs") is None
    lookups = [r.query for r in api.requests if r.query.get("fieldSelector")]
    assert lookups == [
        {"fieldSelector": "metadata.name=ours", "labelSelector": "team=a"},
        {"fieldSelector": "metadata.name=theirs", "labelSelector": "team=a"},
    ]


async def test_pod_deleted_while_its_get_is_in_flight_is_not_cached(
    api: KubeAPIServer,
) -> None:
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        with api.muted():
            pod = api.add_pod("ns", "brief")
        # The GET is answered with the pod, but the answer arrives late...
        api.set_delay(0.2, path="/pods/brief", after=True)
        lookup = asyncio.create_task(inv.get("ns", "brief"))
        await eventually(lambda: gets(api, "brief") == 1)
        await asyncio.sleep(0.05)
        # ...after the watch has reported the pod deleted.
        api.delete_pod("ns", "brief")
        assert await lookup is None
        assert await inv.get_by_uid(pod["metadata"]["uid"]) is None
        assert inv._shards[None].store.get("ns", "brief") is None


async def test_lookups_before_the_first_list_are_unavailable(api: KubeAPIServer) -> None:
    api.set_delay(0.3)
    inv = WatchInventory(connection_to(api), fast_settings())
    await inv.start()
    try:
        with pytest.raises(InventoryUnavailable) as caught:
            await inv.get("ns", "known")
        assert caught.value.code == "INVENTORY_UNAVAILABLE"
        with pytest.raises(InventoryUnavailable):
            await inv.get_by_uid("anything")
        assert not inv.ready
        assert gets(api, "known") == 0
        async with asyncio.timeout(3):
            await inv.wait_synced()
        assert inv.ready
        assert await inv.get("ns", "known") is not None
    finally:
        await inv.aclose()


async def test_uid_hint_with_the_name_gone_drops_the_cached_uid(api: KubeAPIServer) -> None:
    old_uid = api.pod("ns", "known")["metadata"]["uid"]
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        with api.muted():  # deleted, and the watch has not said so
            api.delete_pod("ns", "known")
        assert await inv.get_by_uid(old_uid) is not None
        assert await inv.get("ns", "known", uid="some-newer-uid") is None
        assert gets(api, "known") == 1
        # A name is unique at any moment: no pod under it now means the old uid is gone.
        assert await inv.get_by_uid(old_uid) is None
        assert inv.size() == 0


async def test_uid_hint_matching_the_cache_does_not_read_through(api: KubeAPIServer) -> None:
    uid = api.pod("ns", "known")["metadata"]["uid"]
    async with watching(api) as inv:
        record = await inv.get("ns", "known", uid=uid)
        assert record is not None and record.uid == uid
        assert gets(api, "known") == 0


async def test_read_through_answer_is_not_cached_across_a_relist(api: KubeAPIServer) -> None:
    registry = CollectorRegistry()
    async with watching(api, metrics=WatchMetrics(registry)) as inv:
        await api.wait_for_watches(1)
        with api.muted():
            pod = api.add_pod("ns", "brief")
        api.set_delay(0.5, path="/pods/brief", after=True)  # answered now, delivered late
        lookup = asyncio.create_task(inv.get("ns", "brief"))
        await eventually(lambda: gets(api, "brief") == 1)
        with api.muted():  # gone, and only a relist will tell
            api.delete_pod("ns", "brief")
        api.compact()
        api.drop_watches()  # the watch resumes into 410 and relists
        await eventually(lambda: registry.get_sample_value(
            "identityd_inventory_relists_total", {"reason": "expired"}) == 1)
        record = await lookup
        # The GET's answer serves its caller, but it must not overwrite a relist that
        # may be newer: a pod deleted meanwhile would stay cached until the next resync.
        assert record is not None and record.uid == pod["metadata"]["uid"]
        assert inv._shards[None].store.get("ns", "brief") is None
        assert await inv.get_by_uid(pod["metadata"]["uid"]) is None
