"""One policy suite, both engines: every default case (policies/tests) gives the same
decision through OPAEngine as through EmbeddedEngine. Always against the OPA REST
double; also against a real OPA when one is available (an `opa` binary on PATH, or
OPA_URL) — the real OPA is the authority on what compiles (REGO_PORTABILITY.md)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from identityd.errors import PolicyCompileError
from identityd.policy.cases import Outcome, PolicyCase, load_cases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.opa import OPAEngine
from identityd.policy.sources import load_policy_dir
from tests.doubles.opa_server import OPADouble, real_opa, real_opa_unavailable_reason

pytestmark = pytest.mark.asyncio(loop_scope="module")

POLICIES = Path(__file__).resolve().parents[2] / "policies"
MODULES = load_policy_dir(POLICIES)
CASES = load_cases(POLICIES / "tests")
BACKENDS = ["double", "real-opa"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedded() -> AsyncIterator[EmbeddedEngine]:
    async with EmbeddedEngine() as engine:
        await engine.load(MODULES)
        yield engine


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["double", "real-opa"])
async def opa_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "double":
        async with OPADouble() as opa:
            yield opa.url
        return
    reason = real_opa_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    async with real_opa() as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_opa_url() -> AsyncIterator[str]:
    reason = real_opa_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    async with real_opa() as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def opa_engine(opa_url: str) -> AsyncIterator[OPAEngine]:
    # A prefix of our own, in case OPA_URL names a shared OPA.
    prefix = f"identityd-test-{uuid.uuid4().hex[:8]}/"
    async with OPAEngine(opa_url, id_prefix=prefix) as engine:
        await engine.load(MODULES)
        yield engine
    await _delete_prefixed(opa_url, prefix)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file}::{c.name}" for c in CASES])
async def test_same_decision_on_both_engines(
    embedded: EmbeddedEngine, opa_engine: OPAEngine, case: PolicyCase
) -> None:
    want = await embedded.evaluate(case.input)
    got = await opa_engine.evaluate(case.input)
    assert got == want
    assert Outcome(got.allow, frozenset(got.codes)) == case.expected


async def test_suite_is_not_empty() -> None:
    assert len(CASES) >= 50
    assert {c.expected.allow for c in CASES} == {True, False}


async def test_opa_rejects_what_regopy_accepts(real_opa_url: str) -> None:
    """regopy compiles an unsafe variable silently; OPA refuses it, and the engine says
    so with OPA's own error. Only a real OPA can show this: the double uses regopy."""
    unsafe = "package identityd_unsafe\n\nimport rego.v1\n\nbad if { x > 1 }\n"
    async with EmbeddedEngine() as embedded:
        await embedded.load({**MODULES, "unsafe.rego": unsafe})  # accepted
    prefix = f"identityd-test-{uuid.uuid4().hex[:8]}/"
    async with OPAEngine(real_opa_url, id_prefix=prefix) as engine:
        with pytest.raises(PolicyCompileError) as info:
            await engine.load({**MODULES, "unsafe.rego": unsafe})
    await _delete_prefixed(real_opa_url, prefix)
    assert info.value.module == "unsafe.rego"
    assert "rego_unsafe_var_error" in info.value.detail


async def _delete_prefixed(url: str, prefix: str) -> None:
    """Remove the test's policies from a shared OPA. OPA refuses to delete a policy the
    rest depends on (400 invalid_operation), so deletions go in passes."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/policies") as resp:
            body = await resp.json()
        left = [p["id"] for p in body.get("result", []) if p["id"].startswith(prefix)]
        while left:
            refused = []
            for policy_id in left:
                async with http.delete(f"{url}/v1/policies/{policy_id}") as resp:
                    if resp.status != 200:
                        assert resp.status == 400, await resp.text()
                        refused.append(policy_id)
            assert len(refused) < len(left), f"OPA keeps refusing to delete {refused}"
            left = refused
