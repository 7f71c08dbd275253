"""Lease-based leader election through the real kubernetes_asyncio client against the
API-server double: one leader of two, takeover after expiry or at once on release,
stepping down when renewal fails, lost races (409), and only the leader writing the
policy ConfigMaps' status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from identityd.kubeapi import KubeAPIError, KubeConnection, LeasesAPI
from identityd.policy.configmap_state import STATUS_ANNOTATION
from identityd.policy.configmaps import ConfigMapSettings, ConfigMapSource
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.leader import LeaderElectionSettings, LeaderElector, new_identity
from identityd.policy.reload import PolicyReloader
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.waiting import eventually

NS = "identityd-system"
LEASE = "identityd-policy-status"
# Test-sized timings; leaseDurationSeconds is whole seconds, so 1 s is the shortest lease.
TIMING: dict[str, Any] = {"lease_duration_seconds": 1.0, "renew_deadline_seconds": 0.6,
                          "retry_period_seconds": 0.1, "request_timeout_seconds": 0.3}
POLICY = {
    "decision.rego": 'package identityd\n\nimport rego.v1\n\ndecision := {"allow": '
                     'count(reasons) == 0, "reasons": sort([r | some r in reasons]), '
                     '"attributes": {}}\n',
    "rules.rego": 'package identityd\n\nimport rego.v1\n\nreasons contains "BLOCKED: x" if '
                  'input.pod.namespace == "blocked"\n',
}
BROKEN = "package identityd\n\nimport rego.v1\n\nreasons contains msg if {\n"


def connection(api: KubeAPIServer) -> KubeConnection:
    return KubeConnection(host=api.url, token=api.token)


def settings(identity: str, **overrides: Any) -> LeaderElectionSettings:
    return LeaderElectionSettings(**({"name": LEASE, "namespace": NS, "identity": identity}
                                     | TIMING | overrides))


def lease_spec(api: KubeAPIServer) -> dict[str, Any]:
    lease = api.store.get("leases", NS, LEASE)
    assert lease is not None
    spec: dict[str, Any] = lease["spec"]
    return spec


class Events:
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def __call__(self, leading: bool) -> None:
        self.seen.append(leading)


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        yield server


@contextlib.asynccontextmanager
async def electors(api: KubeAPIServer, *names: str) -> AsyncIterator[list[LeaderElector]]:
    started = [LeaderElector(connection(api), settings(name)) for name in names]
    try:
        for elector in started:
            await elector.start()
        yield started
    finally:
        for elector in started:
            await elector.aclose()


def leaders(group: list[LeaderElector]) -> list[str]:
    return [e.identity for e in group if e.is_leader]


# -- the Lease wire format the double serves ---------------------------------------------------


async def test_leases_create_get_replace_and_conflicts(api: KubeAPIServer) -> None:
    leases = await LeasesAPI.connect(connection(api))
    try:
        assert await leases.get(NS, LEASE, request_timeout=1) is None
        body = {"metadata": {"name": LEASE}, "spec": {"holderIdentity": "a"}}
        created = await leases.create(NS, body, request_timeout=1)
        assert created["apiVersion"] == "coordination.k8s.io/v1" and created["kind"] == "Lease"
        with pytest.raises(KubeAPIError) as taken:
            await leases.create(NS, body, request_timeout=1)
        assert taken.value.status == 409 and taken.value.reason == "AlreadyExists"

        current = await leases.get(NS, LEASE, request_timeout=1)
        assert current == created
        stale = json.loads(json.dumps(current))
        current["spec"]["holderIdentity"] = "b"
        replaced = await leases.replace(NS, LEASE, current, request_timeout=1)
        assert replaced["spec"]["holderIdentity"] == "b"
        assert replaced["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
        stale["spec"]["holderIdentity"] = "c"
        with pytest.raises(KubeAPIError) as conflict:
            await leases.replace(NS, LEASE, stale, request_timeout=1)
        assert conflict.value.status == 409 and conflict.value.reason == "Conflict"
        with pytest.raises(KubeAPIError) as missing:
            await leases.replace(NS, "other", {"metadata": {"name": "other"}}, request_timeout=1)
        assert missing.value.status == 404
    finally:
        await leases.aclose()
    writes = [(r.method, r.path) for r in api.requests if r.method in ("POST", "PUT")]
    assert writes[0] == ("POST", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases")
    assert writes[2] == ("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE}")


# -- one leader --------------------------------------------------------------------------------


async def test_two_electors_one_leader(api: KubeAPIServer) -> None:
    async with electors(api, "pod-a_1", "pod-b_2") as group:
        await eventually(lambda: len(leaders(group)) == 1)
        [leader] = leaders(group)
        spec = lease_spec(api)
        assert spec["holderIdentity"] == leader
        assert spec["leaseDurationSeconds"] == 1
        assert spec["leaseTransitions"] == 0
        assert spec["acquireTime"].endswith("Z") and "." in spec["renewTime"]
        # Stable: renewed, never handed over, over several lease durations.
        renewed = spec["renewTime"]
        await asyncio.sleep(1.5)
        assert leaders(group) == [leader]
        assert lease_spec(api)["holderIdentity"] == leader
        assert lease_spec(api)["renewTime"] != renewed
        assert [e.transitions for e in group if e.identity == leader] == [1]
        assert all(e.observed_holder == leader for e in group)


async def test_a_crashed_leader_is_replaced_after_the_lease_expires(api: KubeAPIServer) -> None:
    async with electors(api, "pod-a_1", "pod-b_2") as group:
        await eventually(lambda: len(leaders(group)) == 1)
        leader = next(e for e in group if e.is_leader)
        follower = next(e for e in group if e is not leader)
        events = Events()
        follower.subscribe(events)
        await leader.aclose(release=False)  # a crash: the Lease is left to expire
        stopped = time.monotonic()
        await eventually(lambda: follower.is_leader, within=5)
        waited = time.monotonic() - stopped
        # Not before the lease (1 s) has run out since the last renewal we saw.
        assert 0.8 <= waited < 2.5
        assert events.seen == [True]
        spec = lease_spec(api)
        assert spec["holderIdentity"] == follower.identity
        assert spec["leaseTransitions"] == 1


async def test_a_released_lease_is_taken_at_once(api: KubeAPIServer) -> None:
    async with electors(api, "pod-a_1", "pod-b_2") as group:
        await eventually(lambda: len(leaders(group)) == 1)
        leader = next(e for e in group if e.is_leader)
        follower = next(e for e in group if e is not leader)
        await leader.aclose()  # a clean shutdown hands the Lease back
        assert not leader.is_leader
        stopped = time.monotonic()
        await eventually(lambda: follower.is_leader, within=5)
        assert time.monotonic() - stopped < 0.8  # well before the lease would expire


async def test_the_leader_steps_down_when_it_cannot_renew(api: KubeAPIServer) -> None:
    async with electors(api, "pod-a_1") as group:
        [elector] = group
        events = Events()
        elector.subscribe(events)
        await eventually(lambda: elector.is_leader)
        await api.pause()
        lost = time.monotonic()
        await eventually(lambda: not elector.is_leader, within=3)
        assert time.monotonic() - lost < 0.6 + 0.3  # the renew deadline, and a margin
        await eventually(lambda: events.seen == [True, False])
        await api.resume()
        await eventually(lambda: elector.is_leader, within=5)
        assert events.seen == [True, False, True]


async def test_racing_candidates_one_wins(api: KubeAPIServer) -> None:
    leases = [await LeasesAPI.connect(connection(api)) for _ in range(2)]
    a = LeaderElector(None, settings("pod-a_1"), api=leases[0])
    b = LeaderElector(None, settings("pod-b_2"), api=leases[1])
    try:
        # No Lease yet: both create, one gets AlreadyExists.
        assert sorted(await asyncio.gather(a.try_acquire_or_renew(),
                                           b.try_acquire_or_renew())) == [False, True]
        winner, loser = (a, b) if lease_spec(api)["holderIdentity"] == a.identity else (b, a)
        # The loser does not take a Lease that is held and fresh.
        assert not await loser.try_acquire_or_renew()
        # A free Lease: both replace from the same resourceVersion, one gets Conflict.
        lease = api.store.get("leases", NS, LEASE)
        assert lease is not None
        lease["spec"]["holderIdentity"] = ""
        api.put("leases", lease)
        results = await asyncio.gather(winner.try_acquire_or_renew(),
                                       loser.try_acquire_or_renew())
        assert sorted(results) == [False, True]
        assert any(r.method == "PUT" for r in api.requests)
    finally:
        for leases_api in leases:
            await leases_api.aclose()


async def test_an_api_failure_is_not_leadership(api: KubeAPIServer) -> None:
    elector = LeaderElector(connection(api), settings("pod-a_1"))
    await elector.start()
    try:
        api.fail_next(3, 500, path="/leases")
        await eventually(lambda: elector.is_leader)
        assert len([r for r in api.requests if "/leases" in r.path]) >= 4
    finally:
        await elector.aclose()


def test_new_identity_is_unique_per_process() -> None:
    a, b = new_identity("identityd-7d9f-abcde"), new_identity("identityd-7d9f-abcde")
    assert a != b and a.startswith("identityd-7d9f-abcde_")
    assert new_identity() != new_identity()


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"name": ""}, ValueError),
        ({"identity": None}, TypeError),
        ({"lease_duration_seconds": 10, "renew_deadline_seconds": 10}, ValueError),
        ({"renew_deadline_seconds": 0.1, "retry_period_seconds": 0.1}, ValueError),
        ({"retry_period_seconds": 0}, ValueError),
        ({"retry_period_seconds": True}, TypeError),
    ],
)
def test_settings_are_validated(overrides: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        settings("pod-a_1", **overrides)


def test_client_go_defaults() -> None:
    s = LeaderElectionSettings(name=LEASE, namespace=NS, identity="x")
    assert (s.lease_duration_seconds, s.renew_deadline_seconds, s.retry_period_seconds) == (
        15.0, 10.0, 2.0)


# -- only the leader writes status ------------------------------------------------------------


@contextlib.asynccontextmanager
async def replica(api: KubeAPIServer, identity: str) -> AsyncIterator[
    tuple[LeaderElector, ConfigMapSource, EmbeddedEngine]
]:
    """One identityd replica's policy side: elector, ConfigMap source, engine, reloader."""
    elector = LeaderElector(connection(api), settings(identity))
    source = ConfigMapSource(
        connection(api),
        ConfigMapSettings(namespaces=(NS,), backoff_initial_seconds=0.01,
                          backoff_max_seconds=0.05),
        leader=elector,
    )
    async with EmbeddedEngine() as engine:
        reloader = PolicyReloader(source, engine, interval=60)
        await elector.start()
        try:
            async with source:
                await source.wait_synced()
                await reloader.settle()
                async with reloader:
                    yield elector, source, engine
        finally:
            await elector.aclose(release=False)


