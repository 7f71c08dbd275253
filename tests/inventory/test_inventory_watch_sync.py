"""WatchInventory through the real kubernetes_asyncio client against the API-server double:
list, watch, resume, 410 relist, paging, bookmarks, selectors, namespaces, resync."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from identityd.inventory.base import PodRecord
from identityd.inventory.watch import WatchInventory, WatchMetrics
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to, fast_settings, watching
from tests.doubles.waiting import eventually


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        yield server


def lists(api: KubeAPIServer) -> list[dict[str, str]]:
    return [r.query for r in api.requests if r.method == "GET" and not r.is_watch
            and r.path.endswith("/pods")]


def set_round(value: str, pod: dict[str, Any]) -> None:
    pod["metadata"]["labels"]["round"] = value


def watches(api: KubeAPIServer) -> list[dict[str, str]]:
    return [r.query for r in api.requests if r.is_watch]


async def test_initial_sync_then_events(api: KubeAPIServer) -> None:
    a = api.add_pod("sports-web", "api-1", service_account="api", ip="10.1.2.3", node="node-7",
                    labels={"app": "api"}, annotations={"identityd.io/tier": "gold", "x": "y"})
    api.add_pod("payments", "billing-0", ip="10.2.0.7")
    async with watching(api) as inv:
        assert inv.ready and inv.size() == 2
        record = await inv.get_by_uid(a["metadata"]["uid"])
        assert record == PodRecord(
            uid=a["metadata"]["uid"], namespace="sports-web", name="api-1", service_account="api",
            phase="Running", ips=("10.1.2.3",), node_name="node-7", labels={"app": "api"},
            annotations={"identityd.io/tier": "gold"}, start_time=a["status"]["startTime"],
        )
        # The watch starts at the list's resourceVersion and asks for bookmarks.
        listed_rv = inv.resource_versions[None]
        await api.wait_for_watches(1)
        assert watches(api)[0]["resourceVersion"] == listed_rv
        assert watches(api)[0]["allowWatchBookmarks"] == "True"

        added = api.add_pod("sports-web", "api-2", phase="Pending")
        await eventually(lambda: inv.size() == 3)
        assert (await inv.get("sports-web", "api-2")).phase == "Pending"  # type: ignore[union-attr]

        api.update_pod("sports-web", "api-2", lambda p: p["status"].update(phase="Running"))
        await eventually(lambda: inv._shards[None].store.get("sports-web", "api-2").phase  # type: ignore[union-attr]
                         == "Running")

        api.terminate_pod("sports-web", "api-2")
        await eventually(lambda: inv._shards[None].store.get_by_uid(  # type: ignore[union-attr]
            added["metadata"]["uid"]).terminating)

        api.delete_pod("sports-web", "api-2")
        await eventually(lambda: inv.size() == 2)
        assert await inv.get_by_uid(added["metadata"]["uid"]) is None
        assert inv.resource_versions[None] == str(api.store.rv)


async def test_pagination_lists_every_page(api: KubeAPIServer) -> None:
    for i in range(250):
        api.add_pod(f"ns-{i % 3}", f"pod-{i:03d}")
    async with watching(api, fast_settings(page_size=100)) as inv:
        assert inv.size() == 250
    pages = lists(api)
    assert [p.get("limit") for p in pages] == ["100", "100", "100"]
    assert "continue" not in pages[0]
    assert pages[1]["continue"] and pages[2]["continue"]


async def test_pages_form_one_snapshot_while_pods_change(api: KubeAPIServer) -> None:
    for i in range(30):
        api.add_pod("ns", f"pod-{i:02d}")
    inv = WatchInventory(connection_to(api), fast_settings(page_size=10))
    await inv.open()
    try:
        # Changes land between pages: the list is as of its first page, the watch
        # then delivers the changes, so nothing is missed or seen twice.
        api.set_delay(0.05, path="continue=")
        step = asyncio.create_task(inv.step())  # the list
        await eventually(lambda: any("continue" in q for q in lists(api)))  # page 2 is held
        api.delete_pod("ns", "pod-25")
        api.add_pod("ns", "pod-99")
        await step
        assert inv.size() == 30
        assert inv._shards[None].store.get("ns", "pod-25") is not None
        assert inv._shards[None].store.get("ns", "pod-99") is None
    finally:
        await inv.aclose()


@pytest.mark.parametrize("abort", [False, True], ids=["clean-end", "connection-cut"])
async def test_resume_after_dropped_watch_loses_and_repeats_nothing(
    api: KubeAPIServer, abort: bool
) -> None:
    for i in range(3):
        api.add_pod("ns", f"pod-{i}")
    seen: list[tuple[str, int]] = []  # (event type, the inventory's RV after it)
    written: list[int] = []  # the RV of every write after the list
    holder: list[WatchInventory] = []

    def observe(kind: str, record: PodRecord | None) -> None:
        seen.append((kind, int(holder[0].resource_versions[None] or 0)))

    def caught_up() -> bool:
        return bool(seen) and seen[-1][1] == written[-1]

    async with watching(api, observer=observe) as inv:
        holder.append(inv)
        for round_ in range(4):
            await api.wait_for_watches(1)
            api.add_pod("ns", f"r{round_}-a")
            written.append(api.store.rv)
            await eventually(caught_up)
            api.drop_watches(abort=abort)
            # Written after the drop: in flight on the old stream's queue, never sent there.
            api.add_pod("ns", f"r{round_}-b")
            written.append(api.store.rv)
            api.update_pod("ns", "pod-0", functools.partial(set_round, str(round_)))
            written.append(api.store.rv)
            api.delete_pod("ns", f"r{round_}-a")
            written.append(api.store.rv)
        await eventually(caught_up)
        assert [rv for _, rv in seen] == written  # each event once, in order
        assert inv.size() == 3 + 4
        assert inv._shards[None].store.get("ns", "pod-0").labels["round"] == "3"  # type: ignore[union-attr]
    # Every reconnect resumed from the last resourceVersion it had, never relisted.
    assert len(lists(api)) == 1
    assert len(watches(api)) >= 5
    resumed = [int(q["resourceVersion"]) for q in watches(api)]
    assert resumed == sorted(resumed)


async def test_expired_resource_version_relists(api: KubeAPIServer) -> None:
    api.add_pod("ns", "old")
    registry = CollectorRegistry()
    inv = WatchInventory(connection_to(api), fast_settings(), metrics=WatchMetrics(registry))
    await inv.open()
    try:
        await inv.step()  # list
        listed_rv = inv.resource_versions[None]
        api.add_pod("ns", "new")
        api.delete_pod("ns", "old")
        api.compact()  # the events since the list are gone
        await inv.step()  # watch from listed_rv: ERROR 410
        assert inv.resource_versions[None] is None
        assert watches(api)[-1]["resourceVersion"] == listed_rv
        await inv.step()  # relist
        assert inv.ready
        store = inv._shards[None].store
        assert store.get("ns", "new") is not None and store.get("ns", "old") is None
        assert inv.resource_versions[None] == str(api.store.rv)
        assert registry.get_sample_value(
            "identityd_inventory_relists_total", {"reason": "expired"}) == 1
        assert registry.get_sample_value(
            "identityd_inventory_watch_restarts_total", {"reason": "expired"}) == 1
    finally:
        await inv.aclose()


async def test_expired_while_running_relists_and_catches_up(api: KubeAPIServer) -> None:
    api.add_pod("ns", "old")
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        api.drop_watches()
        api.add_pod("ns", "new")  # never sent on the dropped stream
        api.compact()  # and no longer in the window for the resumed watch
        await eventually(lambda: inv._shards[None].store.get("ns", "new") is not None)
        assert inv.ready
    assert len(lists(api)) == 2


async def test_expired_continue_token_restarts_the_paged_list(api: KubeAPIServer) -> None:
    """Not one unpaged list of every pod (hundreds of MB at 100k pods): the pages again,
    from the first."""
    for i in range(25):
        api.add_pod("ns", f"pod-{i:02d}")
    api.fail_next(1, 410, path="continue=")
    async with watching(api, fast_settings(page_size=10)) as inv:
        assert inv.size() == 25
        assert inv.ready
    pages = lists(api)
    assert [p.get("limit") for p in pages] == ["10"] * 5
    assert ["continue" in p for p in pages] == [False, True, False, True, True]


async def test_bookmark_advances_resource_version_only(api: KubeAPIServer) -> None:
    api.add_pod("mine", "a")
    async with watching(api, fast_settings(namespaces=("mine",))) as inv:
        await api.wait_for_watches(1)
        for i in range(3):
            api.add_pod("elsewhere", f"b{i}")  # moves the global RV; not our namespace
        before = inv.resource_versions["mine"]
        api.send_bookmark()
        await eventually(lambda: inv.resource_versions["mine"] == str(api.store.rv))
        assert before != inv.resource_versions["mine"]
        assert inv.size() == 1
        api.drop_watches()
        await eventually(lambda: len(watches(api)) == 2)
        assert watches(api)[1]["resourceVersion"] == str(api.store.rv)


async def test_label_selector_limits_the_pods(api: KubeAPIServer) -> None:
    api.add_pod("ns", "a1", labels={"app": "a"})
    api.add_pod("ns", "b1", labels={"app": "b"})
    async with watching(api, fast_settings(label_selector="app=a")) as inv:
        assert inv.size() == 1
        assert inv._shards[None].store.get("ns", "a1") is not None
        api.add_pod("ns", "a2", labels={"app": "a"})
        api.add_pod("ns", "b2", labels={"app": "b"})
        await eventually(lambda: inv.size() == 2)
        # A pod relabelled out of the selector leaves the cache (the watch says DELETED).
        api.update_pod("ns", "a1", lambda p: p["metadata"]["labels"].update(app="b"))
        await eventually(lambda: inv._shards[None].store.get("ns", "a1") is None)
        assert {r.name for r in inv._shards[None].store} == {"a2"}
    assert all(q.get("labelSelector") == "app=a" for q in lists(api) + watches(api))


async def test_namespaces_are_watched_each_and_only(api: KubeAPIServer) -> None:
    for ns in ("a", "b", "c"):
        api.add_pod(ns, "pod")
    async with watching(api, fast_settings(namespaces=("a", "b"))) as inv:
        assert inv.size() == 2
        await api.wait_for_watches(2)
        api.add_pod("b", "pod-2")
        api.add_pod("c", "pod-2")
        await eventually(lambda: inv.size() == 3)
        before = len(api.requests)
        assert await inv.get("c", "pod") is None  # not watched: no read-through either
        assert len(api.requests) == before
    paths = {r.path for r in api.requests}
    assert paths == {"/api/v1/namespaces/a/pods", "/api/v1/namespaces/b/pods"}


async def test_deleted_pod_leaves_the_cache(api: KubeAPIServer) -> None:
    pod = api.add_pod("ns", "doomed")
    async with watching(api) as inv:
        uid = pod["metadata"]["uid"]
        assert await inv.get_by_uid(uid) is not None
        api.delete_pod("ns", "doomed")
        await eventually(lambda: inv._shards[None].store.get_by_uid(uid) is None)
        assert await inv.get_by_uid(uid) is None
        assert await inv.get("ns", "doomed") is None  # read through: 404


async def test_recreated_pod_replaces_the_old_uid(api: KubeAPIServer) -> None:
    old = api.add_pod("ns", "web-0")
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        api.delete_pod("ns", "web-0")
        new = api.add_pod("ns", "web-0")
        await eventually(lambda: inv._shards[None].store.get_by_uid(new["metadata"]["uid"]))
        assert await inv.get_by_uid(old["metadata"]["uid"]) is None
        assert (await inv.get("ns", "web-0")).uid == new["metadata"]["uid"]  # type: ignore[union-attr]


async def test_recreated_pod_with_missed_delete_replaces_the_old_uid(api: KubeAPIServer) -> None:
    old = api.add_pod("ns", "web-0")
    async with watching(api) as inv:
        await api.wait_for_watches(1)
        with api.muted():
            api.delete_pod("ns", "web-0")  # this DELETED is lost
        new = api.add_pod("ns", "web-0")
        await eventually(lambda: inv._shards[None].store.get_by_uid(new["metadata"]["uid"]))
        assert await inv.get_by_uid(old["metadata"]["uid"]) is None
        assert inv.size() == 1


async def test_periodic_resync_repairs_drift(api: KubeAPIServer) -> None:
    api.add_pod("ns", "kept")
    gone = api.add_pod("ns", "gone")
    registry = CollectorRegistry()
    settings = fast_settings(resync_seconds=0.3)
    async with watching(api, settings, metrics=WatchMetrics(registry)) as inv:
        await api.wait_for_watches(1)
        with api.muted():  # events the watch never delivers
            api.add_pod("ns", "missed")
            api.delete_pod("ns", "gone")
        assert inv._shards[None].store.get("ns", "missed") is None
        await eventually(lambda: inv._shards[None].store.get("ns", "missed") is not None,
                         within=3)
        assert inv._shards[None].store.get_by_uid(gone["metadata"]["uid"]) is None
        assert registry.get_sample_value(
            "identityd_inventory_relists_total", {"reason": "resync"}) == 1
        assert registry.get_sample_value("identityd_inventory_resync_repairs_total") == 2
        assert inv.ready
    # The watch asked the server for no more than the time to the resync (>= 1 s),
    # and was ended here at the resync time.
    assert watches(api)[0]["timeoutSeconds"] == "1"
    assert registry.get_sample_value(
        "identityd_inventory_watch_restarts_total", {"reason": "resync"}) == 1


async def test_repeated_410_after_fresh_lists_backs_off() -> None:
    # A server whose window is always behind: each fresh list's version is refused.
    async with KubeAPIServer(history=0) as api:
        api.add_pod("ns", "a")
        inv = WatchInventory(connection_to(api), fast_settings(
            backoff_initial_seconds=0.2, backoff_max_seconds=0.2))
        await inv.open()
        try:
            loop = asyncio.get_running_loop()
            durations = []
            for i in range(3):
                await inv.step()  # list
                api.add_pod("ns", f"churn-{i}")  # moves the window past the list's RV
                start = loop.time()
                await inv.step()  # watch: 410
                durations.append(loop.time() - start)
                assert inv.resource_versions[None] is None
            assert durations[0] < 0.1  # the first 410 relists at once
            assert all(d >= 0.1 for d in durations[1:])  # then with backoff
        finally:
            await inv.aclose()
