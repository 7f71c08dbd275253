"""The Kubernetes API edge (identityd.kubeapi) and the two loops on it, the pod watch and
the policy ConfigMap watch, against what a real API server and client do that the happy
path never shows: a watch line over the client's limit, a credential refresh that fails
(the real in-cluster loader and its refresh hook), a bug in event handling, a quiet
cluster that sends no bookmark for longer than the inactivity timeout, and a paged list
whose continue token expires. Each loop must log, back off and go on; never die.

(The ConfigMap loop's tests are here because they share the double and the edge.)"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_asyncio.config
import pytest
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import incluster_config
from prometheus_client import CollectorRegistry

from identityd.errors import InventoryUnavailable
from identityd.inventory.watch import WatchInventory, WatchMetrics, WatchSettings
from identityd.keys.certs import CertificateAuthority
from identityd.kubeapi import (
    KubeAPIError,
    KubeConnection,
    PodsAPI,
    new_api_client,
    watch_timeout,
)
from identityd.policy.configmap_state import POLICY_LABEL_SELECTOR, STATUS_ANNOTATION
from identityd.policy.configmaps import ConfigMapSettings, ConfigMapSource
from identityd.policy.reload import ReloadOutcome, ReloadResult
from tests.doubles.kube_apiserver import KubeAPIServer
from tests.doubles.kube_inventory import connection_to, fast_settings, watching
from tests.doubles.waiting import eventually

NS = "identityd-system"
# kubernetes_asyncio reads responses with a 2 MiB buffer: aiohttp refuses a line over
# twice that (LineTooLong, an HttpProcessingError, not a ClientError).
OVERSIZED = 4 * 2**20 + 4096


def oversized_line() -> bytes:
    filler = b"x" * OVERSIZED
    return (b'{"type":"MODIFIED","object":{"metadata":{"name":"big","namespace":"ns",'
            b'"annotations":{"a":"' + filler + b'"}}}}\n')


class Fixed(random.Random):
    """An rng whose random() is always ``value`` (uniform() still works from it)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.fixture
async def api() -> AsyncIterator[KubeAPIServer]:
    async with KubeAPIServer() as server:
        yield server


def watches(api: KubeAPIServer) -> list[dict[str, str]]:
    return [r.query for r in api.requests if r.is_watch]


def watched_more(api: KubeAPIServer, before: int) -> bool:
    return len(watches(api)) > before