def annotation(api: KubeAPIServer, name: str) -> Any:
    obj = api.store.get("configmaps", NS, name) or {}
    raw = (obj.get("metadata", {}).get("annotations") or {}).get(STATUS_ANNOTATION)
    return None if raw is None else json.loads(raw)


async def test_only_the_leader_writes_status(api: KubeAPIServer) -> None:
    api.put("configmaps", {"metadata": {"name": "base", "namespace": NS,
                                        "labels": {"openpolicyagent.org/policy": "rego"}},
                           "data": POLICY})
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(replica(api, "pod-a_1"))
        b = await stack.enter_async_context(replica(api, "pod-b_2"))
        group = [a, b]
        await eventually(lambda: sum(e.is_leader for e, _, _ in group) == 1)
        leader = next(r for r in group if r[0].is_leader)
        follower = next(r for r in group if r is not leader)
        await eventually(lambda: annotation(api, "base") == {"status": "ok"})
        # Both load and enforce; one writes.
        for _, _, engine in group:
            assert engine.ready
            assert (await engine.evaluate({"pod": {"namespace": "blocked"}})).codes == (
                "BLOCKED",)
        assert leader[1].status_writes == 1 and follower[1].status_writes == 0
        assert len([r for r in api.requests if r.method == "PATCH"]) == 1

        # The leader crashes; the follower takes over and writes the next status.
        await leader[1].aclose()
        await leader[0].aclose(release=False)
        api.put("configmaps", {"metadata": {"name": "extra", "namespace": NS,
                                            "labels": {"openpolicyagent.org/policy": "rego"}},
                               "data": {"extra.rego": BROKEN}})
        # Loaded (and held back) at once; written once the follower leads.
        await eventually(lambda: follower[1].state.held == ((NS, "extra"),))
        await eventually(lambda: (annotation(api, "extra") or {}).get("status") == "error",
                         within=5)
        assert follower[0].is_leader
        assert follower[1].status_writes == 1
        assert leader[1].status_writes == 1
