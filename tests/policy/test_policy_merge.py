"""merge_by_package: a policy set as one OPA policy per package, rows kept, imports
merged, and errors mapped back to the module and row that wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest

from identityd.errors import PolicyCompileError
from identityd.policy.merge import merge_by_package
from identityd.policy.sources import load_policy_dir

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"

A = "# a header comment\npackage identityd\n\nimport rego.v1\n\nx := 1\n"
B = "package identityd\nimport rego.v1\nimport data.lib.helpers as h  # why\n\ny := h.f(2)\n"
C = "package identityd.lib\n\nimport rego.v1\n\nz := 3\n"


def test_modules_of_one_package_become_one_policy_with_every_row_in_place() -> None:
    merged = merge_by_package({"a.rego": A, "b.rego": B, "c.rego": C})
    assert list(merged) == ["package/identityd", "package/identityd.lib"]
    one = merged["package/identityd"]
    assert one.module_ids == ("a.rego", "b.rego")
    lines = one.source.split("\n")
    assert lines[:3] == ["package identityd", "import rego.v1", "import data.lib.helpers as h"]
    for part, source in zip(one.parts, (A, B), strict=True):
        own = source.split("\n")
        held = lines[part.first_row - 1 : part.first_row - 1 + part.rows]
        assert len(held) == len(own)
        for mine, theirs in zip(own, held, strict=True):
            header = mine.startswith(("package ", "import "))
            assert theirs == (f"# {mine}" if header else mine)
    # Every row of a module maps back to itself; the header rows to none.
    for part in one.parts:
        for row in range(1, part.rows + 1):
            assert one.locate(part.first_row + row - 1) == (part.module_id, row)
    assert one.locate(1) is None


def test_the_same_import_name_for_two_documents_is_refused_naming_the_module() -> None:
    clash = "package identityd\n\nimport data.other.helpers as h\n\nw := 1\n"
    with pytest.raises(PolicyCompileError) as info:
        merge_by_package({"b.rego": B, "d.rego": clash})
    assert info.value.module == "d.rego"
    assert "import 'h'" in info.value.detail


def test_a_module_without_a_package_is_refused() -> None:
    with pytest.raises(PolicyCompileError) as info:
        merge_by_package({"a.rego": A, "bad.rego": "# only\nx := 1\n"})
    assert info.value.module == "bad.rego"


def test_the_default_policies_are_one_policy() -> None:
    modules = load_policy_dir(REPO_POLICIES)
    merged = merge_by_package(modules)
    assert list(merged) == ["package/identityd"]
    assert set(merged["package/identityd"].module_ids) == set(modules)
