"""Configuration as frozen values. Every timeout and bound is named here, with why.

The CLI builds a :class:`Settings` from flags, ``IDENTITYD_*`` environment
variables and an optional config file; everything else receives the pieces it
needs through its constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Tokens: tolerated clock difference between the API server and us. Small on
# purpose: it widens every token's validity window by this much at both ends.
CLOCK_SKEW_SECONDS = 30
# Refetch a JWKS on an unknown `kid` at most this often, so a flood of forged
# kids cannot turn into a flood of requests to the key endpoint (at most 2/s),
# while a rotated key is picked up within a second.
JWKS_REFETCH_INTERVAL_SECONDS = 0.5
# Refresh a JWKS URL in the background this often even without unknown kids.
JWKS_MAX_AGE_SECONDS = 3600.0
# Timeout for one JWKS fetch.
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
# A JWT larger than this is refused before it is decoded (real SA tokens are ~1 KiB).
MAX_TOKEN_BYTES = 16 * 1024

# Callback: the CA's own timeout is 30 s; a decision must come back far sooner.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_DECISION_TIMEOUT_SECONDS = 2.0
# A client must deliver its whole body within this time (slow-body clients hold a handler).
BODY_READ_TIMEOUT_SECONDS = 5.0
# JSON nested deeper than this is refused (a real InstanceConfirmation is depth 2).
MAX_JSON_DEPTH = 8
# A CSR PEM larger than this is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
# At most this many SAN entries per kind in a request or CSR.
MAX_SAN_ENTRIES = 32

# Policies: how often the policy source is checked for changes (hot reload).
DEFAULT_POLICY_RELOAD_SECONDS = 2.0
DEFAULT_OPA_URL = "http://127.0.0.1:8181"

# Callback limits.
# Per client and per worker process. Generous: a single CA (one mTLS identity)
# may legitimately send the whole load; this stops a runaway, not normal traffic.
DEFAULT_CLIENT_RATE_PER_SECOND = 1000.0
DEFAULT_CLIENT_BURST = 2000
# Buckets kept; the least recently seen client is forgotten first (memory bound
# under a flood of source addresses; a forgotten client starts with a full bucket).
DEFAULT_MAX_CLIENTS = 10_000
# Decisions evaluated at once per worker; more wait in the queue.
DEFAULT_MAX_IN_FLIGHT = 128
# Requests waiting for a slot; beyond this identityd answers 503 at once.
DEFAULT_MAX_QUEUED = 1024
# Longest wait for a slot: equal to the decision timeout, far inside the CA's 30 s.
DEFAULT_QUEUE_TIMEOUT_SECONDS = 2.0
LIMITED_PATHS = ("/instance", "/refresh")
# Open connections per worker, TLS handshakes included; beyond it new ones are closed
# at once (a CA keeps a pool of tens). A connection in its TLS handshake holds ~300 KiB
# (asyncio's TLS buffer): 512 of them fit the Deployment's 512 MiB. Also kept below
# the open-file limit (identityd/cli/connections.py).
DEFAULT_MAX_CONNECTIONS = 512
# A connection must complete a request head within this long of opening or of its
# previous answer, else it is closed (idle keep-alive, or a head sent a byte at a time).
DEFAULT_IDLE_TIMEOUT_SECONDS = 30.0
DEFAULT_TLS_RELOAD_SECONDS = 30.0

# Certificates.
DEFAULT_CERT_EXPIRY_MINUTES = 60 * 24
MIN_RSA_BITS = 2048
# RSA keys refused outright, wherever they come from (token signing keys, CSR and
# csrPublicKey keys): nobody issues larger ones, and verification cost grows with
# the modulus; real keys use the exponent 65537 (17 bits).
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT_BITS = 64


@dataclass(frozen=True)
class TLSSettings:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    # CN or SAN (DNS/URI) values a client certificate must carry one of; empty = any
    # certificate that chains to client_ca.
    allowed_clients: tuple[str, ...] = ()
    # How often the certificate, key and client-CA files are checked for a change
    # (a rotated Secret); 0: never, the files read at start-up stay in force.
    reload_seconds: float = DEFAULT_TLS_RELOAD_SECONDS

    def __post_init__(self) -> None:
        if isinstance(self.reload_seconds, bool) or not self.reload_seconds >= 0:
            raise ValueError(f"reload_seconds: must not be negative, got {self.reload_seconds}")

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class TokenSettings:
    issuer: str = "https://kubernetes.default.svc.cluster.local"
    audiences: tuple[str, ...] = ("identityd",)
    jwks: str | None = None  # file path or http(s) URL
    leeway_seconds: int = CLOCK_SKEW_SECONDS
    # 0 = no limit. Bound tokens are short-lived; this caps tokens minted long ago.
    max_age_seconds: int = 0
    refetch_interval_seconds: float = JWKS_REFETCH_INTERVAL_SECONDS
    max_key_age_seconds: float = JWKS_MAX_AGE_SECONDS
    fetch_timeout_seconds: float = JWKS_FETCH_TIMEOUT_SECONDS
    # "jwks": verify signatures locally (keys from --jwks, or the API server's when
    # unset); "tokenreview": ask the API server (TokenReview) about every new token.
    mode: str = "jwks"
    # With the API server's keys: find them through OIDC discovery instead of /openid/v1/jwks.
    jwks_discovery: bool = False
    review_timeout_seconds: float = 1.0
    # A successful review is reused this long (never past the token's exp); 0 = never.
    review_cache_seconds: float = 10.0


@dataclass(frozen=True)
class IdentitySettings:
    """The naming conventions of DESIGN §3, handed to the policy as ``input.config``."""

    provider: str = "sys.auth.k8s"
    dns_suffixes: tuple[str, ...] = ("k8s.example.com",)
    trust_domain: str = "cluster.local"
    cert_expiry_minutes: int = DEFAULT_CERT_EXPIRY_MINUTES
    cert_usage: str = "client"
    allow_refresh: bool = True
    min_rsa_bits: int = MIN_RSA_BITS


@dataclass(frozen=True)
class LimitSettings:
    """``rate_per_second`` 0 switches per-client limiting off; the gate always applies."""

    rate_per_second: float = DEFAULT_CLIENT_RATE_PER_SECOND
    burst: int = DEFAULT_CLIENT_BURST
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_queued: int = DEFAULT_MAX_QUEUED
    queue_timeout_seconds: float = DEFAULT_QUEUE_TIMEOUT_SECONDS
    paths: tuple[str, ...] = LIMITED_PATHS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        if self.rate_per_second < 0:
            raise ValueError(f"rate_per_second: must not be negative, got {self.rate_per_second}")
        if self.rate_per_second > 0 and self.burst < 1:
            raise ValueError(f"burst: must be at least 1, got {self.burst}")
        for name in ("max_clients", "max_in_flight", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued: must not be negative, got {self.max_queued}")
        for name in ("queue_timeout_seconds", "idle_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ClusterSettings:
    """How identityd reaches the API server and which pods it keeps (no --pods = watch)."""

    kubeconfig: str | None = None  # None = in-cluster service account
    context: str | None = None
    namespaces: tuple[str, ...] = ()  # empty = all namespaces
    pod_selector: str | None = None
    # A watch down longer than this fails /readyz and callbacks get 503 (no stale allows).
    staleness_seconds: float = 60.0
    # Full relist this often to repair drift; 0 = never.
    resync_seconds: float = 1800.0
    # Longest wait between watch reconnects (exponential backoff with jitter up to it).
    backoff_max_seconds: float = 1.0


@dataclass(frozen=True)
class Settings:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    listen: str = "127.0.0.1:8443"
    # Plain-HTTP port for probes and metrics; kubelet probes carry no client certificate.
    metrics_listen: str | None = None
    pods: str | None = None  # static inventory file; None = watch the cluster's pods
    # Local policy directory; default "policies" unless ConfigMaps are the source.
    policies: str | None = None
    # Namespaces whose ConfigMaps labelled openpolicyagent.org/policy=rego are the policy set.
    policy_configmap_namespaces: tuple[str, ...] = ()
    policy_status: bool = True  # write kube-mgmt's status annotation back
    # Only the Lease holder writes status (several replicas share the ConfigMaps).
    leader_elect: bool = False
    leader_elect_resource_name: str = "identityd-policy-status"
    leader_elect_resource_namespace: str | None = None  # default: first policy namespace
    engine: str = "embedded"  # "embedded" (regopy, in-process) or "opa" (sidecar REST)
    opa_url: str = DEFAULT_OPA_URL
    # 0 disables hot reload: the policies loaded at start-up stay.
    policy_reload_seconds: float = DEFAULT_POLICY_RELOAD_SECONDS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    decision_timeout_seconds: float = DEFAULT_DECISION_TIMEOUT_SECONDS
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    log_level: str = "INFO"

    @property
    def policy_dir(self) -> str:
        return self.policies or "policies"


def host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8443`` for IPv6); raise ValueError naming the value."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an explicit empty host
