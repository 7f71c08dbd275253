"""Policies from ConfigMaps through the real kubernetes_asyncio client against the
API-server double, on both engines: loaded and enforced, a broken ConfigMap reported in
kube-mgmt's status annotation while the last good set stays, fixed, deleted; our own
status write never reloads; the watch's 410 and lost events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from identityd.errors import ConfigError
from identityd.kubeapi import KubeConnection
from identityd.policy.base import Decision, PolicyEngine
from identityd.policy.configmap_state import POLICY_LABEL_SELECTOR, STATUS_ANNOTATION
from identityd.policy.configmaps import ConfigMapSettings, ConfigMapSource
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.opa import OPAEngine
from identityd.policy.reload import PolicyReloader, ReloadOutcome
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.opa_server import OPADouble
from tests.doubles.waiting import eventually

NS = "identityd-system"
OK = '{"status":"ok"}'
POLICY_LABELS = {"openpolicyagent.org/policy": "rego"}

DECISION = """package identityd

import rego.v1

decision := {"allow": count(reasons) == 0, "reasons": sort([r | some r in reasons]),
             "attributes": {}}
"""
BLOCKED = """package identityd

import rego.v1

reasons contains "NAMESPACE_BLOCKED: blocked" if input.pod.namespace == "blocked"
"""
EXTRA = """package identityd

import rego.v1

reasons contains "EXTRA_RULE: from a ConfigMap" if input.kind == "refresh"
"""
BASE = {"decision.rego": DECISION, "blocked.rego": BLOCKED}
BROKEN = "package identityd\n\nimport rego.v1\n\nreasons contains msg if {\n"


def policy_configmap(name: str, data: Mapping[str, str], *, namespace: str = NS,
                     labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": dict(POLICY_LABELS if labels is None else labels)},
            "data": dict(data)}


def status(api: KubeAPIServer, name: str, namespace: str = NS) -> Any:
    obj = api.store.get("configmaps", namespace, name)
    raw = ((obj or {}).get("metadata", {}).get("annotations") or {}).get(STATUS_ANNOTATION)
    return raw if raw is None else json.loads(raw)


def raw_status(api: KubeAPIServer, name: str) -> str | None:
    obj = api.store.get("configmaps", NS, name) or {}
    value = (obj.get("metadata", {}).get("annotations") or {}).get(STATUS_ANNOTATION)
    return value if isinstance(value, str) else None


def patches(api: KubeAPIServer) -> list[str]:
    return [r.path for r in api.requests if r.method == "PATCH"]


class CountingEngine:
    """Delegates to an engine and counts the loads it is asked for."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self.loads = 0

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def load(self, modules: Mapping[str, str]) -> None:
        self.loads += 1
        await self.engine.load(modules)

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        return await self.engine.evaluate(input_doc)

    async def aclose(self) -> None:
        await self.engine.aclose()


FAST: dict[str, Any] = {
    "namespaces": (NS,), "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05,
    "request_timeout_seconds": 2.0, "connect_timeout_seconds": 1.0,
}


def fast_settings(**overrides: Any) -> ConfigMapSettings:
    return ConfigMapSettings(**(FAST | overrides))


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        yield server


@pytest.fixture
async def opa() -> AsyncIterator[OPADouble]:
    async with OPADouble() as server:
        yield server


@pytest.fixture(params=["embedded", "opa"])
async def engine(request: pytest.FixtureRequest, opa: OPADouble) -> AsyncIterator[CountingEngine]:
    if request.param == "embedded":
        async with EmbeddedEngine() as embedded:
            yield CountingEngine(embedded)
    else:
        async with OPAEngine(opa.url, check_interval=60) as remote:
            yield CountingEngine(remote)


@contextlib.asynccontextmanager
async def running(
    api: KubeAPIServer,
    engine: PolicyEngine,
    settings: ConfigMapSettings | None = None,
    on_status_write: Callable[[bool], None] | None = None,
) -> AsyncIterator[tuple[ConfigMapSource, PolicyReloader]]:
    """The wiring app.py does: source started and synced, first load settled, then the
    reloader in the background. A long poll interval: only triggers can be fast."""
    source = ConfigMapSource(KubeConnection(host=api.url, token=api.token),
                             settings or fast_settings(), on_status_write=on_status_write)
    reloader = PolicyReloader(source, engine, interval=60)
    async with source:
        async with asyncio.timeout(5):
            await source.wait_synced()
        await reloader.settle()
        async with reloader:
            yield source, reloader


