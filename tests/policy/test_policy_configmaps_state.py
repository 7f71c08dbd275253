"""The pure core of the ConfigMap policy source: module ids, the kube-mgmt status value,
which ConfigMaps are held back after a rejection, and the status each should carry; and
the reloader's side of an observed source (subscribe, observe, trigger, settle)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from identityd.policy.configmap_state import (
    STATUS_ANNOTATION,
    PolicyConfigMap,
    PolicyState,
    module_id,
    status_value,
)
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.reload import ObservedSource, PolicyReloader, ReloadOutcome, ReloadResult

NS = "identityd-system"
OK = '{"status":"ok"}'


def cm(name: str, status: str | None = None, rv: str = "1", **data: str) -> PolicyConfigMap:
    return PolicyConfigMap(NS, name, dict(sorted(data.items())), status, rv)


def loaded(state: PolicyState) -> ReloadResult:
    return ReloadResult(ReloadOutcome.LOADED, tuple(state.snapshot()))


def rejected(module: str | None, message: str = "rego_parse_error: unexpected eof token") -> (
    ReloadResult
):
    error = f"{module}: {message}" if module else message
    return ReloadResult(ReloadOutcome.REJECTED, (), error, module)


def test_module_id_is_kube_mgmts() -> None:
    assert module_id("ns", "cm", "main.rego") == "ns/cm/main.rego"


# -- the status value ------------------------------------------------------------------------


def test_ok_status_is_exactly_kube_mgmts() -> None:
    assert status_value(None) == '{"status":"ok"}'


@pytest.mark.parametrize(
    ("error", "module", "expected"),
    [
        (  # the OPA engine's detail: code, message, row and col come apart again
            "rego_parse_error: unexpected eof token (row 5, col 1)",
            "ns/cm/a.rego",
            {"code": "rego_parse_error", "message": "unexpected eof token",
             "location": {"file": "ns/cm/a.rego", "row": 5, "col": 1}},
        ),
        (  # the embedded engine's: a message only
            "rego_unsafe_var_error: var x is unsafe",
            "ns/cm/a.rego",
            {"code": "rego_unsafe_var_error", "message": "var x is unsafe",
             "location": {"file": "ns/cm/a.rego"}},
        ),
        (
            "missing closing brace (and 2 more)",
            "ns/cm/a.rego",
            {"code": "rego_compile_error", "message": "missing closing brace (and 2 more)",
             "location": {"file": "ns/cm/a.rego"}},
        ),
        (  # no module to blame: no location
            "the policy set gives no usable decision",
            None,
            {"code": "rego_compile_error", "message": "the policy set gives no usable decision"},
        ),
    ],
)
def test_error_status_carries_opas_error_body(
    error: str, module: str | None, expected: dict[str, Any]
) -> None:
    value = status_value(error, module)
    assert json.loads(value) == {
        "status": "error",
        "error": {"code": "invalid_parameter",
                  "message": "error(s) occurred while compiling module(s)",
                  "errors": [expected]},
    }
    # Go's encoding/json: compact, keys in struct order.
    assert value.startswith('{"status":"error","error":{"code":"invalid_parameter","message":')


def test_status_escapes_html_as_go_does() -> None:
    value = status_value("bad <token> & more", "ns/cm/a.rego")
    assert "<" not in value and ">" not in value and "&" not in value
    assert "\\u003ctoken\\u003e \\u0026 more" in value
    assert json.loads(value)["error"]["errors"][0]["message"] == "bad <token> & more"


# -- reading ConfigMaps ----------------------------------------------------------------------


def test_from_object_keeps_data_status_and_version() -> None:
    obj = {
        "metadata": {"namespace": NS, "name": "p", "resourceVersion": "42",
                     "annotations": {STATUS_ANNOTATION: OK, "other": "x"}},
        "data": {"b.rego": "B", "a.rego": "A", "notes.txt": "also a module"},
        "binaryData": {"blob": "AAAA"},
    }
    got = PolicyConfigMap.from_object(obj)
    assert got == PolicyConfigMap(
        NS, "p", {"a.rego": "A", "b.rego": "B", "notes.txt": "also a module"}, OK, "42"
    )


@pytest.mark.parametrize(
    "obj",
    [{}, {"metadata": []}, {"metadata": {"name": "p"}}, {"metadata": {"namespace": NS}}],
)
def test_from_object_refuses_objects_without_a_name(obj: dict[str, Any]) -> None:
    assert PolicyConfigMap.from_object(obj) is None


def test_from_object_without_data_has_no_modules() -> None:
    got = PolicyConfigMap.from_object({"metadata": {"namespace": NS, "name": "p"}})
    assert got is not None and dict(got.data) == {} and got.status is None


# -- holding back and statuses ---------------------------------------------------------------


def test_every_data_key_is_a_module_with_kube_mgmts_id() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A", "b": "B"}))
    state.upsert(cm("extra", **{"x.rego": "X"}))
    assert state.snapshot() == {f"{NS}/base/a.rego": "A", f"{NS}/base/b": "B",
                                f"{NS}/extra/x.rego": "X"}


def test_nothing_is_written_before_a_load() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.snapshot()
    assert state.desired_status((NS, "base")) is None
    assert state.pending_writes() == []


def test_loaded_content_is_ok_and_written_only_when_it_differs() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.upsert(cm("done", status=OK, **{"d.rego": "D"}))
    state.observe(loaded(state))
    assert state.desired_status((NS, "base")) == OK
    assert [(c.name, v) for c, v in state.pending_writes()] == [("base", OK)]


def test_a_broken_new_configmap_is_held_back_and_the_rest_loads() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.observe(loaded(state))
    state.upsert(cm("extra", **{"x.rego": "BROKEN"}))
    state.upsert(cm("base", **{"a.rego": "A2"}))  # a good edit in the same round
    assert set(state.snapshot()) == {f"{NS}/base/a.rego", f"{NS}/extra/x.rego"}

    again = state.observe(rejected(f"{NS}/extra/x.rego"))
    assert again  # a set without it should be tried now
    assert state.held == ((NS, "extra"),)
    assert state.snapshot() == {f"{NS}/base/a.rego": "A2"}  # never loaded: left out
    status = state.desired_status((NS, "extra"))
    assert status is not None and json.loads(status)["status"] == "error"
    assert json.loads(status)["error"]["errors"][0]["location"]["file"] == f"{NS}/extra/x.rego"
    # A is in force, A2 not tried alone yet: nothing claims A2 is ok before it loads.
    assert state.desired_status((NS, "base")) is None

    assert not state.observe(loaded(state))
    assert state.desired_status((NS, "base")) == OK
    assert json.loads(state.desired_status((NS, "extra")) or "")["status"] == "error"


def test_a_broken_edit_keeps_the_configmaps_last_good_content() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.observe(loaded(state))
    state.upsert(cm("base", **{"a.rego": "BROKEN"}))
    state.snapshot()
    assert state.observe(rejected(f"{NS}/base/a.rego"))
    assert state.snapshot() == {f"{NS}/base/a.rego": "A"}
    # The fix releases the hold; the new content is tried and then ok.
    state.upsert(cm("base", **{"a.rego": "A3"}))
    assert state.held == ()
    assert state.snapshot() == {f"{NS}/base/a.rego": "A3"}
    state.observe(loaded(state))
    assert state.desired_status((NS, "base")) == OK


def test_reverting_to_the_content_in_force_is_ok_without_a_load() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.observe(loaded(state))
    state.upsert(cm("base", **{"a.rego": "BROKEN"}))
    state.snapshot()
    state.observe(rejected(f"{NS}/base/a.rego"))
    state.upsert(cm("base", **{"a.rego": "A"}))
    assert state.desired_status((NS, "base")) == OK


def test_unattributed_rejection_holds_back_every_change() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.observe(loaded(state))
    state.upsert(cm("x", **{"x.rego": "X"}))
    state.upsert(cm("y", **{"y.rego": "Y"}))
    state.snapshot()
    assert state.observe(rejected(None, "the policy set gives no usable decision"))
    assert state.held == ((NS, "x"), (NS, "y"))
    assert state.snapshot() == {f"{NS}/base/a.rego": "A"}
    assert state.desired_status((NS, "base")) == OK


def test_blame_on_an_unchanged_module_falls_on_the_changed_ones() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.observe(loaded(state))
    state.upsert(cm("y", **{"y.rego": "conflicts with A"}))
    state.snapshot()
    assert state.observe(rejected(f"{NS}/base/a.rego", "rego_type_error: conflicting rules"))
    assert state.held == ((NS, "y"),)
    assert state.desired_status((NS, "base")) == OK


def test_with_nothing_changed_to_hold_the_named_configmap_is_marked() -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A uses lib"}))
    state.upsert(cm("lib", **{"l.rego": "L"}))
    state.observe(loaded(state))
    state.remove(NS, "lib")  # a deletion breaks base; there is nothing to hold back
    state.snapshot()
    assert not state.observe(rejected(f"{NS}/base/a.rego", "rego_type_error: undefined ref"))
    assert json.loads(state.desired_status((NS, "base")) or "")["status"] == "error"
    # Putting lib back loads again, and base is ok again.
    state.upsert(cm("lib", **{"l.rego": "L"}))
    state.snapshot()
    state.observe(ReloadResult(ReloadOutcome.LOADED))
    assert state.desired_status((NS, "base")) == OK


def test_metadata_only_changes_are_not_changes() -> None:
    state = PolicyState()
    assert state.upsert(cm("base", **{"a.rego": "A"}))
    assert not state.upsert(cm("base", status=OK, rv="2", **{"a.rego": "A"}))
    assert state.upsert(cm("base", status=OK, rv="3", **{"a.rego": "A", "b.rego": "B"}))
    assert not state.replace_namespace(NS, [cm("base", rv="9", **{"a.rego": "A", "b.rego": "B"})])
    assert state.replace_namespace(NS, [])
    assert state.configmaps == {}
    assert not state.remove(NS, "base")


@pytest.mark.parametrize("outcome", [ReloadOutcome.UNAVAILABLE, ReloadOutcome.SOURCE_ERROR])
def test_engine_down_or_source_error_teach_nothing(outcome: ReloadOutcome) -> None:
    state = PolicyState()
    state.upsert(cm("base", **{"a.rego": "A"}))
    state.snapshot()
    assert not state.observe(ReloadResult(outcome, (), "down"))
    assert state.desired_status((NS, "base")) is None
    assert state.held == ()


# -- the reloader's side of an observed source ------------------------------------------------


class FakeSource:
    """An ObservedSource in memory: asks for another round ``asks`` times."""

    name = "fake"

    def __init__(self, modules: dict[str, str], *, asks: int = 0, explode: bool = False) -> None:
        self.modules = modules
        self.asks = asks
        self.explode = explode
        self.results: list[ReloadOutcome] = []
        self.listeners: list[Any] = []

    def subscribe(self, on_change: Any) -> None:
        self.listeners.append(on_change)

    async def snapshot(self) -> dict[str, str]:
        return dict(self.modules)

    async def observe(self, result: ReloadResult) -> None:
        self.results.append(result.outcome)
        if self.explode:
            raise RuntimeError("bookkeeping failed")
        if self.asks > 0:
            self.asks -= 1
            self.modules = self.modules | {f"more{self.asks}.rego": "package more\n"}
            for listener in self.listeners:
                listener()


BASE_POLICY = {"d.rego": 'package identityd\n\nimport rego.v1\n\ndecision := {"allow": true}\n'}


async def test_the_reloader_subscribes_and_reports_to_an_observed_source() -> None:
    source = FakeSource(BASE_POLICY, asks=2)
    assert isinstance(source, ObservedSource)
    async with EmbeddedEngine() as engine:
        reloader = PolicyReloader(source, engine, interval=60)
        assert source.listeners == [reloader.trigger]
        result = await reloader.settle()
        # Three rounds: the first, and one for each change the source asked for.
        assert source.results == [ReloadOutcome.LOADED] * 3
        assert result.outcome is ReloadOutcome.LOADED and len(result.module_ids) == 3
        assert (await reloader.reload_once()).outcome is ReloadOutcome.UNCHANGED
        assert len(source.results) == 3  # UNCHANGED is not reported

        # In the background a trigger is served at once, not after the 60 s interval.
        async with reloader:
            source.modules = source.modules | {"late.rego": "package late\n"}
            reloader.trigger()
            async with asyncio.timeout(2):
                while reloader.loaded < 4:  # noqa: ASYNC110 - polls the reloader
                    await asyncio.sleep(0.01)


async def test_settle_is_bounded_and_a_failing_observer_does_not_stop_reloads() -> None:
    async with EmbeddedEngine() as engine:
        greedy = FakeSource(BASE_POLICY, asks=100)
        await PolicyReloader(greedy, engine, interval=60).settle(max_rounds=4)
        assert len(greedy.results) == 4

        broken = FakeSource(BASE_POLICY, explode=True)
        reloader = PolicyReloader(broken, engine, interval=60)
        assert (await reloader.reload_once()).outcome is ReloadOutcome.LOADED
        assert engine.ready and broken.results == [ReloadOutcome.LOADED]
        with pytest.raises(ValueError, match="max_rounds"):
            await reloader.settle(max_rounds=0)
