"""The policy engine fails: the OPA sidecar down, slow, restarting empty; the embedded
engine stuck in a pathological policy. 503 with a reason code meanwhile, never an
allow, and the first allow within 1 s of the engine being healthy again."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from identityd.devca.workload import DevCluster
from tests.conftest import POLICIES, Pods, Service, make_settings
from tests.doubles.opa_server import OPADouble
from tests.faults.conftest import (
    RECOVERY_SECONDS,
    answers_during,
    ask,
    eventually_answers,
    ready,
    serving,
    time_to_allow,
)

OPA_TIMEOUT = 0.3
# While OPA restarts: it cannot be reached, holds none of our policies, or a decision
# waits past its timeout for the re-push under way.
RESTART_REFUSALS = {
    (503, "POLICY_UNAVAILABLE"),
    (503, "POLICY_NOT_LOADED"),
    (503, "POLICY_TIMEOUT"),
}


@pytest.fixture
async def opa() -> AsyncIterator[OPADouble]:
    async with OPADouble() as double:
        yield double


@pytest.fixture
async def opa_service(
    opa: OPADouble, cluster: DevCluster, pods: Pods, tmp_path: Path
) -> AsyncIterator[Service]:
    settings = replace(
        make_settings(cluster, tmp_path),
        engine="opa",
        opa_url=opa.url,
        decision_timeout_seconds=OPA_TIMEOUT,
        policy_reload_seconds=0,
    )
    async with serving(settings) as svc:
        yield svc


async def test_opa_down_is_503_and_recovers_within_a_second(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    body = cluster.confirmation(pods.api)
    assert (await ask(opa_service, body)).status == 200

    await opa.refuse()
    await answers_during(opa_service, body, 0.3, expect={(503, "POLICY_UNAVAILABLE")})
    assert await ready(opa_service) == 503
    # A deny that needs the engine is not decided without it either: 503, not 403.
    forged = cluster.confirmation(pods.api, san_ip=[pods.other.ip])
    assert (await ask(opa_service, forged)).code == "POLICY_UNAVAILABLE"

    await opa.accept()
    since = time.monotonic()
    assert await time_to_allow(opa_service, body, since=since) <= RECOVERY_SECONDS
    assert await ready(opa_service) == 200
    assert (await ask(opa_service, forged)).code == "SAN_IP_NOT_ALLOWED"


async def test_slow_opa_is_policy_timeout_and_recovers_within_a_second(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    body = cluster.confirmation(pods.api)
    assert (await ask(opa_service, body)).status == 200

    opa.set_delay(OPA_TIMEOUT * 3)
    started = time.monotonic()
    await answers_during(opa_service, body, 0.6, expect={(503, "POLICY_TIMEOUT")})
    # Each refusal came at the decision timeout, not at OPA's pace.
    assert time.monotonic() - started < 0.6 + OPA_TIMEOUT + 0.3

    opa.set_delay(0)
    since = time.monotonic()
    assert await time_to_allow(opa_service, body, since=since) <= RECOVERY_SECONDS


async def test_opa_restarting_empty_is_never_an_allow_and_recovers_within_a_second(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    body = cluster.confirmation(pods.api)
    assert (await ask(opa_service, body)).status == 200

    await opa.refuse()  # the sidecar's container restarts ...
    await answers_during(opa_service, body, 0.3, expect={(503, "POLICY_UNAVAILABLE")})
    await opa.restart_empty()  # ... and comes back without a single policy
    since = time.monotonic()
    assert not opa.policies
    elapsed = await time_to_allow(
        opa_service,
        body,
        since=since,
        refusals=RESTART_REFUSALS,
    )
    assert elapsed <= RECOVERY_SECONDS
    assert any(pid.startswith("identityd/") for pid in opa.policies)  # pushed again


async def test_opa_restarted_empty_without_downtime_recovers_within_a_second(
    opa_service: Service, opa: OPADouble, cluster: DevCluster, pods: Pods
) -> None:
    body = cluster.confirmation(pods.api)
    assert (await ask(opa_service, body)).status == 200
    await opa.restart_empty()
    since = time.monotonic()
    elapsed = await time_to_allow(
        opa_service,
        body,
        since=since,
        refusals=RESTART_REFUSALS,
    )
    assert elapsed <= RECOVERY_SECONDS


# --- the embedded engine ----------------------------------------------------------------

# Added to package identityd by an "edit": a rule that costs ~0.2 s per real decision
# (numbers.range + a comprehension; the empty smoke input at load time skips it, so the
# set loads). The decision always evaluates `reasons`, so every request pays for it.
SLOW_MODULE = """package identityd

import rego.v1

reasons contains "SLOW_RULE_FIRED" if {
	input.request.domain
	count([y | some i in numbers.range(1, 30000); y := i * 2]) < 0
}
"""
EMBEDDED_TIMEOUT = 0.05


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target, ignore=shutil.ignore_patterns("tests"))
    return target


async def test_embedded_engine_timeout_is_503_and_recovers_after_the_fix_reloads(
    cluster: DevCluster, pods: Pods, tmp_path: Path, policy_dir: Path
) -> None:
    settings = replace(
        make_settings(cluster, tmp_path),
        policies=str(policy_dir),
        decision_timeout_seconds=EMBEDDED_TIMEOUT,
        policy_reload_seconds=0.05,
    )
    body = cluster.confirmation(pods.api)
    async with serving(settings) as svc:
        assert (await ask(svc, body)).status == 200

        slow = policy_dir / "identityd" / "zz_slow.rego"
        slow.write_text(SLOW_MODULE)
        await eventually_answers(svc, body, {(503, "POLICY_TIMEOUT")})
        await answers_during(svc, body, 0.4, expect={(503, "POLICY_TIMEOUT")})

        slow.unlink()  # the fix; hot reload picks it up
        since = time.monotonic()
        elapsed = await time_to_allow(svc, body, since=since, refusals={(503, "POLICY_TIMEOUT")})
        assert elapsed <= RECOVERY_SECONDS
        # The fixed set was installed on the worker after the last slow evaluation.
        assert await ready(svc) == 200