async def codes(engine: PolicyEngine, **input_doc: Any) -> tuple[str, ...]:
    doc = {"kind": "instance", "pod": {"namespace": "sports-web"}} | input_doc
    return (await engine.evaluate(doc)).codes


async def test_configmap_policies_load_and_are_enforced(
    api: KubeAPIServer, engine: CountingEngine
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    # Not ours: no label, another label value, another namespace.
    api.put("configmaps", policy_configmap("plain", {"x.rego": BROKEN}, labels={}))
    api.put("configmaps", policy_configmap("data", {"x.rego": BROKEN},
                                           labels={"openpolicyagent.org/policy": "json"}))
    api.put("configmaps", policy_configmap("elsewhere", {"x.rego": BROKEN}, namespace="other"))

    async with running(api, engine) as (_, reloader):
        assert reloader.last is not None and reloader.last.outcome is ReloadOutcome.LOADED
        assert reloader.last.module_ids == (f"{NS}/base/blocked.rego", f"{NS}/base/decision.rego")
        assert engine.ready
        assert await codes(engine) == ()
        assert await codes(engine, pod={"namespace": "blocked"}) == ("NAMESPACE_BLOCKED",)
        await eventually(lambda: raw_status(api, "base") == OK)
        assert status(api, "plain") is None and status(api, "elsewhere", "other") is None

    # Selected by the API server, in the namespace only.
    lists = [r for r in api.requests if r.path == f"/api/v1/namespaces/{NS}/configmaps"]
    assert lists and all(r.query.get("labelSelector") == POLICY_LABEL_SELECTOR for r in lists)
    assert any(r.is_watch for r in lists)
    assert not any(r.path == "/api/v1/configmaps" for r in api.requests)


async def test_broken_configmap_is_reported_and_the_last_good_set_stays(
    api: KubeAPIServer, engine: CountingEngine
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    async with running(api, engine) as (source, reloader):
        await eventually(lambda: raw_status(api, "base") == OK)

        # A broken edit: the error lands on that ConfigMap, in kube-mgmt's shape.
        api.put("configmaps", policy_configmap("extra", {"extra.rego": BROKEN}))
        await eventually(lambda: (status(api, "extra") or {}).get("status") == "error")
        error = status(api, "extra")["error"]
        assert error["code"] == "invalid_parameter"
        assert error["errors"][0]["location"]["file"] == f"{NS}/extra/extra.rego"
        assert error["errors"][0]["message"]
        # Decisions keep using the last good set; the other ConfigMap stays ok.
        assert engine.ready
        assert await codes(engine, kind="refresh") == ()
        assert await codes(engine, pod={"namespace": "blocked"}) == ("NAMESPACE_BLOCKED",)
        assert raw_status(api, "base") == OK
        assert source.state.held == ((NS, "extra"),)

        # Fixed: ok, and the new rule is in force.
        api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}))
        await eventually(lambda: raw_status(api, "extra") == OK)
        assert await codes(engine, kind="refresh") == ("EXTRA_RULE",)
        assert reloader.last is not None and f"{NS}/extra/extra.rego" in reloader.last.module_ids


async def test_other_edits_come_into_force_while_one_configmap_is_broken(
    api: KubeAPIServer, engine: CountingEngine
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.put("configmaps", policy_configmap("rules", {"blocked.rego": BLOCKED}))
    async with running(api, engine):
        await eventually(lambda: raw_status(api, "rules") == OK)
        api.put("configmaps", policy_configmap("rules", {"blocked.rego": BROKEN}))
        await eventually(lambda: (status(api, "rules") or {}).get("status") == "error")
        api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}))
        await eventually(lambda: raw_status(api, "extra") == OK)
        # The new ConfigMap is in force next to the broken one's last good content.
        assert await codes(engine, kind="refresh") == ("EXTRA_RULE",)
        assert await codes(engine, pod={"namespace": "blocked"}) == ("NAMESPACE_BLOCKED",)
        assert (status(api, "rules") or {}).get("status") == "error"


