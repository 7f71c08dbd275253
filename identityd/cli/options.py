"""The one table of server options: flag, environment variable, config-file key, Settings field.

Precedence: command-line flag > ``IDENTITYD_*`` environment variable > ``--config``
file > default. Repeatable options take a comma-separated list from the
environment and a list (or comma-separated string) from the config file.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from identityd.errors import ConfigError
from identityd.settings import (
    ClusterSettings,
    IdentitySettings,
    LimitSettings,
    Settings,
    TLSSettings,
    TokenSettings,
)

ENV_PREFIX = "IDENTITYD_"


@dataclass(frozen=True)
class Option:
    flag: str  # "--dns-suffix"
    target: str  # "identity.dns_suffixes": section.field of Settings
    help: str
    type: Callable[[str], Any] = str
    repeat: bool = False
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


OPTIONS: tuple[Option, ...] = (
    Option("--listen", "listen", "HOST:PORT the callback server listens on"),
    Option(
        "--metrics-listen",
        "metrics_listen",
        "HOST:PORT for plain-HTTP /healthz, /readyz and /metrics (optional; for probes)",
    ),
    Option("--workers", "workers", "server worker processes (default: number of cores)", int),
    Option("--provider", "identity.provider", "provider service name requests must carry"),
    Option("--dns-suffix", "identity.dns_suffixes", "DNS suffix for SAN DNS names", repeat=True),
    Option("--trust-domain", "identity.trust_domain", "SPIFFE trust domain"),
    Option(
        "--cert-expiry-minutes",
        "identity.cert_expiry_minutes",
        "certificate lifetime granted, in minutes",
        int,
    ),
    Option(
        "--cert-usage", "identity.cert_usage", "certUsage granted", choices=("client", "server")
    ),
    Option("--allow-refresh", "identity.allow_refresh", "allow /refresh (true/false)", _bool),
    Option("--min-rsa-bits", "identity.min_rsa_bits", "smallest RSA key accepted in a CSR", int),
    Option("--issuer", "tokens.issuer", "expected token issuer (iss)"),
    Option("--audience", "tokens.audiences", "accepted token audience (aud)", repeat=True),
    Option(
        "--token-mode",
        "tokens.mode",
        "jwks (verify signatures locally) or tokenreview (ask the API server)",
        choices=("jwks", "tokenreview"),
    ),
    Option(
        "--jwks",
        "tokens.jwks",
        "JWKS file or https URL with the token signing keys (unset in a cluster: the API "
        "server's keys)",
    ),
    Option(
        "--jwks-discovery",
        "tokens.jwks_discovery",
        "find the API server's keys through OIDC discovery (true/false)",
        _bool,
    ),
    Option(
        "--token-review-timeout",
        "tokens.review_timeout_seconds",
        "TokenReview timeout, seconds",
        float,
    ),
    Option(
        "--token-review-cache",
        "tokens.review_cache_seconds",
        "reuse a successful TokenReview this long, seconds (0 = never)",
        float,
    ),
    Option(
        "--max-token-age",
        "tokens.max_age_seconds",
        "refuse tokens issued longer ago than this many seconds (0 = no limit)",
        int,
    ),
    Option("--token-leeway", "tokens.leeway_seconds", "clock skew tolerated, seconds", int),
    Option(
        "--pods",
        "pods",
        "static inventory: JSON/YAML list of Pods or a v1/PodList (unset = watch the cluster)",
    ),
    Option("--kubeconfig", "cluster.kubeconfig", "kubeconfig file (unset = in-cluster account)"),
    Option("--kube-context", "cluster.context", "kubeconfig context"),
    Option(
        "--namespace",
        "cluster.namespaces",
        "watch pods in this namespace (default: all)",
        repeat=True,
    ),
    Option(
        "--pod-selector", "cluster.pod_selector", "only watch pods matching this label selector"
    ),
    Option(
        "--inventory-staleness-seconds",
        "cluster.staleness_seconds",
        "watch down longer than this = not ready, callbacks 503",
        float,
    ),
    Option(
        "--inventory-resync-seconds",
        "cluster.resync_seconds",
        "full relist this often to repair drift (0 = never)",
        float,
    ),
    Option(
        "--inventory-backoff-max-seconds",
        "cluster.backoff_max_seconds",
        "longest wait between pod watch reconnects, seconds",
        float,
    ),
    Option("--policies", "policies", "directory of Rego policies (default: policies)"),
    Option(
        "--policy-configmap-namespace",
        "policy_configmap_namespaces",
        "load policies from ConfigMaps labelled openpolicyagent.org/policy=rego here",
        repeat=True,
    ),
    Option(
        "--policy-status",
        "policy_status",
        "write kube-mgmt's status annotation back to policy ConfigMaps (true/false)",
        _bool,
    ),
    Option(
        "--leader-elect",
        "leader_elect",
        "only the holder of a Lease writes policy status (true/false)",
        _bool,
    ),
    Option("--leader-elect-resource-name", "leader_elect_resource_name", "Lease name"),
    Option(
        "--leader-elect-resource-namespace",
        "leader_elect_resource_namespace",
        "Lease namespace (default: the first policy ConfigMap namespace)",
    ),
    Option(
        "--engine",
        "engine",
        "policy engine: embedded (regopy) or opa (sidecar)",
        choices=("embedded", "opa"),
    ),
    Option("--opa-url", "opa_url", "OPA server URL for --engine opa (loopback sidecar)"),
    Option(
        "--policy-reload-seconds",
        "policy_reload_seconds",
        "check the policy source for changes this often (0 = never)",
        float,
    ),
    Option(
        "--decision-timeout", "decision_timeout_seconds", "policy decision timeout, seconds", float
    ),
    Option("--max-body-bytes", "max_body_bytes", "largest callback body accepted", int),
    Option(
        "--client-rate",
        "limits.rate_per_second",
        "callbacks per second one client (CN or address) may send per worker (0 = no limit)",
        float,
    ),
    Option("--client-burst", "limits.burst", "burst allowed above --client-rate", int),
    Option("--max-clients", "limits.max_clients", "clients whose rate is tracked (LRU)", int),
    Option(
        "--max-in-flight", "limits.max_in_flight", "decisions evaluated at once per worker", int
    ),
    Option(
        "--max-queued",
        "limits.max_queued",
        "callbacks waiting for a decision slot; beyond it 503 OVERLOADED",
        int,
    ),
    Option(
        "--queue-timeout",
        "limits.queue_timeout_seconds",
        "longest wait for a decision slot, seconds (then 503 OVERLOADED)",
        float,
    ),
    Option(
        "--max-connections",
        "limits.max_connections",
        "open connections per worker; beyond it new ones are closed at once",
        int,
    ),
    Option(
        "--idle-timeout",
        "limits.idle_timeout_seconds",
        "close a connection with no complete request head this long after it opened "
        "or after its last answer, seconds",
        float,
    ),
    Option("--tls-cert", "tls.cert", "server certificate chain (PEM)"),
    Option("--tls-key", "tls.key", "server private key (PEM)"),
    Option("--client-ca", "tls.client_ca", "CA bundle for client certificates (requires one)"),
    Option(
        "--allowed-client",
        "tls.allowed_clients",
        "CN or SAN a client certificate must carry (any of them)",
        repeat=True,
    ),
    Option(
        "--tls-reload-interval",
        "tls.reload_seconds",
        "check the certificate, key and client-CA files this often and serve new "
        "connections with them once they change and load, seconds (0: never)",
        float,
    ),
    Option(
        "--log-level", "log_level", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    ),
)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with any of the options below")
    for opt in OPTIONS:
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            help=f"{opt.help} [env {opt.env}]",
            action="append" if opt.repeat else "store",
            type=opt.type,
            choices=opt.choices,
            default=None,
        )


def _load_config_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError("CONFIG_ERROR", f"--config {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("CONFIG_ERROR", f"--config {path}: not a mapping")
    known = {o.key for o in OPTIONS} | {o.dest for o in OPTIONS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError("CONFIG_ERROR", f"--config {path}: unknown keys {unknown}")
    return {k.replace("_", "-"): v for k, v in data.items()}


def _convert(opt: Option, raw: Any, origin: str) -> Any:
    try:
        if opt.repeat:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(opt.type(str(i).strip())) for i in items if str(i).strip())
        value = opt.type(str(raw)) if not isinstance(raw, bool) else raw
    except (TypeError, ValueError) as exc:
        raise ConfigError("CONFIG_ERROR", f"{origin}: {exc}") from exc
    if opt.choices and value not in opt.choices:
        raise ConfigError("CONFIG_ERROR", f"{origin}: {value!r} not one of {opt.choices}")
    return value


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Option values by Settings target, after precedence; unset options are absent."""
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _load_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        flag_value = getattr(args, opt.dest, None)
        if flag_value is not None:
            values[opt.target] = tuple(flag_value) if opt.repeat else flag_value
        elif opt.env in environ:
            values[opt.target] = _convert(opt, environ[opt.env], opt.env)
        elif opt.key in file_values:
            values[opt.target] = _convert(opt, file_values[opt.key], f"config {opt.key}")
    return values


