"""Who this pod is and what certificate to ask for: pure functions over the token's
claims and the downward-API environment.

The agent does not verify its token (identityd does): it only reads the claims to
learn its own namespace, pod and service account when the environment does not
say. Environment first, token as fallback; a disagreement is reported, and the
request goes out as the environment says — identityd then refuses it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from identityd.errors import ConfigError
from identityd.naming import WorkloadIdentity
from identityd.settings import MAX_TOKEN_BYTES
from identityd.sia.config import (
    ENV_NAMESPACE,
    ENV_POD_IP,
    ENV_POD_IPS,
    ENV_POD_NAME,
    ENV_POD_UID,
    ENV_SERVICE_ACCOUNT,
    AgentConfig,
)

# Names as Kubernetes makes them (DNS-1123 labels; a UID is a UUID), which is also what
# the certificate's names can carry: a namespace becomes an Athenz domain and a DNS
# label, a service account an Athenz SimpleName (no ".": sports + web.api would ask
# for the CN of sports.web + api) and a DNS label, the uid a DNS label. Anything else
# (",", "/", upper case, non-ASCII) would only be refused later, or split a
# comma-joined SAN list on the way.
_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_UID = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?")
# RFC 5280 ub-common-name; cryptography refuses a longer CN.
MAX_CN_CHARS = 64


@dataclass(frozen=True)
class PodFacts:
    namespace: str
    name: str
    uid: str
    service_account: str
    ips: tuple[str, ...]
    # "field: env 'x', token 'y'" for every fact the two disagree on.
    conflicts: tuple[str, ...] = ()


@dataclass(frozen=True)
class CertPlan:
    """The names of the certificate to request (DESIGN §3)."""

    provider: str
    domain: str
    service: str
    instance_id: str
    common_name: str
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    uris: tuple[str, ...]


def read_token(path: Path) -> str:
    """The token as the kubelet wrote it now (it rotates: read it every time)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError("SIA_TOKEN_UNREADABLE", f"{path}: {exc.strerror}") from exc
    if len(raw) > MAX_TOKEN_BYTES:
        raise ConfigError("SIA_TOKEN_UNREADABLE", f"{path}: larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError("SIA_TOKEN_MALFORMED", f"{path}: not ASCII") from exc
    if not token:
        raise ConfigError("SIA_TOKEN_UNREADABLE", f"{path}: empty")
    return token


def token_claims(token: str) -> dict[str, Any]:
    """The claims, unverified: the agent learns from them, identityd judges them."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise ConfigError("SIA_TOKEN_MALFORMED", "the token is not a JWT") from exc
    if not isinstance(claims, dict):
        raise ConfigError("SIA_TOKEN_MALFORMED", "the token's claims are not an object")
    return claims


def _claim(claims: Mapping[str, Any], *path: str) -> str:
    value: Any = claims
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, str) else ""


def _ips(env: Mapping[str, str]) -> tuple[str, ...]:
    text = env.get(ENV_POD_IPS) or env.get(ENV_POD_IP) or ""
    out: dict[str, None] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            out[ipaddress.ip_address(item).compressed] = None
        except ValueError:
            raise ConfigError("SIA_POD_ENV_INVALID", f"pod IP {item[:64]!r} is not an IP") from None
    return tuple(out)


def pod_facts(claims: Mapping[str, Any], env: Mapping[str, str]) -> PodFacts:
    k8s = ("kubernetes.io",)
    from_token = {
        "namespace": _claim(claims, *k8s, "namespace"),
        "name": _claim(claims, *k8s, "pod", "name"),
        "uid": _claim(claims, *k8s, "pod", "uid"),
        "service_account": _claim(claims, *k8s, "serviceaccount", "name"),
    }
    from_env = {
        "namespace": env.get(ENV_NAMESPACE, ""),
        "name": env.get(ENV_POD_NAME, ""),
        "uid": env.get(ENV_POD_UID, ""),
        "service_account": env.get(ENV_SERVICE_ACCOUNT, ""),
    }
    facts: dict[str, str] = {}
    conflicts: list[str] = []
    for key, token_value in from_token.items():
        env_value = from_env[key]
        facts[key] = env_value or token_value
        if env_value and token_value and env_value != token_value:
            conflicts.append(f"{key}: environment {env_value!r}, token {token_value!r}")
    missing = [key for key in ("namespace", "uid", "service_account") if not facts[key]]
    if missing:
        raise ConfigError(
            "SIA_POD_UNKNOWN", f"neither environment nor token name the pod's {', '.join(missing)}"
        )
    return PodFacts(ips=_ips(env), conflicts=tuple(conflicts), **facts)


def _check_names(facts: PodFacts) -> None:
    for what, value, form in (
        ("namespace", facts.namespace, _LABEL),
        ("service account", facts.service_account, _LABEL),
        ("pod uid", facts.uid, _UID),
    ):
        if not form.fullmatch(value):
            raise ConfigError(
                "SIA_NAME_INVALID",
                f"{what} {value[:64]!r} cannot name a certificate: expected {form.pattern}",
            )


def plan_certificate(facts: PodFacts, config: AgentConfig) -> CertPlan:
    """The names to ask for; ``ConfigError("SIA_NAME_INVALID")`` when the pod's names
    cannot make them."""
    _check_names(facts)
    ident = WorkloadIdentity(
        namespace=facts.namespace,
        service_account=facts.service_account,
        pod_uid=facts.uid,
        provider=config.provider,
        dns_suffix=config.dns_suffix,
        trust_domain=config.trust_domain,
    )
    spiffe = ident.athenz_spiffe_uri if config.spiffe == "athenz" else ident.k8s_spiffe_uri
    if len(ident.common_name) > MAX_CN_CHARS:
        raise ConfigError(
            "SIA_NAME_INVALID",
            f"CN {ident.common_name!r} is longer than {MAX_CN_CHARS} characters (X.509's bound)",
        )
    dns = [*ident.san_dns(), *(d for d in config.extra_dns if d not in ident.san_dns())]
    return CertPlan(
        provider=config.provider,
        domain=ident.domain,
        service=ident.service,
        instance_id=facts.uid,
        common_name=ident.common_name,
        dns=tuple(dns),
        ips=facts.ips,
        uris=(spiffe, ident.instance_uri),
    )
