"""Wiring only: build the edges from Settings, the aiohttp app, and the TLS context."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass

from aiohttp import web

from identityd.callback.decision_log import DecisionLog
from identityd.callback.http import (
    ALLOWED_CLIENTS_KEY,
    ENGINE_KEY,
    INVENTORY_KEY,
    LIMITER_KEY,
    LOG_KEY,
    MAX_BODY_KEY,
    METRICS_KEY,
    PIPELINE_KEY,
    VERIFIER_KEY,
    add_routes,
    error_middleware,
)
from identityd.callback.limits import Limiter, limits_middleware
from identityd.callback.pipeline import Pipeline
from identityd.errors import ConfigError
from identityd.inventory.base import PodInventory
from identityd.inventory.static import StaticInventory
from identityd.inventory.watch import WatchInventory, WatchMetrics, WatchSettings
from identityd.kubeapi import KubeConnection
from identityd.metrics import Metrics
from identityd.policy.base import PolicyEngine
from identityd.policy.configmaps import ConfigMapSettings, ConfigMapSource
from identityd.policy.embedded import EmbeddedEngine
from identityd.policy.leader import LeaderElectionSettings, LeaderElector, new_identity
from identityd.policy.opa import OPAEngine
from identityd.policy.reload import DirectorySource, PolicyReloader, ReloadOutcome
from identityd.settings import DEFAULT_POLICY_RELOAD_SECONDS, Settings, TLSSettings, host_port
from identityd.tokens.base import TokenVerifier
from identityd.tokens.jwks import JWKSVerifier
from identityd.tokens.tokenreview import TokenReviewMetrics, TokenReviewVerifier, jwks_key_source

log = logging.getLogger("identityd.serve")

# How long start-up waits for the first ConfigMap list before serving (not ready).
CONFIGMAP_SYNC_WAIT_SECONDS = 10.0


@dataclass
class Edges:
    verifier: TokenVerifier
    inventory: PodInventory
    engine: PolicyEngine
    reloader: PolicyReloader | None = None
    policy_source: ConfigMapSource | None = None
    elector: LeaderElector | None = None

    async def aclose(self) -> None:
        # Reloader before its source; the elector releases the Lease for a peer.
        if self.reloader is not None:
            await self.reloader.aclose()
        if self.policy_source is not None:
            await self.policy_source.aclose()
        if self.elector is not None:
            await self.elector.aclose()
        await self.verifier.aclose()
        await self.inventory.aclose()
        await self.engine.aclose()


def build_engine(settings: Settings) -> PolicyEngine:
    if settings.engine == "opa":
        return OPAEngine(settings.opa_url, timeout=settings.decision_timeout_seconds)
    if settings.engine == "embedded":
        return EmbeddedEngine(timeout=settings.decision_timeout_seconds)
    raise ConfigError("CONFIG_ERROR", f"--engine {settings.engine!r} is not available")


@dataclass
class PolicyFeed:
    reloader: PolicyReloader
    source: ConfigMapSource | None = None
    elector: LeaderElector | None = None

    async def aclose(self) -> None:
        await self.reloader.aclose()
        if self.source is not None:
            await self.source.aclose()
        if self.elector is not None:
            await self.elector.aclose()


async def start_policies(
    settings: Settings, engine: PolicyEngine, metrics: Metrics | None, *, start: bool = True
) -> PolicyFeed:
    """First load, then hot reload, from the policy directory or from ConfigMaps."""
    interval = settings.policy_reload_seconds or DEFAULT_POLICY_RELOAD_SECONDS
    if settings.policy_configmap_namespaces:
        return await _start_configmap_policies(settings, engine, metrics, interval, start=start)
    reloader = PolicyReloader(
        DirectorySource(settings.policy_dir), engine, interval=interval, metrics=metrics
    )
    first = await reloader.reload_once()
    # A set that does not compile stops start-up; a sidecar not up yet does not
    # (not ready until the reloader gets through).
    if first.outcome in (ReloadOutcome.REJECTED, ReloadOutcome.SOURCE_ERROR):
        await reloader.aclose()
        raise ConfigError("POLICY_LOAD_FAILED", f"{settings.policy_dir}: {first.error}")
    if start and (settings.policy_reload_seconds > 0 or not first.ok):
        await reloader.start()
    return PolicyFeed(reloader)


async def _start_configmap_policies(
    settings: Settings,
    engine: PolicyEngine,
    metrics: Metrics | None,
    interval: float,
    *,
    start: bool,
) -> PolicyFeed:
    """Never fatal at start-up: a crash-looping pod could not write the status
    annotation that tells the operator what is wrong. Not ready until a set loads."""
    connection = kube_connection(settings)
    elector = None
    if settings.leader_elect:
        elector = LeaderElector(
            connection,
            LeaderElectionSettings(
                name=settings.leader_elect_resource_name,
                namespace=settings.leader_elect_resource_namespace
                or settings.policy_configmap_namespaces[0],
                identity=new_identity(os.environ.get("POD_NAME")),
            ),
        )
    on_status_write = None
    if metrics is not None:
        writes = metrics.policy_status_writes

        def on_status_write(ok: bool) -> None:
            writes.labels(result="ok" if ok else "error").inc()

        if elector is not None:
            leading = metrics.policy_status_leader
            elector.subscribe(lambda now_leading: leading.set(1 if now_leading else 0))
    source = ConfigMapSource(
        connection,
        ConfigMapSettings(
            namespaces=settings.policy_configmap_namespaces, write_status=settings.policy_status
        ),
        leader=elector,
        on_status_write=on_status_write,
    )
    reloader = PolicyReloader(source, engine, interval=interval, metrics=metrics)
    feed = PolicyFeed(reloader, source, elector)
    if not start:
        return feed
    try:
        await source.start()
        if elector is not None:
            await elector.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONFIGMAP_SYNC_WAIT_SECONDS):
                await source.wait_synced()
        await reloader.settle()
        await reloader.start()
    except BaseException:
        await feed.aclose()
        raise
    return feed


def kube_connection(settings: Settings) -> KubeConnection:
    return KubeConnection(kubeconfig=settings.cluster.kubeconfig, context=settings.cluster.context)


async def build_verifier(settings: Settings, metrics: Metrics | None) -> TokenVerifier:
    """TokenReview; or JWKS from --jwks; or JWKS from the API server (no --jwks, or a
    --jwks URL of the in-cluster API server), fetched with the cluster CA and token."""
    tokens = settings.tokens
    if tokens.mode == "tokenreview":
        return await TokenReviewVerifier.connect(
            tokens,
            kube_connection(settings),
            timeout=tokens.review_timeout_seconds,
            cache_seconds=tokens.review_cache_seconds,
            metrics=TokenReviewMetrics(metrics.registry) if metrics is not None else None,
        )
    source = await jwks_key_source(tokens, kube_connection(settings))
    return JWKSVerifier(tokens, source=source)


def build_inventory(settings: Settings, metrics: Metrics | None) -> PodInventory:
    """The static file with --pods; otherwise a watch of the cluster's pods."""
    if settings.pods is not None:
        return StaticInventory.from_file(settings.pods)
    cluster = settings.cluster
    return WatchInventory(
        kube_connection(settings),
        WatchSettings(
            namespaces=cluster.namespaces,
            label_selector=cluster.pod_selector,
            staleness_seconds=cluster.staleness_seconds,
            resync_seconds=cluster.resync_seconds,
            backoff_max_seconds=cluster.backoff_max_seconds,
        ),
        metrics=WatchMetrics(metrics.registry) if metrics is not None else None,
    )


