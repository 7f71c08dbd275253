"""The default policies ship as one ConfigMap, labelled for the policy sync,
whose data is exactly the modules identityd loads from `policies/`."""

from __future__ import annotations

from pathlib import Path

from deploy_support import (
    K8S,
    POLICY_LABEL,
    REGENERATE,
    SYSTEM_NAMESPACE,
    Obj,
    load_yaml_file,
    policy_copy_problems,
    policy_files,
)


def policy_configmaps(objs: list[Obj]) -> list[Obj]:
    key, value = POLICY_LABEL
    return [
        o
        for o in objs
        if o["kind"] == "ConfigMap" and (o["metadata"].get("labels") or {}).get(key) == value
    ]


def test_the_policy_configmap_equals_policies(base: list[Obj]) -> None:
    (configmap,) = policy_configmaps(base)
    assert configmap["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert "binaryData" not in configmap
    assert configmap["data"] == policy_files(), REGENERATE


def test_the_policy_configmap_keeps_its_name(base: list[Obj]) -> None:
    # A hash suffix would leave the previous ConfigMap, with the same label and
    # modules, behind after an update; both would load and conflict.
    (configmap,) = policy_configmaps(base)
    assert configmap["metadata"]["name"] == "identityd-policies"


def test_the_k8s_copy_of_the_policies_is_current() -> None:
    assert policy_copy_problems() == [], REGENERATE


def test_a_stale_copy_is_caught(tmp_path: Path) -> None:
    for name, source in policy_files().items():
        (tmp_path / name).write_text(source)
    assert policy_copy_problems(tmp_path) == []
    (tmp_path / "pod.rego").write_text("package identityd\n")
    (tmp_path / "san.rego").unlink()
    (tmp_path / "extra.rego").write_text("package identityd\n")
    assert policy_copy_problems(tmp_path) == [
        "san.rego is missing from the copy",
        "extra.rego is in the copy only",
        "pod.rego differs from policies/",
    ]


def test_the_generator_lists_every_copied_module() -> None:
    kustomization = load_yaml_file(K8S / "kustomization.yaml")[0]
    (generator,) = kustomization["configMapGenerator"]
    listed = sorted(f.removeprefix("policies/") for f in generator["files"])
    assert listed == sorted(policy_files()), REGENERATE


def test_the_policies_fit_in_a_client_side_apply(base: list[Obj]) -> None:
    # `kubectl apply` copies the object into an annotation; all annotations of
    # an object together may not exceed 256 KiB.
    (configmap,) = policy_configmaps(base)
    assert sum(len(v.encode()) for v in configmap["data"].values()) < 200 * 1024


def test_the_policy_set_leaves_the_case_files_out() -> None:
    files = policy_files()
    assert files and all(name.endswith(".rego") for name in files)
    assert "decision.rego" in files
