"""The embedded engine: loading and swapping sets, and every way a decision can fail
(undefined, malformed, engine error, timeout) ending as PolicyUnavailable, never an allow."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from identityd.errors import BadRequest, PolicyCompileError, PolicyUnavailable
from identityd.policy.cases import load_bases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.sources import load_policy_dir

POLICIES = Path(__file__).resolve().parents[2] / "policies"

HEADER = "package identityd\n\nimport rego.v1\n\n"
# Denies with the input's `tag`, so a test can tell which set answered.
TAGGED = (
    HEADER
    + """
tag := object.get(input, "tag", "none")

decision := {"allow": false, "reasons": [concat("", ["TAGGED: ", tag])], "attributes": {}}
"""
)
ALLOW_ALL = (
    HEADER
    + """
decision := {"allow": true, "reasons": [], "attributes": {"certUsage": "client"}}
"""
)


@pytest.fixture
async def engine() -> AsyncIterator[EmbeddedEngine]:
    async with EmbeddedEngine() as engine:
        yield engine


async def _codes(engine: EmbeddedEngine, doc: dict[str, object]) -> tuple[str, ...]:
    return (await engine.evaluate(doc)).codes


async def test_not_loaded_is_unavailable(engine: EmbeddedEngine) -> None:
    assert not engine.ready
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({})
    assert info.value.code == "POLICY_NOT_LOADED"


async def test_load_then_evaluate(engine: EmbeddedEngine) -> None:
    await engine.load({"p.rego": TAGGED})
    assert engine.ready
    assert engine.module_ids == ("p.rego",)
    decision = await engine.evaluate({"tag": "one"})
    assert not decision.allow
    assert decision.reasons == ("TAGGED: one",)


async def test_allow_decision_carries_attributes(engine: EmbeddedEngine) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    decision = await engine.evaluate({})
    assert decision.allow
    assert decision.attributes == {"certUsage": "client"}


async def test_default_policies_decide_the_allow_base(engine: EmbeddedEngine) -> None:
    await engine.load(load_policy_dir(POLICIES))
    base = load_bases(POLICIES / "tests" / "_bases.yaml")["allow"]
    decision = await engine.evaluate(base)
    assert decision.allow, decision.reasons
    assert decision.attributes["certExpiryTime"] == "1440"


async def test_new_set_replaces_the_old_one(engine: EmbeddedEngine) -> None:
    await engine.load({"p.rego": TAGGED})
    await engine.load({"q.rego": ALLOW_ALL})
    assert engine.module_ids == ("q.rego",)
    assert (await engine.evaluate({"tag": "x"})).allow


@pytest.mark.parametrize(
    ("modules", "module"),
    [
        ({"broken.rego": HEADER + "decision := {{{\n"}, "broken.rego"),
        ({"ok.rego": ALLOW_ALL, "broken.rego": HEADER + "allow if {\n"}, "broken.rego"),
        ({"with.rego": HEADER + "decision := x with input as {}\n"}, "with.rego"),
    ],
)
async def test_compile_error_keeps_the_previous_set(
    engine: EmbeddedEngine, modules: dict[str, str], module: str
) -> None:
    await engine.load({"p.rego": TAGGED})
    with pytest.raises(PolicyCompileError) as info:
        await engine.load(modules)
    assert info.value.module == module
    assert engine.ready
    assert engine.module_ids == ("p.rego",)
    assert await _codes(engine, {"tag": "still"}) == ("TAGGED",)


@pytest.mark.parametrize(
    "source",
    [
        HEADER + "decision := 1 if input.never\n",  # undefined on the smoke input
        HEADER + 'decision := "allow"\n',  # not an object
        HEADER + 'decision := {"allow": true, "reasons": ["X: y"]}\n',  # allow with reasons
        HEADER + "other := 1\n",  # no decision at all
        'package elsewhere\n\nimport rego.v1\n\ndecision := {"allow": true}\n',
    ],
)
async def test_a_set_without_a_usable_decision_is_refused(
    engine: EmbeddedEngine, source: str
) -> None:
    await engine.load({"p.rego": TAGGED})
    with pytest.raises(PolicyCompileError):
        await engine.load({"bad.rego": source})
    assert await _codes(engine, {}) == ("TAGGED",)


async def test_first_load_failure_leaves_the_engine_not_ready(engine: EmbeddedEngine) -> None:
    with pytest.raises(PolicyCompileError):
        await engine.load({"bad.rego": HEADER + "decision := {{{\n"})
    assert not engine.ready
    with pytest.raises(PolicyUnavailable):
        await engine.evaluate({})


async def test_empty_set_is_refused(engine: EmbeddedEngine) -> None:
    with pytest.raises(PolicyCompileError):
        await engine.load({})


async def test_undefined_decision_is_unavailable(engine: EmbeddedEngine) -> None:
    await engine.load(
        {
            "p.rego": HEADER
            + """
decision := {"allow": false, "reasons": ["X: y"], "attributes": {}} if not input.undefine
"""
        }
    )
    assert await _codes(engine, {}) == ("X",)
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({"undefine": True})
    assert info.value.code == "POLICY_UNDEFINED"


async def test_allow_with_reasons_is_a_bad_decision(engine: EmbeddedEngine) -> None:
    await engine.load(
        {
            "p.rego": HEADER
            + """