def in_cluster(api: KubeAPIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``KubeConnection()`` (in cluster) set up by kubernetes_asyncio's own in-cluster
    loader, with its token-refresh hook re-reading the token file before every request,
    against the double (plain HTTP). Returns the token file."""
    token = tmp_path / "token"
    token.write_text(api.token)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(CertificateAuthority("cluster-ca").cert_pem)
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    host, port = api.url.removeprefix("http://").rsplit(":", 1)

    def load(client_configuration: Configuration) -> None:
        loader = incluster_config.InClusterConfigLoader(
            token_filename=str(token), cert_filename=str(ca),
            environ={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port})
        loader.load_and_set(client_configuration)
        client_configuration.host = api.url  # the double speaks plain HTTP

    monkeypatch.setattr(kubernetes_asyncio.config, "load_incluster_config", load)
    return token


# --- the edge: what leaves identityd.kubeapi -------------------------------------------


async def test_an_oversized_watch_line_is_an_api_error(api: KubeAPIServer) -> None:
    pods = PodsAPI(await new_api_client(connection_to(api)))
    stream = await pods.watch("ns", resource_version=str(api.store.rv), timeout_seconds=5,
                              connect_timeout=1, inactivity_timeout=5)
    try:
        await api.wait_for_watches(1)
        api.send_line(oversized_line())
        with pytest.raises(KubeAPIError) as caught:
            await stream.next()
    finally:
        stream.close()
        await pods.aclose()
    assert caught.value.code == "KUBE_BAD_RESPONSE" and caught.value.status == 200
    assert "xxxx" not in str(caught.value)  # object data stays out of details


async def test_a_failing_credential_refresh_is_an_api_error(
    api: KubeAPIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = in_cluster(api, tmp_path, monkeypatch)
    api.add_pod("ns", "a")
    pods = await PodsAPI.connect(KubeConnection())
    try:
        assert await pods.get("ns", "a", request_timeout=2) is not None
        token.write_text("")  # the refresh hook raises ConfigException
        for call in (pods.get("ns", "a", request_timeout=2),
                     pods.list_all(None, dict, limit=10, request_timeout=2),
                     pods.watch(None, resource_version="1", timeout_seconds=1,
                                connect_timeout=1, inactivity_timeout=2)):
            with pytest.raises(KubeAPIError) as caught:
                await call
            assert caught.value.code == "KUBE_CREDENTIALS_UNAVAILABLE"
            assert caught.value.status == 0
    finally:
        await pods.aclose()


@pytest.mark.parametrize(
    ("base", "inactivity", "fraction", "expected"),
    [
        (60, 120, 0.0, 60),  # the defaults: 60-100 s
        (60, 120, 0.5, 80),
        (60, 120, 0.999, 99.96),
        (10, 120, 0.5, 15),  # up to 2x when the inactivity timeout is far
        (100, 110, 0.9, 100),  # no room to randomise: the base
        (0.1, 0.15, 0.5, 0.1125),
    ],
)
def test_watch_timeout(base: float, inactivity: float, fraction: float, expected: float) -> None:
    assert watch_timeout(base, inactivity, fraction) == pytest.approx(expected)


@pytest.mark.parametrize("base", [1.0, 30.0, 60.0, 99.0, 119.0])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.999999])
def test_watch_timeout_stays_below_the_inactivity_timeout(base: float, fraction: float) -> None:
    assert base <= watch_timeout(base, 120.0, fraction) < 120.0


# --- the pod watch -------------------------------------------------------------------------


async def test_the_default_pod_watch_asks_the_server_to_end_it_in_time(
    api: KubeAPIServer,
) -> None:
    """A real API server bookmarks only above the watch's start: on a quiet cluster the
    stream carries nothing until timeoutSeconds. 300-600 s against a 120 s inactivity
    timeout made every quiet watch 'dead'; now the server always ends it first."""
    for value in (0.0, 0.999):
        before = len(watches(api))
        async with watching(api, rng=Fixed(value)):
            await eventually(functools.partial(watched_more, api, before))
    defaults = WatchSettings()
    asked = [int(q["timeoutSeconds"]) for q in watches(api)]
    assert asked == [60, 99]
    assert all(seconds < defaults.inactivity_timeout_seconds for seconds in asked)


async def test_a_quiet_cluster_is_never_declared_dead() -> None:
    """No write after the watch starts: the double, like the watch cache, sends no
    bookmark; the stream is ended by the server before the inactivity timeout."""
    async with KubeAPIServer(bookmark_interval=0.05) as api:
        api.add_pod("ns", "pod")
        registry = CollectorRegistry()
        settings = fast_settings(inactivity_timeout_seconds=1.5, watch_timeout_seconds=1.2)
        async with watching(api, settings, metrics=WatchMetrics(registry),
                            rng=Fixed(0.999)) as inv:
            await api.wait_for_watches(1)
            await asyncio.sleep(2.3)
            assert inv.ready

        def restarts(reason: str) -> float | None:
            return registry.get_sample_value(
                "identityd_inventory_watch_restarts_total", {"reason": reason})

        assert restarts("inactive") is None
        assert (restarts("timeout") or 0) >= 2
        assert registry.get_sample_value(
            "identityd_inventory_events_total", {"type": "BOOKMARK"}) is None
        assert {q["timeoutSeconds"] for q in watches(api)} == {"1"}


async def test_the_pod_watch_survives_an_oversized_line(api: KubeAPIServer) -> None:
    registry = CollectorRegistry()
    async with watching(api, metrics=WatchMetrics(registry)) as inv:
        await api.wait_for_watches(1)
        api.send_line(oversized_line())
        await eventually(lambda: registry.get_sample_value(
            "identityd_inventory_watch_restarts_total", {"reason": "error"}))
        api.add_pod("ns", "after")
        await eventually(lambda: inv.size() == 1)
        assert inv.ready


async def test_the_pod_watch_survives_a_failing_credential_refresh(
    api: KubeAPIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ConfigException from the refresh hook used to end the loop for good. Now: each
    try fails with backoff; past the staleness bound the inventory fails closed; once
    the token file is good again it relists and is ready."""
    token = in_cluster(api, tmp_path, monkeypatch)
    api.add_pod("ns", "a")
    settings = fast_settings(staleness_seconds=0.3)
    async with WatchInventory(KubeConnection(), settings) as inv:
        async with asyncio.timeout(5):
            await inv.wait_synced()
        await api.wait_for_watches(1)
        token.write_text("")
        api.drop_watches()
        await eventually(lambda: not inv.ready, within=3)
        with pytest.raises(InventoryUnavailable) as caught:
            await inv.get("ns", "a")
        assert caught.value.code == "INVENTORY_STALE"
        api.add_pod("ns", "meanwhile")
        token.write_text(api.token)
        await eventually(lambda: inv.ready, within=3)
        await eventually(lambda: inv.size() == 2)
    assert any("KUBE_CREDENTIALS_UNAVAILABLE" in r.getMessage() for r in caplog.records)


async def test_an_unexpected_error_is_logged_and_the_pod_watch_goes_on(
    api: KubeAPIServer, caplog: pytest.LogCaptureFixture,
) -> None:
    failed: list[str] = []

    def broken_once(kind: str, record: Any) -> None:
        if kind == "ADDED" and not failed:
            failed.append(kind)
            raise RuntimeError("a bug in event handling")

    async with watching(api, observer=broken_once) as inv:
        await api.wait_for_watches(1)
        api.add_pod("ns", "trigger")
        await eventually(lambda: bool(failed))
        api.add_pod("ns", "later")
        await eventually(lambda: inv.size() == 2)
        assert inv.ready
    crashes = [r for r in caplog.records
               if r.name == "identityd.inventory.watch" and "unexpected error" in r.getMessage()]
    assert len(crashes) == 1 and crashes[0].levelno == logging.ERROR
    assert crashes[0].exc_info is not None  # the traceback is in the log
    assert not any("stopped" in r.getMessage() for r in caplog.records)


# --- the policy ConfigMap watch ------------------------------------------------------------


FAST_CM: dict[str, Any] = {
    "namespaces": (NS,), "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05,
    "request_timeout_seconds": 2.0, "connect_timeout_seconds": 1.0,
}


def policy_configmap(name: str, text: str = "package identityd\n") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"openpolicyagent.org/policy": "rego"}},
            "data": {"main.rego": text}}