async def test_broken_at_start_up_loads_the_rest_and_reports(
    api: KubeAPIServer, engine: CountingEngine
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.put("configmaps", policy_configmap("extra", {"extra.rego": BROKEN}))
    async with running(api, engine) as (_, reloader):
        assert reloader.last is not None and reloader.last.outcome is ReloadOutcome.LOADED
        assert engine.ready
        await eventually(lambda: (status(api, "extra") or {}).get("status") == "error")
        await eventually(lambda: raw_status(api, "base") == OK)


async def test_deleted_configmap_removes_its_modules(
    api: KubeAPIServer, engine: CountingEngine
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}))
    async with running(api, engine) as (_, reloader):
        assert await codes(engine, kind="refresh") == ("EXTRA_RULE",)
        api.delete("configmaps", NS, "extra")
        await eventually(lambda: reloader.loaded == 2)
        assert reloader.last is not None
        assert reloader.last.module_ids == (f"{NS}/base/blocked.rego", f"{NS}/base/decision.rego")
        assert await codes(engine, kind="refresh") == ()


async def test_a_label_removed_is_a_delete(api: KubeAPIServer, engine: CountingEngine) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}))
    async with running(api, engine) as (_, reloader):
        api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}, labels={}))
        await eventually(lambda: reloader.loaded == 2)
        assert await codes(engine, kind="refresh") == ()


async def test_our_status_write_does_not_reload(
    api: KubeAPIServer, engine: CountingEngine
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.put("configmaps", policy_configmap("extra", {"extra.rego": BROKEN}))
    async with running(api, engine) as (source, reloader):
        await eventually(lambda: raw_status(api, "base") == OK
                         and raw_status(api, "extra") is not None)
        loads, changes = engine.loads, source.changes
        written = len(patches(api))
        assert written == 2 and source.status_writes == 2
        # Our patches came back as MODIFIED events; give them time to do harm.
        await asyncio.sleep(0.3)
        assert (engine.loads, source.changes, len(patches(api))) == (loads, changes, written)

        # Someone else's metadata-only edit (a label, an annotation) reloads nothing either.
        obj = api.store.get("configmaps", NS, "base")
        assert obj is not None
        obj["metadata"]["annotations"]["team"] = "platform"
        obj["metadata"]["labels"]["tier"] = "gold"
        api.put("configmaps", obj)
        await asyncio.sleep(0.2)
        assert (engine.loads, source.changes, len(patches(api))) == (loads, changes, written)

        # An annotation overwritten by hand is put right, once.
        obj = api.store.get("configmaps", NS, "base")
        assert obj is not None
        obj["metadata"]["annotations"][STATUS_ANNOTATION] = '{"status":"error","error":"x"}'
        api.put("configmaps", obj)
        await eventually(lambda: raw_status(api, "base") == OK)
        await asyncio.sleep(0.2)
        assert len(patches(api)) == written + 1
        assert engine.loads == loads
        assert reloader.loaded + reloader.rejected == loads


async def test_status_is_patched_with_the_resource_version_as_precondition(
    api: KubeAPIServer,
) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    async with EmbeddedEngine() as engine, running(api, engine):
        await eventually(lambda: raw_status(api, "base") == OK)
    [patch] = [r for r in api.requests if r.method == "PATCH"]
    assert patch.path == f"/api/v1/namespaces/{NS}/configmaps/base"
    # kube-mgmt's content type (a dict body goes out as a strategic merge patch).
    assert patch.headers["Content-Type"].startswith("application/strategic-merge-patch+json")


async def test_a_failed_status_write_is_retried(api: KubeAPIServer) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.fail_next(2, 500, method="PATCH")
    told: list[bool] = []
    async with EmbeddedEngine() as engine, running(api, engine, on_status_write=told.append) as (
        source,
        _,
    ):
        await eventually(lambda: raw_status(api, "base") == OK)
        # The double stores the patch before its answer reaches the source.
        await eventually(lambda: source.status_writes == 1)
        assert source.status_failures == 2 and source.status_writes == 1
    assert told == [False, False, True]  # what identityd_policy_status_writes_total counts


async def test_status_is_not_written_when_disabled(api: KubeAPIServer) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    async with EmbeddedEngine() as engine, running(
        api, engine, fast_settings(write_status=False)
    ) as (_, reloader):
        assert reloader.last is not None and reloader.last.outcome is ReloadOutcome.LOADED
        await asyncio.sleep(0.2)
    assert patches(api) == [] and raw_status(api, "base") is None


async def test_expired_watch_relists_and_catches_up(api: KubeAPIServer) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    async with EmbeddedEngine() as engine, running(api, engine) as (source, reloader):
        await api.wait_for_watches(1)
        # An event lost in flight, then the history compacted: the watch resumes from
        # a resourceVersion that is gone (410), relists, and finds the change.
        with api.muted():
            api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}))
        api.compact()
        api.drop_watches()
        await eventually(lambda: reloader.loaded == 2)
        assert await codes(engine, kind="refresh") == ("EXTRA_RULE",)
        lists = [r for r in api.requests
                 if r.path.endswith("/configmaps") and not r.is_watch]
        assert len(lists) == 2
        # A relist that finds nothing new reloads nothing (the pod only moves the
        # resourceVersion past ours, so the compaction expires it).
        loaded = reloader.loaded
        changes = source.changes
        api.add_pod("sports-web", "api-1")
        api.compact()
        api.drop_watches()
        await eventually(lambda: len([r for r in api.requests if r.path.endswith("/configmaps")
                                      and not r.is_watch]) == 3)
        await asyncio.sleep(0.1)
        assert (reloader.loaded, source.changes) == (loaded, changes)


