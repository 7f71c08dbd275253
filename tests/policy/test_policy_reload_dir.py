"""Hot reload from a policy directory, the same on both engines: an edit is put in
force, a broken edit keeps the old set and is reported, fixing it reports ok."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from identityd.metrics import Metrics
from identityd.policy.base import PolicyEngine
from identityd.policy.cases import load_bases
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.opa import OPAEngine
from identityd.policy.reload import (
    DirectorySource,
    PolicyReloader,
    ReloadOutcome,
)
from tests.doubles.opa_server import OPADouble

POLICIES = Path(__file__).resolve().parents[2] / "policies"
ALLOW = load_bases(POLICIES / "tests" / "_bases.yaml")["allow"]
EXTRA = "package identityd\n\nimport rego.v1\n\nreasons contains \"EXTRA_RULE: reloaded\"\n"
BROKEN = "package identityd\n\nimport rego.v1\n\nreasons contains msg if {\n"

Status = tuple[tuple[str, ...], bool, str | None]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES / "identityd", target / "identityd")
    return target


@pytest.fixture
async def opa() -> AsyncIterator[OPADouble]:
    async with OPADouble() as opa:
        yield opa


@pytest.fixture(params=["embedded", "opa"])
async def engine(request: pytest.FixtureRequest, opa: OPADouble) -> AsyncIterator[PolicyEngine]:
    if request.param == "embedded":
        async with EmbeddedEngine() as embedded:
            yield embedded
    else:
        async with OPAEngine(opa.url, check_interval=60) as remote:
            yield remote


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Status] = []

    async def __call__(self, ids: tuple[str, ...], ok: bool, error: str | None) -> None:
        self.calls.append((ids, ok, error))


async def codes(engine: PolicyEngine) -> tuple[str, ...]:
    return (await engine.evaluate(ALLOW)).codes


async def test_edit_break_fix_cycle(policy_dir: Path, engine: PolicyEngine) -> None:
    status = Recorder()
    metrics = Metrics()
    reloader = PolicyReloader(DirectorySource(policy_dir), engine, on_status=status,
                              metrics=metrics)
    first = await reloader.reload_once()
    assert first.outcome is ReloadOutcome.LOADED
    assert "identityd/decision.rego" in first.module_ids
    assert status.calls == [(first.module_ids, True, None)]
    assert await codes(engine) == ()

    # An edit: a new module with a new rule is in force after the next round.
    (policy_dir / "identityd" / "extra.rego").write_text(EXTRA)
    assert (await reloader.reload_once()).outcome is ReloadOutcome.LOADED
    assert await codes(engine) == ("EXTRA_RULE",)
    assert status.calls[-1][1:] == (True, None)

    # A broken edit: rejected, reported with the module named, the old set stays.
    (policy_dir / "identityd" / "extra.rego").write_text(BROKEN)
    broken = await reloader.reload_once()
    assert broken.outcome is ReloadOutcome.REJECTED
    assert broken.module == "identityd/extra.rego"
    ids, ok, error = status.calls[-1]
    assert not ok
    assert error is not None and error.startswith("identityd/extra.rego: ")
    assert "identityd/extra.rego" in ids
    assert await codes(engine) == ("EXTRA_RULE",)
    assert engine.ready

    # The same broken content is not tried (or reported) again every round.
    calls = len(status.calls)
    assert (await reloader.reload_once()).outcome is ReloadOutcome.UNCHANGED
    assert len(status.calls) == calls

    # The fix (here: the module removed) is in force and reported ok.
    (policy_dir / "identityd" / "extra.rego").unlink()
    fixed = await reloader.reload_once()
    assert fixed.outcome is ReloadOutcome.LOADED
    assert status.calls[-1] == (fixed.module_ids, True, None)
    assert "identityd/extra.rego" not in fixed.module_ids
    assert await codes(engine) == ()
    assert (reloader.loaded, reloader.rejected) == (3, 1)
    loads = metrics.policy_loads
    assert loads.labels(result="ok")._value.get() == 3
    assert loads.labels(result="error")._value.get() == 1


async def test_background_polling_picks_up_an_edit(policy_dir: Path, engine: PolicyEngine) -> None:
    reloader = PolicyReloader(DirectorySource(policy_dir), engine, interval=0.02)
    assert (await reloader.reload_once()).ok
    async with reloader:
        (policy_dir / "identityd" / "extra.rego").write_text(EXTRA)
        for _ in range(500):
            if reloader.loaded == 2:
                break
            await asyncio.sleep(0.01)
    assert reloader.loaded == 2
    assert await codes(engine) == ("EXTRA_RULE",)


async def test_unreadable_source_keeps_the_set_and_reports_once(
    policy_dir: Path, engine: PolicyEngine
) -> None:
    status = Recorder()
    reloader = PolicyReloader(DirectorySource(policy_dir), engine, on_status=status)
    await reloader.reload_once()
    shutil.rmtree(policy_dir / "identityd")
    for _ in range(2):
        result = await reloader.reload_once()
        assert result.outcome is ReloadOutcome.SOURCE_ERROR
        assert result.error is not None and "POLICY_DIR_EMPTY" in result.error
    assert [call[1] for call in status.calls] == [True, False]
    assert await codes(engine) == ()


async def test_engine_unreachable_is_retried_not_reported(policy_dir: Path, opa: OPADouble) -> None:
    status = Recorder()
    async with OPAEngine(opa.url, check_interval=60) as engine:
        reloader = PolicyReloader(DirectorySource(policy_dir), engine, on_status=status)
        await opa.refuse()
        down = await reloader.reload_once()
        assert down.outcome is ReloadOutcome.UNAVAILABLE
        assert status.calls == []
        await opa.accept()
        assert (await reloader.reload_once()).outcome is ReloadOutcome.LOADED
        assert [call[1] for call in status.calls] == [True]
        assert await codes(engine) == ()


async def test_a_failing_status_callback_does_not_stop_reloading(
    policy_dir: Path, engine: PolicyEngine
) -> None:
    def explode(ids: tuple[str, ...], ok: bool, error: str | None) -> None:
        raise RuntimeError("the API server said no")

    reloader = PolicyReloader(DirectorySource(policy_dir), engine, on_status=explode)
    assert (await reloader.reload_once()).outcome is ReloadOutcome.LOADED
    assert engine.ready


def test_interval_must_be_positive(policy_dir: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        PolicyReloader(DirectorySource(policy_dir), EmbeddedEngine(), interval=0)
