"""record_from_pod: Kubernetes JSON Pod objects in, slim records out (table-driven)."""

from __future__ import annotations

import copy
import ipaddress
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identityd.inventory import PodRecord, RecordBuilder, record_from_pod
from identityd.inventory.store import canonical_ip

UID = "5b8c1f8e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


def pod(**changes: Any) -> dict[str, Any]:
    """A Running pod as the API server returns it; ``changes`` are dotted paths, None deletes."""
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "uid": UID,
            "namespace": "sports-web",
            "name": "api-7d9f",
            "resourceVersion": "4711",
            "labels": {"app": "api", "pod-template-hash": "7d9f"},
            "annotations": {
                "identityd.io/domain": "sports.web",
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            },
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {
            "serviceAccountName": "api",
            "serviceAccount": "api",
            "nodeName": "node-1",
            "containers": [{"name": "api", "image": "example/api:1"}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.1.2.3",
            "podIPs": [{"ip": "10.1.2.3"}],
            "startTime": "2026-11-25T10:00:00Z",
        },
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = obj
        for part in parents:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return obj


BASE = PodRecord(
    uid=UID,
    namespace="sports-web",
    name="api-7d9f",
    service_account="api",
    phase="Running",
    ips=("10.1.2.3",),
    node_name="node-1",
    labels={"app": "api", "pod-template-hash": "7d9f"},
    annotations={"identityd.io/domain": "sports.web"},
    start_time="2026-11-25T10:00:00Z",
    deletion_timestamp=None,
)


def expect(**fields: Any) -> PodRecord:
    values = {name: getattr(BASE, name) for name in PodRecord.__dataclass_fields__}
    values.update(fields)
    return PodRecord(**values)


CASES: list[tuple[str, dict[str, Any], PodRecord | None]] = [
    ("running", pod(), BASE),
    ("pending, unscheduled", pod(status__phase="Pending", spec__nodeName=None, status__podIP=None,
                                 status__podIPs=None, status__startTime=None),
     expect(phase="Pending", node_name=None, ips=(), start_time=None)),
    ("succeeded", pod(status__phase="Succeeded"), expect(phase="Succeeded")),
    ("failed", pod(status__phase="Failed"), expect(phase="Failed")),
    ("no status at all", pod(status=None),
     expect(phase="", ips=(), start_time=None)),
    ("dual-stack, v6 normalised", pod(status__podIPs=[{"ip": "10.1.2.3"},
                                                      {"ip": "fd00:0:0:0::a:1"}]),
     expect(ips=("10.1.2.3", "fd00::a:1"))),
    ("v6-primary", pod(status__podIP="FD00::1", status__podIPs=[{"ip": "fd00::1"},
                                                                  {"ip": "10.1.2.3"}]),
     expect(ips=("fd00::1", "10.1.2.3"))),
    ("podIPs only", pod(status__podIP=None), BASE),
    ("podIP only", pod(status__podIPs=None), BASE),
    ("invalid IPs dropped", pod(status__podIP="10.1.2.300",
                                status__podIPs=[{"ip": "nope"}, {"ip": "010.1.2.3"}, {"ip": 7},
                                                {}, "x", {"ip": "10.1.2.4"}]),
     expect(ips=("10.1.2.4",))),
    ("terminating", pod(metadata__deletionTimestamp="2026-11-25T11:00:00Z"),
     expect(deletion_timestamp="2026-11-25T11:00:00Z")),
    ("serviceAccount fallback", pod(spec__serviceAccountName=None, spec__serviceAccount="legacy"),
     expect(service_account="legacy")),
    ("empty serviceAccountName falls back", pod(spec__serviceAccountName="",
                                                spec__serviceAccount="legacy"),
     expect(service_account="legacy")),
    ("no service account: default", pod(spec__serviceAccountName=None,
                                        spec__serviceAccount=None),
     expect(service_account="default")),
    ("no labels or annotations", pod(metadata__labels=None, metadata__annotations=None),
     expect(labels={}, annotations={})),
    ("mistyped labels ignored", pod(metadata__labels={"app": "api", "n": 1, "x": None}),
     expect(labels={"app": "api"})),
    ("labels not a map", pod(metadata__labels=["app"]), expect(labels={})),
    ("NUL annotation dropped", pod(metadata__annotations={"identityd.io/a": "x\x00y",
                                                          "identityd.io/b": "ok"}),
     expect(annotations={"identityd.io/b": "ok"})),
    ("spec not a map", pod(spec="junk"),
     expect(service_account="default", node_name=None)),
    ("missing uid", pod(metadata__uid=None), None),
    ("empty uid", pod(metadata__uid=""), None),
    ("missing namespace", pod(metadata__namespace=None), None),
    ("missing name", pod(metadata__name=None), None),
    ("name not a string", pod(metadata__name=5), None),
    ("no metadata", pod(metadata=None), None),
]


@pytest.mark.parametrize(("obj", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_record_from_pod(obj: dict[str, Any], expected: PodRecord | None) -> None:
    assert record_from_pod(obj) == expected


def test_source_object_is_not_modified_or_kept() -> None:
    obj = pod()
    before = copy.deepcopy(obj)
    record = record_from_pod(obj)
    assert obj == before
    assert record is not None
    obj["metadata"]["labels"]["app"] = "changed"
    assert record.labels == {"app": "api", "pod-template-hash": "7d9f"}


def test_annotation_selection_by_prefix_and_exact_key() -> None:
    obj = pod(metadata__annotations={
        "identityd.io/a": "1",
        "identityd.io.evil/b": "2",
        "example.com/exact": "3",
        "example.com/exactly-not": "4",
    })
    keys = ("identityd.io/", "example.com/exact")
    record = record_from_pod(obj, annotation_keys=keys)
    assert record is not None
    assert record.annotations == {"identityd.io/a": "1", "example.com/exact": "3"}
    assert record_from_pod(obj, annotation_keys=()) == expect(annotations={})


def test_shared_strings_are_interned() -> None:
    # Built at run time so the compiler cannot share the constants for us.
    a = record_from_pod(pod(metadata__namespace="".join(["sports", "-web"])))
    b = record_from_pod(pod(metadata__uid="other", metadata__name="api-2",
                            metadata__namespace="".join(["sports-", "web"])))
    assert a is not None and b is not None
    assert a.namespace is b.namespace
    assert a.node_name is b.node_name
    assert a.phase is b.phase
    assert a.service_account is b.service_account


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2026, 11, 25, 10, 0, tzinfo=UTC), "2026-11-25T10:00:00Z"),
        (datetime(2026, 11, 25, 11, 0, tzinfo=timezone(timedelta(hours=1))),
         "2026-11-25T10:00:00Z"),
        (datetime(2026, 11, 25, 10, 0), "2026-11-25T10:00:00Z"),  # naive: taken as UTC
        ("", None),
        (12, None),
    ],
)
def test_datetimes_from_yaml_or_client_models(value: object, expected: str | None) -> None:
    record = record_from_pod(pod(status__startTime=value, metadata__deletionTimestamp=value))
    assert record is not None
    assert (record.start_time, record.deletion_timestamp) == (expected, expected)
    assert record.terminating is (expected is not None)