async def test_api_server_outage_keeps_the_set_and_recovers(api: KubeAPIServer) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    async with EmbeddedEngine() as engine, running(api, engine) as (_, reloader):
        await api.wait_for_watches(1)
        await api.pause()
        await asyncio.sleep(0.1)
        assert engine.ready and await codes(engine) == ()
        api.put("configmaps", policy_configmap("extra", {"extra.rego": EXTRA}))
        await api.resume()
        await eventually(lambda: reloader.loaded == 2)
        assert await codes(engine, kind="refresh") == ("EXTRA_RULE",)


async def test_snapshot_before_sync_and_when_empty(api: KubeAPIServer) -> None:
    source = ConfigMapSource(KubeConnection(host=api.url, token=api.token), fast_settings())
    with pytest.raises(ConfigError) as not_synced:
        await source.snapshot()
    assert not_synced.value.code == "POLICY_CONFIGMAPS_NOT_SYNCED"
    await source.open()
    try:
        await source.step(NS)  # the list
        assert source.synced
        with pytest.raises(ConfigError) as empty:
            await source.snapshot()
        assert empty.value.code == "POLICY_CONFIGMAPS_EMPTY"
    finally:
        await source.aclose()


async def test_several_namespaces_are_one_set(api: KubeAPIServer) -> None:
    api.put("configmaps", policy_configmap("base", BASE))
    api.put("configmaps", policy_configmap("team", {"extra.rego": EXTRA}, namespace="team-a"))
    settings = fast_settings(namespaces=(NS, "team-a"))
    async with EmbeddedEngine() as engine, running(api, engine, settings) as (_, reloader):
        assert reloader.last is not None
        assert reloader.last.module_ids == (
            f"{NS}/base/blocked.rego", f"{NS}/base/decision.rego", "team-a/team/extra.rego"
        )
        assert await codes(engine, kind="refresh") == ("EXTRA_RULE",)
        await eventually(lambda: status(api, "team", "team-a") == {"status": "ok"})


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"namespaces": ()}, ValueError),
        ({"namespaces": "identityd-system"}, TypeError),
        ({"namespaces": ("",)}, ValueError),
        ({"label_selector": ""}, ValueError),
        ({"request_timeout_seconds": 0}, ValueError),
        ({"page_size": True}, TypeError),
        ({"backoff_initial_seconds": 2.0, "backoff_max_seconds": 1.0}, ValueError),
    ],
)
def test_settings_are_validated(overrides: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        ConfigMapSettings(**({"namespaces": (NS,)} | overrides))