def build_settings(values: Mapping[str, Any], base: Settings | None = None) -> Settings:
    settings = base or Settings()
    sections: dict[str, dict[str, Any]] = {
        "identity": {},
        "tokens": {},
        "tls": {},
        "cluster": {},
        "limits": {},
        "": {},
    }
    for target, value in values.items():
        section, _, name = target.rpartition(".")
        sections[section][name] = value
    identity: IdentitySettings = replace(settings.identity, **sections["identity"])
    tokens: TokenSettings = replace(settings.tokens, **sections["tokens"])
    cluster: ClusterSettings = replace(settings.cluster, **sections["cluster"])
    try:
        tls: TLSSettings = replace(settings.tls, **sections["tls"])
        limits: LimitSettings = replace(settings.limits, **sections["limits"])
    except ValueError as exc:
        raise ConfigError("CONFIG_ERROR", str(exc)) from exc
    top = sections[""]
    if "workers" in top and top["workers"] < 1:
        raise ConfigError("CONFIG_ERROR", "--workers must be at least 1")
    result = replace(
        settings, identity=identity, tokens=tokens, tls=tls, cluster=cluster, limits=limits, **top
    )
    if result.engine == "opa" and result.workers > 1:
        # OPA cannot swap a policy set atomically; two workers pushing could leave it
        # mixed. OPA does the evaluating anyway: scale with replicas.
        raise ConfigError("CONFIG_ERROR", "--engine opa runs one worker (--workers 1)")
    if result.tokens.mode == "tokenreview" and result.tokens.jwks:
        raise ConfigError("CONFIG_ERROR", "--jwks has no use with --token-mode tokenreview")
    if result.policies is not None and result.policy_configmap_namespaces:
        # Two sources would both define package identityd: one or the other.
        raise ConfigError(
            "CONFIG_ERROR", "--policies and --policy-configmap-namespace are exclusive"
        )
    if result.leader_elect and not (
        result.leader_elect_resource_namespace or result.policy_configmap_namespaces
    ):
        raise ConfigError("CONFIG_ERROR", "--leader-elect needs a Lease namespace")
    if result.policy_reload_seconds < 0:
        raise ConfigError("CONFIG_ERROR", "--policy-reload-seconds must be 0 or more")
    return result


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    return build_settings(resolve(args, environ))
