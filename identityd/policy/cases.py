"""Policy test cases as data: an input document in, the expected decision out.

Case files (``policies/tests/*.yaml``, format in ``policies/README.md``) run
through the normal decision query of any PolicyEngine, so one suite proves
every engine. Loading and comparing are pure; only :func:`run_cases` awaits.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from identityd.errors import ConfigError, PolicyUnavailable
from identityd.policy.base import PolicyEngine

__all__ = [
    "BASES_FILE",
    "CaseResult",
    "Outcome",
    "PolicyCase",
    "deep_merge",
    "format_report",
    "load_bases",
    "load_case_file",
    "load_cases",
    "run_cases",
]

BASES_FILE = "_bases.yaml"
_CASE_KEYS = frozenset({"name", "input", "base", "patch", "expect"})
_EXPECT_KEYS = frozenset({"allow", "reasons"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a case checks: allow and the exact set of reason codes."""

    allow: bool
    codes: frozenset[str]

    def describe(self) -> str:
        codes = ", ".join(sorted(self.codes)) or "-"
        return f"allow={str(self.allow).lower()} reasons=[{codes}]"


@dataclass(frozen=True, slots=True)
class PolicyCase:
    name: str
    file: str
    input: Mapping[str, Any]
    expected: Outcome


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    file: str
    passed: bool
    expected: Outcome
    got: Outcome | None = None
    error: str | None = None  # the engine could not decide: "CODE: detail"


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in: objects merge key by key, a null deletes
    the key, anything else (lists included) replaces. Neither argument changes."""
    merged = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_bases(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The named base documents of ``_bases.yaml``."""
    data = _read_yaml(Path(path))
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in data.items()
    ):
        raise ConfigError("POLICY_CASES_INVALID", f"{path}: expected a map of name -> document")
    return data


def load_case_file(
    path: str | os.PathLike[str], bases: Mapping[str, Mapping[str, Any]]
) -> list[PolicyCase]:
    file = Path(path)
    data = _read_yaml(file)
    entries = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError("POLICY_CASES_INVALID", f"{file.name}: expected a top-level 'cases' list")
    cases = [_parse_case(file.name, i, entry, bases) for i, entry in enumerate(entries)]
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError("POLICY_CASES_INVALID", f"{file.name}: duplicate names {duplicates}")
    return cases


def load_cases(directory: str | os.PathLike[str]) -> list[PolicyCase]:
    """Every case of ``directory/*.yaml`` (sorted by file), bases from ``_bases.yaml``."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError("POLICY_CASES_INVALID", f"{root}: not a directory")
    bases_file = root / BASES_FILE
    bases = load_bases(bases_file) if bases_file.exists() else {}
    files = sorted(p for p in root.glob("*.yaml") if not p.name.startswith("_"))
    if not files:
        raise ConfigError("POLICY_CASES_INVALID", f"{root}: no case files")
    return [case for file in files for case in load_case_file(file, bases)]


async def run_cases(engine: PolicyEngine, cases: Iterable[PolicyCase]) -> list[CaseResult]:
    """Evaluate each case in turn; an engine that cannot decide fails that case."""
    results: list[CaseResult] = []
    for case in cases:
        try:
            decision = await engine.evaluate(case.input)
        except PolicyUnavailable as exc:
            results.append(CaseResult(case.name, case.file, False, case.expected, error=str(exc)))
            continue
        got = Outcome(decision.allow, frozenset(decision.codes))
        results.append(CaseResult(case.name, case.file, got == case.expected, case.expected, got))
    return results


def format_report(results: Sequence[CaseResult], *, verbose: bool = False) -> str:
    """A plain-text report: failures in full, passes only when ``verbose``."""
    lines: list[str] = []
    for r in results:
        if r.passed:
            if verbose:
                lines.append(f"PASS {r.file}: {r.name}")
            continue
        lines.append(f"FAIL {r.file}: {r.name}")
        lines.append(f"  expected {r.expected.describe()}")
        if r.error is not None:
            lines.append(f"  error    {r.error}")
        elif r.got is not None:
            lines.append(f"  got      {r.got.describe()}")
    failed = sum(1 for r in results if not r.passed)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


# --- parsing ----------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as stream:
            return yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("POLICY_CASES_INVALID", f"{path.name}: {exc}") from exc


def _parse_case(
    file: str, index: int, entry: object, bases: Mapping[str, Mapping[str, Any]]
) -> PolicyCase:
    where = f"{file}: case {index + 1}"

    def invalid(detail: str) -> ConfigError:
        return ConfigError("POLICY_CASES_INVALID", f"{where}: {detail}")

    if not isinstance(entry, dict):
        raise invalid("expected a map")
    unknown = sorted(set(entry) - _CASE_KEYS)
    if unknown:
        raise invalid(f"unknown keys {unknown}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("'name' must be a non-empty string")
    where = f"{file}: {name}"

    if ("input" in entry) == ("base" in entry):
        raise invalid("give exactly one of 'input' and 'base'")
    if "input" in entry:
        document = entry["input"]
        if not isinstance(document, dict):
            raise invalid("'input' must be a map")
        if "patch" in entry:
            raise invalid("'patch' goes with 'base', not 'input'")
    else:
        base = bases.get(entry["base"]) if isinstance(entry["base"], str) else None
        if base is None:
            raise invalid(f"unknown base {entry['base']!r}")
        patch = entry.get("patch", {})
        if not isinstance(patch, dict):
            raise invalid("'patch' must be a map")
        document = deep_merge(base, patch)
    try:
        # YAML has types JSON lacks (dates, sets): catch them here, not in the engine.
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise invalid(f"the input is not JSON ({exc}); quote dates and times") from None

    expect = entry.get("expect")
    if not isinstance(expect, dict) or set(expect) - _EXPECT_KEYS:
        raise invalid("'expect' must be a map with 'allow' and 'reasons'")
    allow = expect.get("allow")
    reasons = expect.get("reasons", [])
    if not isinstance(allow, bool):
        raise invalid("'expect.allow' must be true or false")
    if not isinstance(reasons, list) or not all(isinstance(r, str) and r for r in reasons):
        raise invalid("'expect.reasons' must be a list of reason codes")
    if allow and reasons:
        raise invalid("an allow has no reasons")
    return PolicyCase(name, file, document, Outcome(allow, frozenset(reasons)))