decision := {"allow": object.get(input, "allow", false), "reasons": ["X: y"], "attributes": {}}
"""
        }
    )
    assert await _codes(engine, {}) == ("X",)
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({"allow": True})
    assert info.value.code == "POLICY_BAD_DECISION"


@pytest.mark.parametrize(
    "rule",
    [
        # conflicting values: regopy answers `<error>`
        'decision := {"allow": false, "reasons": ["A: a"]} if input.boom\n'
        'decision := {"allow": true} if input.boom',
        # a builtin error becomes a value inside the JSON
        'decision := {"allow": to_number("x")} if input.boom',
        # sprintf around a computed string: regopy emits invalid JSON
        'decision := {"allow": false, "reasons": [sprintf("A: %s", [lower("X")])]} if input.boom',
    ],
)
async def test_engine_error_is_unavailable(engine: EmbeddedEngine, rule: str) -> None:
    await engine.load(
        {
            "p.rego": HEADER
            + rule
            + "\n"
            + """
decision := {"allow": false, "reasons": ["SAFE: s"]} if not input.boom
"""
        }
    )
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({"boom": True})
    assert info.value.code == "POLICY_ENGINE_ERROR"
    # The engine stays usable afterwards.
    assert await _codes(engine, {}) == ("SAFE",)


async def test_a_builtins_error_fails_the_decision_rather_than_allowing(
    engine: EmbeddedEngine,
) -> None:
    # Undefined on the error (regopy's and OPA's default) would skip the deny: allow.
    await engine.load(
        {
            "p.rego": HEADER
            + """
n := to_number(input.x)

decision := {"allow": false, "reasons": ["DENY: number"], "attributes": {}} if n
else := {"allow": true, "reasons": [], "attributes": {"certUsage": "client"}}
"""
        }
    )
    assert await _codes(engine, {"x": "1"}) == ("DENY",)
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({"x": "not a number"})
    assert info.value.code == "POLICY_ENGINE_ERROR"


async def test_error_text_as_data_is_not_an_engine_error(engine: EmbeddedEngine) -> None:
    await engine.load({"p.rego": TAGGED})
    decision = await engine.evaluate({"tag": "<error>"})
    assert decision.reasons == ("TAGGED: <error>",)


# ~0.3 s on the test machine for n=600; the smoke input (no n) is instant.
SLOW = (
    HEADER
    + """
n := object.get(input, "n", 1)

work := count([1 | some i in numbers.range(1, n); some j in numbers.range(1, n)])

decision := {"allow": false, "reasons": [concat("", ["SLOW: ", format_int(work, 10)])],
             "attributes": {}}
"""
)


async def test_decision_over_the_timeout_is_unavailable_and_the_engine_recovers() -> None:
    async with EmbeddedEngine(timeout=0.05) as engine:
        await engine.load({"slow.rego": SLOW})
        # The slow decision is computed (in-line: it cannot be interrupted) but
        # comes too late to be trusted: 503, not its answer.
        with pytest.raises(PolicyUnavailable) as info:
            await engine.evaluate({"n": 600})
        assert info.value.code == "POLICY_TIMEOUT"
        assert engine.ready
        # The next decision within the timeout is answered as usual.
        assert await _codes(engine, {"n": 2}) == ("SLOW",)


async def test_a_decision_within_the_timeout_is_answered_however_long() -> None:
    async with EmbeddedEngine(timeout=5) as engine:
        await engine.load({"slow.rego": SLOW})
        started = time.monotonic()
        assert (await engine.evaluate({"n": 400})).reasons == ("SLOW: 160000",)
        assert time.monotonic() - started > 0.01  # it did the work


def test_the_engine_runs_no_thread_of_its_own() -> None:
    # In-line by design (module docstring): a thread per engine would cost a GIL
    # hand-off per decision; the serve watchdog covers a wedged evaluation.
    before = threading.active_count()

    async def run() -> None:
        async with EmbeddedEngine() as engine:
            await engine.load({"p.rego": TAGGED})
            assert await _codes(engine, {"tag": "x"}) == ("TAGGED",)
            assert threading.active_count() == before

    asyncio.run(run())


async def test_concurrent_decisions_each_get_their_own_input(engine: EmbeddedEngine) -> None:
    await engine.load({"p.rego": TAGGED})
    tags = [f"t{i}" for i in range(40)]
    decisions = await asyncio.gather(*(engine.evaluate({"tag": t}) for t in tags))
    assert [d.reasons for d in decisions] == [(f"TAGGED: {t}",) for t in tags]


async def test_input_that_is_not_json_is_refused(engine: EmbeddedEngine) -> None:
    await engine.load({"p.rego": TAGGED})
    for doc in ({"x": float("nan")}, {"x": object()}, {"x": "a\x00b"}):
        with pytest.raises(BadRequest):
            await engine.evaluate(doc)
    with pytest.raises(TypeError):
        await engine.evaluate(["not", "a", "mapping"])  # type: ignore[arg-type]


async def test_closed_engine_is_unavailable() -> None:
    engine = EmbeddedEngine()
    await engine.load({"p.rego": TAGGED})
    await engine.aclose()
    await engine.aclose()  # idempotent
    assert not engine.ready
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({})
    assert info.value.code == "POLICY_NOT_LOADED"
    with pytest.raises(PolicyCompileError):
        await engine.load({"p.rego": TAGGED})


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        EmbeddedEngine(timeout=timeout)


def test_timeout_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="timeout"):
        EmbeddedEngine(timeout="2")  # type: ignore[arg-type]
