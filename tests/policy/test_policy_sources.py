"""Loading a policy directory, and the load-time guard against `with`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from identityd.errors import ConfigError, PolicyCompileError
from identityd.policy.sources import load_policy_dir, refuse_with

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def _write(root: Path, relative: str, text: str = "package identityd\n") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_loads_rego_files_recursively_sorted_by_relative_path(tmp_path: Path) -> None:
    _write(tmp_path, "z.rego", "package z\n")
    _write(tmp_path, "identityd/b.rego", "package b\n")
    _write(tmp_path, "identityd/a.rego", "package a\n")
    _write(tmp_path, "README.md", "# not policy")
    _write(tmp_path, "identityd/notes.txt", "nor this")
    modules = load_policy_dir(tmp_path)
    assert list(modules) == ["identityd/a.rego", "identityd/b.rego", "z.rego"]
    assert modules["identityd/b.rego"] == "package b\n"


def test_skips_the_tests_folder_and_hidden_entries(tmp_path: Path) -> None:
    _write(tmp_path, "p.rego")
    _write(tmp_path, "tests/case_helpers.rego")
    _write(tmp_path, ".hidden/x.rego")
    _write(tmp_path, ".y.rego")
    _write(tmp_path, "deep/tests/kept.rego")  # only the top-level tests/ is data
    assert list(load_policy_dir(tmp_path)) == ["deep/tests/kept.rego", "p.rego"]


def test_configmap_volume_layout_loads_each_module_once(tmp_path: Path) -> None:
    # kubelet: ..2026_01_01/x.rego, ..data -> ..2026_01_01, x.rego -> ..data/x.rego
    _write(tmp_path, "..2026_01_01/x.rego", "package x\n")
    os.symlink("..2026_01_01", tmp_path / "..data")
    os.symlink("..data/x.rego", tmp_path / "x.rego")
    assert load_policy_dir(tmp_path) == {"x.rego": "package x\n"}


def test_default_policies_load() -> None:
    modules = load_policy_dir(POLICIES)
    assert "identityd/decision.rego" in modules
    assert not any(m.startswith("tests/") for m in modules)


def test_empty_directory_is_a_config_error(tmp_path: Path) -> None:
    _write(tmp_path, "tests/only.rego")
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path)
    assert info.value.code == "POLICY_DIR_EMPTY"


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path / "nope")
    assert info.value.code == "POLICY_DIR_UNREADABLE"


def test_undecodable_module_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.rego").write_bytes(b"package x\n\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path)
    assert info.value.code == "POLICY_DIR_UNREADABLE"
    assert "bad.rego" in info.value.detail


# --- the `with` guard: regression for the regopy SIGSEGV (REGO_PORTABILITY.md) ---

@pytest.mark.parametrize(
    "source",
    [
        "allow if not bad with input as {}\n",
        "x := count(reasons) == 0 with input as {}",
        "allow if { allow2\twith input.a as 1 }",
        "allow if {\n  f(1)\n}\nwith",
        'x := "a" # trailing comment\ny := 1 with data.z as 2',
        'x := "unterminated with input as 1',
        "x := `unterminated raw with input",
        "x := input.with",
    ],
)
def test_refuses_the_with_keyword(source: str) -> None:
    with pytest.raises(PolicyCompileError) as info:
        refuse_with("m.rego", source)
    assert info.value.module == "m.rego"
    assert info.value.code == "POLICY_COMPILE_ERROR"


def test_names_the_line_of_the_with() -> None:
    with pytest.raises(PolicyCompileError) as info:
        refuse_with("m.rego", "package p\n\nallow if x with input as {}\n")
    assert "line 3" in info.value.detail


@pytest.mark.parametrize(
    "source",
    [
        "# test_allow if allow with input as {...}\nallow := true",
        'msg := "allowed with a warning"',
        'msg := "escaped \\" with quote"',
        "msg := `raw\nwith newline`",
        "without := 1\nwithx := without\nwith_ := 2\n_with := 3",
        "notwith := 1",
        'x := concat("", ["with", "out"]) # with',
    ],
)
def test_accepts_with_in_comments_strings_and_identifiers(source: str) -> None:
    refuse_with("m.rego", source)


def test_default_policies_pass_the_guard() -> None:
    for module_id, source in load_policy_dir(POLICIES).items():
        refuse_with(module_id, source)
