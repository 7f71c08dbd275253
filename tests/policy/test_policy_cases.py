"""The default policies against their case files (policies/tests/*.yaml), one test per case,
on the embedded engine; plus what the case format cannot express (granted attributes)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from identityd.policy.cases import PolicyCase, deep_merge, load_bases, load_cases, run_cases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.sources import load_policy_dir

POLICIES = Path(__file__).resolve().parents[2] / "policies"
CASES = load_cases(POLICIES / "tests")
BASES = load_bases(POLICIES / "tests" / "_bases.yaml")


@pytest.fixture
async def engine() -> AsyncIterator[EmbeddedEngine]:
    async with EmbeddedEngine() as engine:
        await engine.load(load_policy_dir(POLICIES))
        yield engine


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file}::{c.name}" for c in CASES])
async def test_policy_case(engine: EmbeddedEngine, case: PolicyCase) -> None:
    [result] = await run_cases(engine, [case])
    assert result.error is None
    assert result.got == case.expected


def _contract_codes() -> set[str]:
    """The codes of the README tables introduced by 'decided by the default policies'."""
    readme = (POLICIES / "README.md").read_text(encoding="utf-8")
    codes: set[str] = set()
    for chunk in re.split("decided by the default policies", readme, flags=re.I)[1:]:
        lines = chunk.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            codes.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return codes


def test_every_policy_code_has_a_deny_case() -> None:
    codes = _contract_codes()
    assert len(codes) >= 20, "the README table was not found"
    covered = {code for case in CASES for code in case.expected.codes}
    assert codes - covered == set()
    # Every code a case expects is documented (no typo passes silently).
    assert covered - codes == set()


def test_cases_cover_allow_and_deny_for_each_file() -> None:
    for file in {c.file for c in CASES}:
        outcomes = {c.expected.allow for c in CASES if c.file == file}
        assert outcomes == {True, False}, file


async def _decide(engine: EmbeddedEngine, base: str, patch: dict[str, Any]) -> Any:
    return await engine.evaluate(deep_merge(BASES[base], patch))


async def test_allow_grants_the_configured_attributes(engine: EmbeddedEngine) -> None:
    decision = await _decide(engine, "allow", {"config": {"cert_expiry_minutes": 720,
                                                          "cert_usage": "server"}})
    assert decision.allow
    assert decision.attributes == {"certExpiryTime": "720", "certRefresh": "true",
                                   "certUsage": "server"}


async def test_deny_grants_no_attributes(engine: EmbeddedEngine) -> None:
    decision = await _decide(engine, "allow", {"pod": {"phase": "Failed"}})
    assert not decision.allow
    assert decision.attributes == {}


@pytest.mark.parametrize(
    ("patch", "refresh"),
    [
        ({"config": {"allow_refresh": False}}, "false"),
        ({"pod": {"labels": {"identityd.io/refresh": "false"}}}, "false"),
        ({"pod": {"labels": {"identityd.io/refresh": "no"}}}, "true"),
    ],
)
async def test_cert_refresh_follows_config_and_pod_label(
    engine: EmbeddedEngine, patch: dict[str, Any], refresh: str
) -> None:
    decision = await _decide(engine, "allow", patch)
    assert decision.allow
    assert decision.attributes["certRefresh"] == refresh


@pytest.mark.parametrize(
    ("annotation", "minutes"),
    [
        ("60", "60"),  # shorter: honoured
        ("1440", "1440"),
        ("100000", "1440"),  # longer: never
        ("0", "1440"),  # not a positive integer: ignored
        ("-5", "1440"),
        ("1e3", "1440"),
        ("", "1440"),
        ("sixty", "1440"),
    ],
)
async def test_pod_may_shorten_but_not_lengthen_the_lifetime(
    engine: EmbeddedEngine, annotation: str, minutes: str
) -> None:
    decision = await _decide(
        engine, "allow", {"pod": {"annotations": {"identityd.io/cert-expiry-minutes": annotation}}}
    )
    assert decision.allow
    assert decision.attributes["certExpiryTime"] == minutes


async def test_reasons_are_sorted_and_carry_detail(engine: EmbeddedEngine) -> None:
    decision = await _decide(engine, "allow", {
        "request": {"service": "admin", "attributes": {"sanDNS": ["b.evil.com", "a.evil.com"]}},
    })
    assert list(decision.reasons) == sorted(decision.reasons)
    assert "SAN_DNS_NOT_ALLOWED: a.evil.com" in decision.reasons
    assert "SAN_DNS_NOT_ALLOWED: b.evil.com" in decision.reasons
    assert any(r.startswith("SERVICE_MISMATCH: ") and "'admin'" in r for r in decision.reasons)