async def build_edges(
    settings: Settings, metrics: Metrics | None = None, *, start: bool = True
) -> Edges:
    """The production or local implementation of each edge, as configured.

    ``start=False`` builds and checks everything without starting the pod watch
    (the supervisor's preflight, before it forks the workers)."""
    # Local runs (--pods) never reach for a cluster's keys unasked.
    if settings.pods is not None and settings.tokens.mode == "jwks" and not settings.tokens.jwks:
        raise ConfigError("CONFIG_ERROR", "--jwks is required with --pods (file path or URL)")
    inventory = build_inventory(settings, metrics)
    engine = build_engine(settings)
    try:
        feed = await start_policies(settings, engine, metrics, start=start)
    except BaseException:
        await engine.aclose()
        await inventory.aclose()
        raise
    try:
        verifier = await build_verifier(settings, metrics)
    except BaseException:
        await feed.aclose()
        await engine.aclose()
        await inventory.aclose()
        raise
    if start:
        # In the background: a key endpoint that is down holds up /readyz, not start-up.
        await verifier.start()
        if isinstance(inventory, WatchInventory):
            await inventory.start()
    return Edges(
        verifier=verifier,
        inventory=inventory,
        engine=engine,
        reloader=feed.reloader,
        policy_source=feed.source,
        elector=feed.elector,
    )


