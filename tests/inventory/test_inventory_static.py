"""StaticInventory: every accepted file format, and clear ConfigErrors for the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from identityd.errors import ConfigError
from identityd.inventory import PodInventory, PodRecord, StaticInventory, load_pod_file


def pod(uid: str, name: str, ip: str = "10.1.2.3", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"uid": uid, "namespace": "sports-web", "name": name, **meta},
        "spec": {"serviceAccountName": "api", "nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "startTime": "2026-11-25T10:00:00Z"},
    }


PODS = [pod("u1", "api-1", "10.1.2.3"), pod("u2", "api-2", "10.1.2.4")]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


FORMATS = {
    "json list": ("pods.json", json.dumps(PODS)),
    "json PodList": ("pods.json", json.dumps({"apiVersion": "v1", "kind": "PodList",
                                             "metadata": {"resourceVersion": "9"},
                                             "items": PODS})),
    "json without .json suffix": ("pods.txt", json.dumps(PODS)),
    "yaml list": ("pods.yaml", yaml.safe_dump(PODS)),
    "yaml PodList, items without kind": (
        "pods.yaml",
        yaml.safe_dump({"kind": "PodList", "items": [
            {k: v for k, v in p.items() if k not in ("kind", "apiVersion")} for p in PODS]}),
    ),
    "kubectl get -o yaml (kind: List)": ("pods.yml", yaml.safe_dump({"apiVersion": "v1",
                                                                     "kind": "List",
                                                                     "items": PODS})),
    "yaml multi-document": ("pods.yaml", yaml.safe_dump_all(PODS)),
    "yaml multi-document with empty docs": (
        "pods.yaml", "---\n" + yaml.safe_dump(PODS[0]) + "---\n---\n" + yaml.safe_dump(PODS[1])),
    "yaml flow list": ("pods.yaml", yaml.safe_dump(PODS, default_flow_style=True)),
}


@pytest.mark.parametrize(("name", "text"), FORMATS.values(), ids=FORMATS.keys())
async def test_each_format_loads(tmp_path: Path, name: str, text: str) -> None:
    inventory: PodInventory = StaticInventory.from_file(write(tmp_path, name, text))
    assert inventory.ready
    assert inventory.size() == 2
    first = await inventory.get_by_uid("u1")
    assert first is not None
    assert (first.name, first.ips, first.service_account) == ("api-1", ("10.1.2.3",), "api")
    assert await inventory.get("sports-web", "api-2") == await inventory.get_by_uid("u2")
    assert await inventory.get_by_uid("nope") is None
    await inventory.aclose()


def test_yaml_timestamps_stay_as_written(tmp_path: Path) -> None:
    text = """
- metadata: {uid: u1, namespace: ns, name: a, deletionTimestamp: 2026-11-25T11:00:00Z}
  status: {phase: Running, podIP: 10.0.0.1, startTime: 2026-11-25T10:00:00.5+01:00}
"""
    [record] = load_pod_file(write(tmp_path, "pods.yaml", text))
    assert record.start_time == "2026-11-25T10:00:00.5+01:00"
    assert record.deletion_timestamp == "2026-11-25T11:00:00Z"
    assert record.terminating


def test_empty_file_is_an_empty_inventory(tmp_path: Path) -> None:
    inventory = StaticInventory.from_file(write(tmp_path, "pods.yaml", ""))
    assert (inventory.ready, inventory.size()) == (True, 0)


async def test_from_records() -> None:
    record = PodRecord(uid="u1", namespace="ns", name="a", service_account="sa",
                       phase="Running", ips=(), node_name=None)
    inventory = StaticInventory([record])
    assert await inventory.get("ns", "a") is record
    with pytest.raises(ConfigError, match="not read from a file"):
        inventory.reload()


async def test_reload_rereads_and_keeps_pods_on_error(tmp_path: Path) -> None:
    path = write(tmp_path, "pods.json", json.dumps(PODS[:1]))
    inventory = StaticInventory.from_file(path)
    assert inventory.size() == 1
    path.write_text(json.dumps(PODS), encoding="utf-8")
    assert inventory.reload() == 2
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(ConfigError):
        inventory.reload()
    assert inventory.size() == 2
    assert await inventory.get_by_uid("u2") is not None


async def test_annotation_keys_are_passed_through(tmp_path: Path) -> None:
    obj = pod("u1", "a", annotations={"identityd.io/x": "1", "team.example/owner": "me"})
    path = write(tmp_path, "pods.json", json.dumps([obj]))
    [default] = load_pod_file(path)
    assert default.annotations == {"identityd.io/x": "1"}
    inventory = StaticInventory.from_file(path, annotation_keys=("team.example/owner",))
    first = await inventory.get_by_uid("u1")
    inventory.reload()  # the keys survive a reload
    record = await inventory.get_by_uid("u1")
    assert first is not None and record is not None
    assert first.annotations == record.annotations == {"team.example/owner": "me"}


ERRORS = {
    "bad json": ("pods.json", "[{]", "invalid JSON"),
    "bad yaml": ("pods.yaml", "- a: [1\n- b", "invalid YAML"),
    "scalar document": ("pods.yaml", "42\n", "expected a Pod, a list of Pods or a PodList"),
    "item not a mapping": ("pods.json", json.dumps([PODS[0], "x"]), "item 1: expected a Pod"),
    "other kind": ("pods.json", json.dumps([{**PODS[0], "kind": "Service"}]),
                   "item 0: kind 'Service' is not a Pod"),
    "PodList without items": ("pods.json", json.dumps({"kind": "PodList"}),
                              "PodList without items"),
    "missing uid": ("pods.json", json.dumps([pod("", "a")]), "needs metadata.uid"),
    "duplicate uid": ("pods.json", json.dumps([pod("u1", "a"), pod("u1", "b")]),
                      "item 1: uid u1 given twice"),
    "duplicate name": ("pods.json", json.dumps([pod("u1", "a"), pod("u2", "a")]),
                       "item 1: pod sports-web/a given twice"),
    "not utf-8": ("pods.yaml", None, "not UTF-8"),
}


@pytest.mark.parametrize(("name", "text", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_invalid_files(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    path = tmp_path / name
    if text is None:
        path.write_bytes(b"\xff\xfe- x")
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        StaticInventory.from_file(path)
    assert info.value.code == "POD_FILE_INVALID"
    assert message in info.value.detail
    assert str(path) in info.value.detail


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read pod file: No such file"):
        StaticInventory.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read pod file: Is a directory"):
        StaticInventory.from_file(tmp_path)


async def test_uid_hint_is_ignored() -> None:
    record = PodRecord(uid="u1", namespace="ns", name="a", service_account="sa",
                       phase="Running", ips=(), node_name=None)
    inventory = StaticInventory([record])
    assert await inventory.get("ns", "a", uid="u1") is record
    assert await inventory.get("ns", "a", uid="another") is record  # the caller compares
    assert await inventory.get("ns", "b", uid="u1") is None
