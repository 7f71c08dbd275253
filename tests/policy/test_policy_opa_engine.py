"""OPAEngine against the OPA REST double over real HTTP: pushing sets, every way a
decision can fail (timeout, refused, undefined, engine error) ending as
PolicyUnavailable, compile errors with OPA's message, and OPA restarts."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType
from typing import Any

import pytest

from identityd.errors import BadRequest, PolicyCompileError, PolicyUnavailable
from identityd.policy.merge import merge_by_package
from identityd.policy.opa import OPAEngine
from tests.doubles.opa_server import OPADouble

HEADER = "package identityd\n\nimport rego.v1\n\n"


# Denies with the input's `tag` and the set's name, so a test can tell which set answered.
def tagged(name: str) -> str:
    return HEADER + (
        'tag := object.get(input, "tag", "none")\n\n'
        f'decision := {{"allow": false, "reasons": [concat("", ["{name}: ", tag])], '
        '"attributes": {}}\n'
    )


ALLOW_ALL = HEADER + (
    'decision := {"allow": true, "reasons": [], "attributes": {"certUsage": "client"}}\n'
)
HELPER = HEADER + 'label := "from-helper"\n'
USES_HELPER = HEADER + (
    'decision := {"allow": false, "reasons": [concat("", ["HELPER: ", label])], "attributes": {}}\n'
)
BROKEN = HEADER + 'decision := {\n  "allow": true,\n'
NO_DECISION = HEADER + "other := 1\n"
# Two modules that each call the other's function: OPA refuses either one alone.
CALLS_B = HEADER + (
    'a_part(x) := concat("", ["a:", x])\n\n'
    'decision := {"allow": false, "reasons": [b_part("z")], "attributes": {}}\n'
)
CALLS_A = HEADER + 'b_part(x) := a_part(concat("", ["b:", x]))\n'
OURS = "identityd/package/identityd"  # the one policy of package identityd


def as_pushed(modules: Mapping[str, str], prefix: str = "identityd/") -> dict[str, str]:
    """What OPA holds for ``modules``: one merged policy per package."""
    return {prefix + p: merged.source for p, merged in merge_by_package(modules).items()}


@pytest.fixture
async def opa() -> AsyncIterator[OPADouble]:
    async with OPADouble() as opa:
        yield opa


@pytest.fixture
async def engine(opa: OPADouble) -> AsyncIterator[OPAEngine]:
    # A long interval: tests drive the check themselves unless they say otherwise.
    async with OPAEngine(opa.url, timeout=1.0, check_interval=60) as engine:
        yield engine


async def codes(engine: OPAEngine, doc: Mapping[str, object] | None = None) -> tuple[str, ...]:
    return (await engine.evaluate(doc or {})).reasons


async def unavailable(engine: OPAEngine, doc: dict[str, object] | None = None) -> str:
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate(doc or {})
    return info.value.code


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not hold in time")


# --- loading ---------------------------------------------------------------------------


async def test_not_loaded_is_unavailable(engine: OPAEngine) -> None:
    assert not engine.ready
    assert await unavailable(engine) == "POLICY_NOT_LOADED"


async def test_load_pushes_under_the_prefix_and_decides(
    opa: OPADouble, engine: OPAEngine
) -> None:
    await engine.load({"p.rego": tagged("ONE")})
    assert engine.ready
    assert engine.module_ids == ("p.rego",)
    assert list(opa.policies) == [OURS]
    # The module's own lines, rows unchanged, its header commented out under one header.
    held = opa.policies[OURS].split("\n")
    own = tagged("ONE").split("\n")
    assert held[0] == "package identityd"
    assert "import rego.v1" in held[1:3]
    start = held.index("# --- module p.rego") + 1
    assert held[start:start + len(own)] == [
        f"# {line}" if line.startswith(("package ", "import ")) else line for line in own
    ]
    assert await codes(engine, {"tag": "x"}) == ("ONE: x",)
    [put] = [r for r in opa.requests if r.method == "PUT"]
    assert put.path == "/v1/policies/" + OURS
    assert put.body == opa.policies[OURS].encode()


async def test_modules_that_use_each_other_go_in_as_one_policy(
    opa: OPADouble, engine: OPAEngine
) -> None:
    # OPA compiles each PUT against what it holds: neither module goes in alone.
    for module in (CALLS_B, CALLS_A):
        with pytest.raises(Exception, match="400"):
            await asyncio.to_thread(_put_raw, opa.url, "probe/alone", module)
    await engine.load({"a.rego": CALLS_B, "b.rego": CALLS_A})
    assert list(opa.policies) == [OURS]
    assert await codes(engine) == ("a:b:z",)


def _put_raw(url: str, policy_id: str, source: str) -> None:
    request = urllib.request.Request(
        f"{url}/v1/policies/{policy_id}", data=source.encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


async def test_allow_decision_carries_attributes(engine: OPAEngine) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    decision = await engine.evaluate({})
    assert decision.allow
    assert decision.attributes == {"certUsage": "client"}


async def test_new_set_replaces_old_and_removes_only_our_stale_modules(
    opa: OPADouble, engine: OPAEngine
) -> None:
    opa.put_policy("other-tool/x.rego", "package other\n\nimport rego.v1\n\nx := 1\n")
    await engine.load({"a.rego": HELPER, "b.rego": USES_HELPER})
    assert await codes(engine) == ("HELPER: from-helper",)
    await engine.load({"c.rego": tagged("C")})
    assert opa.policies == {**as_pushed({"c.rego": tagged("C")}),
                            "other-tool/x.rego": "package other\n\nimport rego.v1\n\nx := 1\n"}
    assert await codes(engine, {"tag": "t"}) == ("C: t",)


async def test_unchanged_modules_are_not_pushed_again(opa: OPADouble, engine: OPAEngine) -> None:
    await engine.load({"a.rego": HELPER, "b.rego": USES_HELPER})
    opa.requests.clear()
    await engine.load({"a.rego": HELPER, "b.rego": USES_HELPER})
    assert [r.method for r in opa.requests] == ["GET"]


async def test_compile_error_carries_opas_message_and_old_set_stays(
    opa: OPADouble, engine: OPAEngine
) -> None:
    await engine.load({"a.rego": HELPER, "b.rego": USES_HELPER})
    before = opa.policies
    # a.rego changes fine, b.rego is broken: a.rego must be put back as it was.
    with pytest.raises(PolicyCompileError) as info:
        await engine.load({"a.rego": HELPER.replace("from-helper", "changed"), "b.rego": BROKEN})
    assert info.value.module == "b.rego"
    assert "rego_parse_error" in info.value.detail
    assert "row " in info.value.detail
    assert opa.policies == before
    assert engine.ready
    assert engine.module_ids == ("a.rego", "b.rego")
    assert await codes(engine) == ("HELPER: from-helper",)


async def test_a_compile_error_names_the_module_and_row_it_came_from(engine: OPAEngine) -> None:
    # Rows of the merged policy map back: the call is on b.rego's row 7.
    second = HEADER + "y := 2\n\nz := nope(1)\n"
    with pytest.raises(PolicyCompileError) as info:
        await engine.load({"a.rego": HELPER, "b.rego": second})
    assert info.value.module == "b.rego"
    assert "undefined function data.identityd.nope (row 7, col 6)" in info.value.detail


async def test_a_deletion_opa_refuses_is_a_rejection_and_the_set_stays(
    opa: OPADouble, engine: OPAEngine
) -> None:
    extra = HELPER.replace("package identityd", "package identityd.extra")
    await engine.load({"x.rego": extra, "p.rego": tagged("ONE")})
    before = opa.policies
    # OPA refuses to delete a policy the rest depends on: 400 invalid_operation.
    opa.fail_next(status=400, code="invalid_operation", method="DELETE")
    with pytest.raises(PolicyCompileError) as info:
        await engine.load({"p.rego": tagged("ONE")})
    assert info.value.module == "package/identityd.extra"
    assert "cannot be removed" in info.value.detail
    assert opa.policies == before
    assert engine.ready
    assert engine.module_ids == ("x.rego", "p.rego")
    assert await codes(engine, {"tag": "t"}) == ("ONE: t",)


async def test_first_set_rejected_leaves_nothing_of_ours(opa: OPADouble, engine: OPAEngine) -> None:
    with pytest.raises(PolicyCompileError):
        await engine.load({"a.rego": HELPER, "b.rego": BROKEN})
    assert opa.policies == {}
    assert not engine.ready
    assert await unavailable(engine) == "POLICY_NOT_LOADED"


async def test_a_rule_moving_between_modules_converges(opa: OPADouble, engine: OPAEngine) -> None:
    # One module at a time, putting c.rego first would define `label` twice in a real
    # OPA; as one policy per package the move is a single change.
    await engine.load({"a.rego": HELPER, "b.rego": USES_HELPER})
    await engine.load({"b.rego": USES_HELPER, "c.rego": HELPER.replace("from-helper", "moved")})
    assert list(opa.policies) == [OURS]
    assert await codes(engine) == ("HELPER: moved",)


@pytest.mark.parametrize(
    ("modules", "fragment"),
    [({}, "no modules"), ({"../x.rego": HELPER}, "policy id"), ({"a b": HELPER}, "policy id"),
     ({"a.rego": "  \n"}, "empty")],
)
async def test_unusable_sets_are_refused_before_opa_sees_them(
    opa: OPADouble, engine: OPAEngine, modules: dict[str, str], fragment: str
) -> None:
    with pytest.raises(PolicyCompileError, match=fragment):
        await engine.load(modules)
    assert opa.requests == []


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8181", "ftp://h", "http://h/v1", "http://h?x=1", "http://:8181"]
)
def test_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        OPAEngine(url)


def test_bad_timeouts_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        OPAEngine("http://127.0.0.1:8181", timeout=0)
    with pytest.raises(TypeError, match="check_interval"):
        OPAEngine("http://127.0.0.1:8181", check_interval=True)
    with pytest.raises(ValueError, match="id_prefix"):
        OPAEngine("http://127.0.0.1:8181", id_prefix="")


async def test_input_that_is_not_json_is_a_bad_request(engine: OPAEngine) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    with pytest.raises(BadRequest):
        await engine.evaluate({"x": float("nan")})


async def test_the_decision_is_one_post_of_the_input_without_metrics(
    opa: OPADouble, engine: OPAEngine
) -> None:
    await engine.load({"p.rego": tagged("ONE")})
    document = {"tag": "é", "numbers": [1, 2.5, None, True]}
    assert await codes(engine, document) == ("ONE: é",)
    assert await codes(engine, MappingProxyType({"tag": "m"})) == ("ONE: m",)
    first, _ = opa.data_requests()
    # A builtin's error must fail the decision, as in the embedded engine.
    assert (first.method, first.path) == ("POST", "/v1/data/identityd/decision")
    assert first.query == {"strict-builtin-errors": "true"}
    assert json.loads(first.body) == {"input": document}


async def test_on_metrics_gets_opas_timers_of_each_decision(opa: OPADouble) -> None:
    seen: list[Mapping[str, Any]] = []
    async with OPAEngine(opa.url, timeout=1.0, check_interval=60, on_metrics=seen.append) as engine:
        await engine.load({"p.rego": ALLOW_ALL})
        assert (await engine.evaluate({})).allow
        assert (await engine.evaluate({})).allow
    assert [r.query for r in opa.data_requests()] == [
        {"strict-builtin-errors": "true", "metrics": "true"}
    ] * 2
    assert len(seen) == 2
    assert seen[1]["timer_server_handler_ns"] >= seen[1]["timer_rego_query_eval_ns"] > 0


# --- decisions that cannot be made --------------------------------------------------------


async def test_a_builtins_error_fails_the_decision_rather_than_allowing(
    engine: OPAEngine,
) -> None:
    # OPA's default would leave `n` undefined and skip the deny; the engine asks it not to.
    await engine.load(
        {
            "p.rego": HEADER + "n := to_number(input.x)\n\n"
            'decision := {"allow": false, "reasons": ["DENY"], "attributes": {}} if n\n'
            'else := {"allow": true, "reasons": [], "attributes": {"certUsage": "client"}}\n'
        }
    )
    assert await codes(engine, {"x": "1"}) == ("DENY",)
    with pytest.raises(PolicyUnavailable) as info:
        await engine.evaluate({"x": "secret-value"})
    assert info.value.code == "POLICY_ENGINE_ERROR"
    # OPA's error code says what failed; its message, which quotes the input, is left out.
    assert info.value.detail == "POST /v1/data: HTTP 500 (internal_error)"


async def test_timeout_is_policy_timeout_and_bounded(opa: OPADouble, engine: OPAEngine) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    opa.set_delay(3.0)
    started = time.monotonic()
    assert await unavailable(engine) == "POLICY_TIMEOUT"
    assert time.monotonic() - started < 1.5
    opa.set_delay(0)
    assert (await engine.evaluate({})).allow


async def test_connection_refused_is_policy_unavailable(opa: OPADouble, engine: OPAEngine) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    await opa.refuse()
    assert await unavailable(engine) == "POLICY_UNAVAILABLE"
    assert not engine.ready
    assert not await engine.check()
    await opa.accept()
    assert await engine.check()
    assert engine.ready
    assert (await engine.evaluate({})).allow


async def test_undefined_decision_is_policy_undefined(opa: OPADouble, engine: OPAEngine) -> None:
    await engine.load({"p.rego": NO_DECISION})
    assert await unavailable(engine) == "POLICY_UNDEFINED"
    assert engine.ready  # the policies are there; it is the policy that is wrong


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_non_200_is_engine_error(opa: OPADouble, engine: OPAEngine, status: int) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    opa.fail_next(1, status, path="/v1/data")
    assert await unavailable(engine) == "POLICY_ENGINE_ERROR"
    assert (await engine.evaluate({})).allow  # one attempt per decision, no hidden retries


async def test_malformed_decision_is_bad_decision(engine: OPAEngine) -> None:
    await engine.load({"p.rego": HEADER + 'decision := {"allow": "yes"}\n'})
    assert await unavailable(engine) == "POLICY_BAD_DECISION"


async def test_load_when_opa_is_down_keeps_the_good_set(opa: OPADouble, engine: OPAEngine) -> None:
    await engine.load({"p.rego": tagged("OLD")})
    await opa.refuse()
    with pytest.raises(PolicyUnavailable) as info:
        await engine.load({"p.rego": tagged("NEW")})
    assert info.value.code == "POLICY_UNAVAILABLE"
    assert not engine.ready
    await opa.accept()
    assert await engine.check()
    assert await codes(engine, {"tag": "t"}) == ("OLD: t",)


async def test_a_decision_never_sees_a_half_pushed_set(opa: OPADouble, engine: OPAEngine) -> None:
    # Two packages, so two policies and two PUTs.
    def pair(version: str) -> dict[str, str]:
        return {"a.rego": HELPER.replace("from-helper", f"A{version}").replace(
                    "package identityd", "package identityd.lib"),
                "b.rego": HEADER + "import data.identityd.lib.label\n\n"
                + USES_HELPER[len(HEADER):].replace('"HELPER: "', f'"B{version} "')}

    await engine.load(pair("1"))
    assert await codes(engine) == ("B1 A1",)
    opa.requests.clear()
    opa.set_delay(0.05)
    load = asyncio.create_task(engine.load(pair("2")))
    await wait_until(lambda: bool(opa.requests))  # the listing is answered; a.rego is on its way
    # Ungated, this would reach OPA between the two PUTs and answer "B1 A2".
    assert await codes(engine) == ("B2 A2",)
    await load
    assert [r.method for r in opa.requests] == ["GET", "PUT", "PUT", "POST"]


# --- OPA restarts ---------------------------------------------------------------------------


async def test_restart_detected_by_check_and_set_pushed_again(
    opa: OPADouble, engine: OPAEngine
) -> None:
    await engine.load({"p.rego": tagged("ONE")})
    await opa.restart_empty()
    assert engine.repushes == 0
    assert await engine.check()
    assert engine.repushes == 1
    assert opa.policies == as_pushed({"p.rego": tagged("ONE")})
    assert engine.ready
    assert await codes(engine, {"tag": "t"}) == ("ONE: t",)


async def test_undefined_after_restart_is_not_loaded_and_triggers_a_push(opa: OPADouble) -> None:
    async with OPAEngine(opa.url, check_interval=60) as engine:
        await engine.load({"p.rego": ALLOW_ALL})
        await opa.restart_empty()
        assert await unavailable(engine) == "POLICY_NOT_LOADED"
        assert not engine.ready
        # The undefined answer woke the check; no interval has to pass.
        await wait_until(lambda: engine.ready)
        assert (await engine.evaluate({})).allow


async def test_changed_module_in_opa_is_restored(opa: OPADouble, engine: OPAEngine) -> None:
    await engine.load({"p.rego": tagged("OURS")})
    opa.put_policy(OURS, ALLOW_ALL)  # someone else's write under our id
    assert await engine.check()
    assert opa.policies == as_pushed({"p.rego": tagged("OURS")})
    assert not (await engine.evaluate({})).allow


async def test_not_ready_and_no_decision_until_the_push_succeeds(
    opa: OPADouble, engine: OPAEngine
) -> None:
    await engine.load({"p.rego": ALLOW_ALL})
    await opa.restart_empty()
    opa.fail_next(1, 500, method="PUT")
    assert not await engine.check()
    assert not engine.ready
    assert await unavailable(engine) == "POLICY_NOT_LOADED"
    assert await engine.check()
    assert (await engine.evaluate({})).allow


async def test_background_check_recovers_with_no_allow_in_between(opa: OPADouble) -> None:
    async with OPAEngine(opa.url, timeout=0.5, check_interval=0.05) as engine:
        await engine.load({"p.rego": ALLOW_ALL})
        await opa.restart_empty()
        outcomes: list[str] = []
        async with asyncio.timeout(5):
            while True:
                try:
                    decision = await engine.evaluate({})
                except PolicyUnavailable as exc:
                    outcomes.append(exc.code)
                    await asyncio.sleep(0.01)
                    continue
                outcomes.append("allow")
                break
        assert outcomes[-1] == "allow"
        assert decision.allow
        assert set(outcomes[:-1]) <= {"POLICY_NOT_LOADED", "POLICY_UNAVAILABLE"}
        assert engine.repushes == 1
        assert engine.ready


async def test_closed_engine_refuses(opa: OPADouble) -> None:
    engine = OPAEngine(opa.url)
    await engine.load({"p.rego": ALLOW_ALL})
    await engine.aclose()
    assert not engine.ready
    assert await unavailable(engine) == "POLICY_NOT_LOADED"
    with pytest.raises(PolicyCompileError):
        await engine.load({"p.rego": ALLOW_ALL})
    assert opa.policies == as_pushed({"p.rego": ALLOW_ALL})  # left for the next identityd