def create_app(
    settings: Settings,
    edges: Edges,
    *,
    metrics: Metrics | None = None,
    decision_log: DecisionLog | None = None,
    callback: bool = True,
) -> web.Application:
    """The aiohttp application. ``callback=False`` serves only probes and metrics."""
    metrics = metrics or Metrics()
    limiter = Limiter(
        settings.limits, on_refuse=lambda code: metrics.reasons.labels(code=code).inc()
    )
    app = web.Application(
        # Rate limits only; the decision slot is held inside the handler (see http.py).
        middlewares=[error_middleware, limits_middleware(limiter, gate=False)],
        # The handler enforces the limit itself (413); this is the backstop.
        client_max_size=settings.max_body_bytes + 1,
    )
    app[PIPELINE_KEY] = Pipeline(
        identity=settings.identity,
        verifier=edges.verifier,
        inventory=edges.inventory,
        engine=edges.engine,
    )
    app[METRICS_KEY] = metrics
    app[LOG_KEY] = decision_log or DecisionLog()
    app[INVENTORY_KEY] = edges.inventory
    app[ENGINE_KEY] = edges.engine
    app[VERIFIER_KEY] = edges.verifier
    app[MAX_BODY_KEY] = settings.max_body_bytes
    app[ALLOWED_CLIENTS_KEY] = frozenset(settings.tls.allowed_clients)
    app[LIMITER_KEY] = limiter
    add_routes(app, callback=callback)

    async def start_verifier(_: web.Application) -> None:
        # A no-op when build_edges started it; edges built with start=False and
        # served (as some tests do) still fetch their keys before /readyz is asked.
        await edges.verifier.start()

    app.on_startup.append(start_verifier)
    return app


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS; with a client CA, a client certificate is required (ZTS presents one)."""
    tls = settings.tls
    if any(not name or name != name.strip() for name in tls.allowed_clients):
        # An empty name would match a certificate whose CN or a SAN is empty.
        raise ConfigError("CONFIG_ERROR", "--allowed-client: empty or space-padded name")
    _warn_if_open(settings)
    if not tls.enabled:
        if tls.client_ca or tls.allowed_clients:
            raise ConfigError(
                "CONFIG_ERROR", "--client-ca/--allowed-client need --tls-cert/--tls-key"
            )
        return None
    if tls.allowed_clients and not tls.client_ca:
        raise ConfigError("CONFIG_ERROR", "--allowed-client needs --client-ca")
    return tls_context(tls)


def tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """The server's TLS context from the files ``tls`` names, read now; ConfigError
    when one cannot be read or they do not fit (a key that is not the certificate's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward-secret AEAD suites only (TLS 1.3's are all AEAD). No
    # renegotiation; no session tickets, so each connection presents its certificate
    # (a resumed session is not verified again; check_client also checks expiry).
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    try:
        # An encrypted key is refused, never a pass-phrase prompt on a terminal.
        ctx.load_cert_chain(tls.cert or "", tls.key, password=_no_pass_phrase)
        if tls.client_ca:
            ctx.load_verify_locations(cafile=tls.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("CONFIG_ERROR", f"TLS files: {exc}") from exc
    return ctx


def _no_pass_phrase() -> bytes:
    return b""


def _warn_if_open(settings: Settings) -> None:
    """Say so when anyone who reaches a non-loopback port gets decisions."""
    host, _ = host_port(settings.listen)
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    tls = settings.tls
    if not (tls.enabled and tls.client_ca and tls.allowed_clients):
        log.warning(
            "the callback port %s is not loopback and not restricted to the CA's client "
            "certificate (--tls-cert, --client-ca and --allowed-client): any client that "
            "reaches it gets decisions",
            settings.listen,
        )
