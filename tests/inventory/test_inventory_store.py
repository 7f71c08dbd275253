"""PodStore: both indexes stay consistent through upserts, deletes, recycled names, relists."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from identityd.inventory import PodRecord, PodStore, RecordBuilder


def rec(uid: str, name: str = "api", namespace: str = "ns", phase: str = "Running") -> PodRecord:
    return PodRecord(uid=uid, namespace=namespace, name=name, service_account="sa",
                     phase=phase, ips=("10.0.0.1",), node_name="n1")


def check(store: PodStore, *expected: PodRecord) -> None:
    """Both indexes hold exactly ``expected``."""
    assert len(store) == len(expected)
    assert sorted(r.uid for r in store) == sorted(r.uid for r in expected)
    for record in expected:
        assert store.get_by_uid(record.uid) is record
        assert store.get(record.namespace, record.name) is record


def test_upsert_indexes_by_uid_and_name() -> None:
    a, b = rec("u1", "a"), rec("u2", "b", namespace="other")
    store = PodStore([a, b])
    check(store, a, b)
    assert store.get("ns", "b") is None
    assert store.get("missing", "a") is None
    assert store.get_by_uid("u3") is None


def test_upsert_same_uid_replaces() -> None:
    store = PodStore([rec("u1", phase="Pending")])
    running = rec("u1")
    store.upsert(running)
    check(store, running)


def test_recycled_name_evicts_the_old_uid() -> None:
    old, new = rec("u-old"), rec("u-new")
    store = PodStore([old])
    store.upsert(new)
    check(store, new)
    assert store.get_by_uid("u-old") is None
    # The old pod's delete event arrives late: it must not take the new pod with it.
    assert store.delete("u-old") is None
    check(store, new)


def test_delete_by_uid_or_record() -> None:
    a, b = rec("u1", "a"), rec("u2", "b")
    store = PodStore([a, b])
    assert store.delete(a) is a
    check(store, b)
    assert store.delete("u2") is b
    check(store)
    assert store.delete("u2") is None


def test_delete_with_a_stale_record_removes_by_uid() -> None:
    stored = rec("u1")
    store = PodStore([stored])
    assert store.delete(rec("u1", phase="Succeeded")) is stored
    check(store)


def test_name_change_for_a_uid_does_not_leave_a_ghost() -> None:
    store = PodStore([rec("u1", "a")])
    moved = rec("u1", "b")
    store.upsert(moved)
    check(store, moved)
    assert store.get("ns", "a") is None


def test_replace_all_swaps_everything() -> None:
    store = PodStore([rec("u1", "a"), rec("u2", "b")])
    c, b2 = rec("u3", "c"), rec("u4", "b")
    store.replace_all([c, b2])
    check(store, c, b2)
    assert store.get("ns", "a") is None
    store.replace_all([])
    check(store)


def test_iteration_is_a_snapshot() -> None:
    store = PodStore([rec("u1", "a"), rec("u2", "b")])
    for record in store:
        store.delete(record)  # would raise "dict changed size" on a live view
    check(store)


def test_wrong_types_are_refused() -> None:
    store = PodStore()
    with pytest.raises(TypeError, match="record"):
        store.upsert({"uid": "u1"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="target"):
        store.delete(5)  # type: ignore[arg-type]


def _pod(i: int) -> dict[str, object]:
    # Realistic sizes: 36-char uid, deployment-style names, a few labels and annotations.
    return {
        "metadata": {
            "uid": f"{i:08x}-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
            "namespace": f"team-{i % 200}",
            "name": f"service-{i % 500}-deployment-7d9f8c6b5-{i:06d}",
            "resourceVersion": str(1_000_000 + i),
            "labels": {"app": f"service-{i % 500}", "pod-template-hash": "7d9f8c6b5",
                       "app.kubernetes.io/part-of": "shop"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-25T10:00:00Z",
                            "prometheus.io/scrape": "true"},
            "creationTimestamp": "2026-11-25T10:00:00Z",
        },
        "spec": {"serviceAccountName": f"sa-{i % 500}", "nodeName": f"node-{i % 300}"},
        "status": {"phase": "Running", "podIP": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                   "podIPs": [{"ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}],
                   "startTime": "2026-11-25T10:00:00Z"},
    }


def test_memory_per_pod_fits_100k_in_budget() -> None:
    # Budget: 100k pods in <= 150 MB for the whole process, of which the interpreter
    # and libraries take ~80 MB. What a record adds beyond the strings it keeps from
    # the object (uid, name, IPs, start time): ~260 B with labels shared, ~550 without.
    count = 10_000
    pods = [_pod(i) for i in range(count)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = PodStore()
        build = RecordBuilder()
        for obj in pods:
            record = build(obj)
            assert record is not None
            store.upsert(record)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store) == count
    per_pod = used / count
    assert per_pod < 400, f"{per_pod:.0f} bytes per pod"