def test_labels_and_annotations_are_read_only() -> None:
    record = record_from_pod(pod())
    assert record is not None
    with pytest.raises(TypeError):
        record.labels["app"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        record.annotations["identityd.io/domain"] = "x"  # type: ignore[index]
    # The policy input copies them; a copy is an ordinary dict.
    copied = dict(record.labels)
    copied["app"] = "other"
    assert record.labels["app"] == "api"


def test_a_hand_built_record_copies_its_dicts() -> None:
    labels = {"app": "api"}
    record = PodRecord(uid="u", namespace="ns", name="a", service_account="sa",
                       phase="Running", ips=(), node_name=None, labels=labels)
    labels["app"] = "changed"
    assert record.labels == {"app": "api"}
    with pytest.raises(TypeError):
        record.labels["app"] = "x"  # type: ignore[index]
    assert record.annotations == {}
    with pytest.raises(TypeError, match="labels"):
        PodRecord(uid="u", namespace="ns", name="a", service_account="sa", phase="Running",
                  ips=(), node_name=None, labels=["app"])  # type: ignore[arg-type]


def test_builder_shares_equal_label_sets() -> None:
    build = RecordBuilder()
    # Separate dicts and strings for each pod, as each JSON page parses them.
    a, b, c = (build(pod(metadata__uid=f"u{i}", metadata__name=f"p{i}",
                         metadata__labels={"app": "".join(["a", "pi"]), "tier": app_tier}))
               for i, app_tier in enumerate(["web", "web", "db"]))
    assert a is not None and b is not None and c is not None
    assert a.labels is b.labels  # one mapping for both
    assert a.labels == {"app": "api", "tier": "web"}
    assert c.labels is not a.labels and c.labels == {"app": "api", "tier": "db"}
    assert build.label_sets == 2
    empty = build(pod(metadata__labels={}))
    none = build(pod(metadata__labels=None))
    assert empty is not None and none is not None and empty.labels is none.labels


def test_builder_shares_after_dropping_mistyped_labels() -> None:
    build = RecordBuilder()
    clean = build(pod(metadata__labels={"app": "api"}))
    mistyped = build(pod(metadata__labels={"app": "api", "n": 1, "l": ["x"]}))
    assert clean is not None and mistyped is not None
    assert mistyped.labels is clean.labels
    assert build.label_sets == 1


def test_builder_table_is_bounded() -> None:
    build = RecordBuilder(max_label_sets=3)
    records = [build(pod(metadata__labels={"app": f"a{i}"})) for i in range(7)]
    assert build.label_sets <= 3
    assert [r.labels for r in records if r is not None] == [{"app": f"a{i}"} for i in range(7)]
    # Past the limit it starts over and shares again.
    again = build(pod(metadata__labels={"app": "a6"}))
    assert again is not None and records[6] is not None and again.labels is records[6].labels


def test_records_without_annotations_share_one_empty_mapping() -> None:
    build = RecordBuilder()
    a = build(pod(metadata__annotations={"unrelated": "x"}))
    b = build(pod(metadata__annotations=None))
    assert a is not None and b is not None
    assert a.annotations is b.annotations and a.annotations == {}


def test_builder_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="annotation_keys"):
        RecordBuilder("identityd.io/")
    with pytest.raises(TypeError, match="annotation_keys"):
        RecordBuilder([1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_label_sets"):
        RecordBuilder(max_label_sets=-1)


def _reference_ip(text: str) -> str | None:
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


@pytest.mark.parametrize("text", [
    "10.1.2.3", "0.0.0.0", "255.255.255.255", "010.1.2.3", "10.1.2.256", "10.1.2", "10.1.2.3.4",
    "10.1.2.3 ", " 10.1.2.3", "1e1.1.1.1", "0x1.1.1.1", "\u0661.1.1.1", "10.1.2.3\x00",
    "", ".", "fd00::1", "FD00:0:0::1", "::ffff:10.1.2.3", "fe80::1%eth0", "::", "1::2::3",
])
def test_canonical_ip_agrees_with_ipaddress(text: str) -> None:
    assert canonical_ip(text) == _reference_ip(text)


@given(st.one_of(
    st.ip_addresses().map(str),
    st.lists(st.integers(0, 300).map(str) | st.sampled_from(["00", "01", "007", "", "-1"]),
             min_size=3, max_size=5).map(".".join),
    st.text(alphabet="0123456789.:abcdefABCDEF%x ", max_size=20),
))
def test_canonical_ip_agrees_with_ipaddress_on_anything(text: str) -> None:
    assert canonical_ip(text) == _reference_ip(text)