@pytest.fixture
async def source(api: KubeAPIServer) -> AsyncIterator[ConfigMapSource]:
    async with ConfigMapSource(connection_to(api), ConfigMapSettings(**FAST_CM)) as started:
        async with asyncio.timeout(5):
            await started.wait_synced()
        yield started


async def test_the_default_configmap_watch_asks_the_server_to_end_it_in_time(
    api: KubeAPIServer,
) -> None:
    for value in (0.0, 0.999):
        before = len(watches(api))
        async with ConfigMapSource(connection_to(api), ConfigMapSettings(**FAST_CM),
                                   rng=Fixed(value)):
            await eventually(functools.partial(watched_more, api, before))
    assert [int(q["timeoutSeconds"]) for q in watches(api)] == [60, 99]
    assert ConfigMapSettings(namespaces=(NS,)).inactivity_timeout_seconds == 120


async def test_the_configmap_watch_survives_an_oversized_line(
    api: KubeAPIServer, source: ConfigMapSource,
) -> None:
    await api.wait_for_watches(1)
    api.send_line(oversized_line())
    await eventually(lambda: len(watches(api)) >= 2)  # watched again after the error
    api.put("configmaps", policy_configmap("after"))
    await eventually(lambda: (NS, "after") in source.state.configmaps)


async def test_the_configmap_watch_survives_an_unexpected_error(
    api: KubeAPIServer, source: ConfigMapSource, caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def listener() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in a listener")

    source.subscribe(listener)
    await api.wait_for_watches(1)
    api.put("configmaps", policy_configmap("first"))
    await eventually(lambda: bool(calls))
    api.put("configmaps", policy_configmap("second"))
    await eventually(lambda: (NS, "second") in source.state.configmaps)
    assert len(calls) == 2
    assert any("unexpected error" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_the_configmap_list_restarts_paging_after_an_expired_continue(
    api: KubeAPIServer,
) -> None:
    for i in range(5):
        api.put("configmaps", policy_configmap(f"cm-{i}"))
    api.fail_next(1, 410, path="continue=")
    settings = ConfigMapSettings(**FAST_CM | {"page_size": 2})
    async with ConfigMapSource(connection_to(api), settings) as source:
        async with asyncio.timeout(5):
            await source.wait_synced()
        assert len(source.state.configmaps) == 5
    lists = [r.query for r in api.requests if r.method == "GET" and not r.is_watch]
    assert [q.get("limit") for q in lists] == ["2"] * 5
    assert ["continue" in q for q in lists] == [False, True, False, True, True]
    assert all(q["labelSelector"] == POLICY_LABEL_SELECTOR for q in lists)


class FlakyLeader:
    """Leads, but the first question about it raises (a bug in an elector)."""

    def __init__(self) -> None:
        self.asked = 0

    @property
    def is_leader(self) -> bool:
        self.asked += 1
        if self.asked == 1:
            raise RuntimeError("a bug in leader election")
        return True

    def subscribe(self, callback: Any) -> None:
        return None


async def test_the_status_writer_survives_an_unexpected_error(
    api: KubeAPIServer, caplog: pytest.LogCaptureFixture,
) -> None:
    api.put("configmaps", policy_configmap("policy"))
    leader = FlakyLeader()
    async with ConfigMapSource(connection_to(api), ConfigMapSettings(**FAST_CM),
                               leader=leader) as source:
        async with asyncio.timeout(5):
            await source.wait_synced()
        await source.snapshot()
        await source.observe(ReloadResult(ReloadOutcome.LOADED))

        def annotation() -> Any:
            obj = api.store.get("configmaps", NS, "policy") or {}
            return (obj.get("metadata", {}).get("annotations") or {}).get(STATUS_ANNOTATION)

        await eventually(lambda: annotation() == '{"status":"ok"}', within=3)
    assert leader.asked >= 2
    assert any("unexpected error" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    "overrides",
    [{"watch_timeout_seconds": 120.0}, {"watch_timeout_seconds": 5.0,
                                        "inactivity_timeout_seconds": 5.0}],
)
def test_a_watch_timeout_not_below_the_inactivity_timeout_is_refused(
    overrides: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="watch_timeout_seconds"):
        ConfigMapSettings(namespaces=(NS,), **overrides)
    with pytest.raises(ValueError, match="watch_timeout_seconds"):
        WatchSettings(**overrides)
