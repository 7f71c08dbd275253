"""WatchInventory health: fail closed when stale, recover, back off with jitter, detect a
dead stream, stop cleanly; WatchSettings validation."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from identityd.errors import InventoryUnavailable
from identityd.inventory.watch import WatchInventory, WatchMetrics, WatchSettings
from identityd.kubeapi import KubeConnection
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to, fast_settings, watching
from tests.doubles.waiting import eventually


def set_label(value: str, pod: dict[str, Any]) -> None:
    pod["metadata"]["labels"]["n"] = value


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        yield server


async def test_watch_down_beyond_the_staleness_bound_fails_closed_then_recovers(
    api: KubeAPIServer,
) -> None:
    kept = api.add_pod("ns", "kept")
    doomed = api.add_pod("ns", "doomed")
    settings = fast_settings(staleness_seconds=0.3)
    async with watching(api, settings) as inv:
        await api.wait_for_watches(1)
        loop = asyncio.get_running_loop()
        await api.pause()
        paused_at = loop.time()
        # While the bound has not passed, the cache still answers.
        assert inv.ready
        assert await inv.get_by_uid(kept["metadata"]["uid"]) is not None
        # The cluster changes while we cannot see it.
        api.delete_pod("ns", "doomed")
        born = api.add_pod("ns", "born")
        await eventually(lambda: not inv.ready, within=3)
        assert loop.time() - paused_at >= 0.3
        for lookup in (inv.get_by_uid(doomed["metadata"]["uid"]), inv.get("ns", "doomed")):
            with pytest.raises(InventoryUnavailable) as caught:
                await lookup
            assert caught.value.code == "INVENTORY_STALE"
            assert caught.value.status == 503

        await api.resume()
        await eventually(lambda: inv.ready, within=3)
        # Past the bound it relists (an untrusted cache is never served while a
        # backlog streams in): the delete and the add are both in the new list.
        await eventually(lambda: inv._shards[None].store.get("ns", "born") is not None)
        assert await inv.get_by_uid(doomed["metadata"]["uid"]) is None
        assert await inv.get_by_uid(born["metadata"]["uid"]) is not None
    assert sum(1 for r in api.requests if not r.is_watch) == 2  # initial list + relist


async def test_short_outage_within_the_bound_stays_ready(api: KubeAPIServer) -> None:
    api.add_pod("ns", "pod")
    async with watching(api, fast_settings(staleness_seconds=5.0)) as inv:
        await api.wait_for_watches(1)
        await api.pause()
        samples = []
        for _ in range(10):
            samples.append(inv.ready)
            await asyncio.sleep(0.01)
        await api.resume()
        await api.wait_for_watches(1, within=3)
        assert all(samples) and inv.ready


async def test_errors_back_off_exponentially_with_jitter(api: KubeAPIServer) -> None:
    api.fail_next(4, 500)
    settings = fast_settings(backoff_initial_seconds=0.04, backoff_max_seconds=0.1)
    async with watching(api, settings) as inv:
        assert inv.ready
    times = [r.at for r in api.requests[:5]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Equal jitter: the n-th wait is in [c/2, c] with c = min(0.1, 0.04 * 2^(n-1)).
    for gap, ceiling in zip(gaps, (0.04, 0.08, 0.1, 0.1), strict=True):
        assert ceiling / 2 - 0.005 <= gap <= ceiling + 0.1


def test_backoff_delays_double_up_to_the_cap() -> None:
    settings = WatchSettings(backoff_initial_seconds=1.0, backoff_max_seconds=10.0)
    inv = WatchInventory(KubeConnection(host="http://127.0.0.1:1"), settings,
                         rng=random.Random(7))
    delays = [inv._backoff(n) for n in range(1, 8)]
    for delay, ceiling in zip(delays, (1, 2, 4, 8, 10, 10, 10), strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[4:]}) == 3  # jittered, not in lock-step


async def test_silent_stream_is_detected_as_dead(api: KubeAPIServer) -> None:
    # The server is asked to end the stream after 1 s (whole seconds): a stream silent
    # for 0.15 s here is a dead one (as a half-open connection would be).
    api.add_pod("ns", "pod")
    registry = CollectorRegistry()
    settings = fast_settings(inactivity_timeout_seconds=0.15, watch_timeout_seconds=0.1)
    async with watching(api, settings, metrics=WatchMetrics(registry)) as inv:
        await eventually(lambda: registry.get_sample_value(
            "identityd_inventory_watch_restarts_total", {"reason": "inactive"}), within=3)
        await api.wait_for_watches(1)
        # It watches again from where it was, and still answers.
        assert inv.ready
        api.add_pod("ns", "later")
        await eventually(lambda: inv.size() == 2)


async def test_bookmarks_keep_a_stream_alive_once_past_its_start() -> None:
    """Bookmarks come only above the watch's starting resourceVersion (the double does as
    the watch cache does): after one write, they keep the stream alive."""
    async with KubeAPIServer(bookmark_interval=0.05) as api:
        registry = CollectorRegistry()
        settings = fast_settings(inactivity_timeout_seconds=0.2, watch_timeout_seconds=0.1)
        async with watching(api, settings, metrics=WatchMetrics(registry)):
            await api.wait_for_watches(1)
            api.put("configmaps", {"metadata": {"name": "c", "namespace": "ns"}})  # not a pod
            await asyncio.sleep(0.5)  # within the 1 s the server was asked for
            assert registry.get_sample_value(
                "identityd_inventory_watch_restarts_total", {"reason": "inactive"}) is None
            bookmarks = registry.get_sample_value(
                "identityd_inventory_events_total", {"type": "BOOKMARK"})
            assert bookmarks is not None and bookmarks >= 3


async def test_server_that_ends_every_watch_at_once_is_backed_off(api: KubeAPIServer) -> None:
    settings = fast_settings(backoff_initial_seconds=0.05, backoff_max_seconds=0.05)
    async with watching(api, settings):
        for _ in range(4):
            await api.wait_for_watches(1)
            api.drop_watches()
            await eventually(lambda: api.watch_count == 0)
    watch_times = [r.at for r in api.requests if r.is_watch]
    gaps = [b - a for a, b in itertools.pairwise(watch_times)]
    assert len(gaps) >= 3 and min(gaps) >= 0.025


async def test_a_bug_on_every_event_fails_closed_but_never_stops_the_loop(
    api: KubeAPIServer,
) -> None:
    """An error the loop does not know is logged and retried with backoff (never the end
    of the loop); while it keeps failing the inventory is stale, then ready again."""
    api.add_pod("ns", "pod")
    broken = [True]

    def observer(kind: str, record: Any) -> None:
        if broken[0]:
            raise RuntimeError("a bug in event handling")

    settings = fast_settings(staleness_seconds=0.2)
    async with watching(api, settings, observer=observer) as inv:
        await api.wait_for_watches(1)

        async def churn() -> None:
            for i in itertools.count():
                api.update_pod("ns", "pod", functools.partial(set_label, str(i)))
                await asyncio.sleep(0.01)

        churning = asyncio.create_task(churn())
        try:
            await eventually(lambda: not inv.ready, within=3)
            with pytest.raises(InventoryUnavailable) as caught:
                await inv.get_by_uid("x")
            assert caught.value.code == "INVENTORY_STALE"
            broken[0] = False
            await eventually(lambda: inv.ready, within=3)
        finally:
            churning.cancel()
        assert not any(task.done() for task in inv._tasks)


async def test_close_stops_everything(api: KubeAPIServer) -> None:
    api.add_pod("ns", "pod")
    before = asyncio.all_tasks()
    inv = WatchInventory(connection_to(api), fast_settings())
    await inv.start()
    async with asyncio.timeout(3):
        await inv.wait_synced()
    await api.wait_for_watches(1)
    api.set_delay(1.0, path="/pods/pending")
    lookup = asyncio.create_task(inv.get("ns", "pending"))
    await eventually(lambda: any(r.path.endswith("/pending") for r in api.requests))
    await inv.aclose()
    with pytest.raises(asyncio.CancelledError):
        await lookup
    left = {t for t in asyncio.all_tasks() - before
            if "RequestHandler" not in repr(t.get_coro())}  # the double's handlers
    assert left == set()
    assert not inv.ready
    await eventually(lambda: api.watch_count == 0)
    with pytest.raises(RuntimeError):
        await inv.start()


async def test_metrics_count_what_happened(api: KubeAPIServer) -> None:
    api.add_pod("ns", "a")
    registry = CollectorRegistry()
    async with watching(api, metrics=WatchMetrics(registry)) as inv:
        await api.wait_for_watches(1)
        api.add_pod("ns", "b")
        api.update_pod("ns", "b", lambda p: p["status"].update(phase="Succeeded"))
        api.delete_pod("ns", "a")
        api.send_bookmark()
        await eventually(lambda: registry.get_sample_value(
            "identityd_inventory_events_total", {"type": "BOOKMARK"}))
        api.drop_watches()
        await eventually(lambda: registry.get_sample_value(
            "identityd_inventory_watch_restarts_total", {"reason": "timeout"}))
        assert inv.size() == 1

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("identityd_inventory_events_total", type="ADDED") == 1
    assert value("identityd_inventory_events_total", type="MODIFIED") == 1
    assert value("identityd_inventory_events_total", type="DELETED") == 1
    assert value("identityd_inventory_relists_total", reason="initial") == 1
    assert value("identityd_inventory_last_event_timestamp_seconds") > 1.7e9  # type: ignore[operator]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"page_size": 0}, ValueError),
        ({"staleness_seconds": -1.0}, ValueError),
        ({"backoff_initial_seconds": 0}, ValueError),
        ({"backoff_initial_seconds": 5.0, "backoff_max_seconds": 1.0}, ValueError),
        ({"read_through_concurrency": 0}, ValueError),
        ({"watch_timeout_seconds": "300"}, TypeError),
        ({"watch_timeout_seconds": 120.0}, ValueError),  # not below the inactivity timeout
        ({"watch_timeout_seconds": 30.0, "inactivity_timeout_seconds": 20.0}, ValueError),
        ({"namespaces": "default"}, ValueError),
        ({"namespaces": ("a", "")}, ValueError),
        ({"label_selector": 3}, TypeError),
    ],
)
def test_settings_are_validated(overrides: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(overrides))):
        WatchSettings(**overrides)


def test_settings_defaults_are_sane() -> None:
    s = WatchSettings()
    assert s.namespaces == () and s.label_selector is None
    assert s.inactivity_timeout_seconds > 60  # longer than the API server's bookmark period
    assert s.watch_timeout_seconds < s.inactivity_timeout_seconds  # the server ends it first
    assert WatchSettings(resync_seconds=0).resync_seconds == 0  # 0 = never
    with pytest.raises(TypeError):
        WatchInventory("http://127.0.0.1", s)  # type: ignore[arg-type]
