"""record_from_pod: Kubernetes JSON Pod objects in, slim records out (table-driven)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from identityd.inventory import PodRecord, record_from_pod

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
    resource_version="4711",
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
    ("no resourceVersion", pod(metadata__resourceVersion=None), expect(resource_version="")),
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
