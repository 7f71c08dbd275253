"""Build the policy input document (policies/README.md, version 1). Pure.

Python computes here what the Rego engines cannot do portably (IP
normalisation, time arithmetic) and hands it over in ``facts``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from identityd.callback.request import LIST_ATTRIBUTES, PEM_ATTRIBUTES, CallbackRequest
from identityd.inventory.base import PodRecord
from identityd.keys.csr_info import CSRInfo
from identityd.keys.key_info import KeyInfo
from identityd.policy.base import INPUT_VERSION
from identityd.settings import IdentitySettings
from identityd.tokens.base import TokenClaims

ALLOWED_EC_CURVES = ("secp256r1", "secp384r1")


def normalise_ip(text: str) -> str | None:
    """Canonical text of an IP address, or None.

    Zone ids (``fe80::1%eth0``) are refused: a certificate cannot carry them.
    IPv4-mapped IPv6 stays IPv6 (``::ffff:a01:203``), so it never equals the
    pod's IPv4 address: a SAN in that form is not the pod's.
    """
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        return None


def _split_ips(items: list[str]) -> tuple[list[str], list[str]]:
    valid: list[str] = []
    invalid: list[str] = []
    for item in items:
        ip = normalise_ip(item)
        if ip is None:
            invalid.append(item)
        elif ip not in valid:
            valid.append(ip)
    return valid, invalid


def request_section(req: CallbackRequest) -> dict[str, Any]:
    # PEM attributes stay out of the policy input: the parsed CSR is in input.csr.
    attributes: dict[str, Any] = {
        k: v for k, v in req.attributes.items() if k not in PEM_ATTRIBUTES
    }
    for name in LIST_ATTRIBUTES:
        attributes[name] = req.list_attribute(name)
    return {
        "provider": req.provider,
        "domain": req.domain,
        "service": req.service,
        "attributes": attributes,
    }


def token_section(claims: TokenClaims) -> dict[str, Any]:
    node = {"name": claims.node_name, "uid": claims.node_uid or ""} if claims.node_name else None
    return {
        "issuer": claims.issuer,
        "audience": list(claims.audience),
        "subject": claims.subject,
        "namespace": claims.namespace,
        "service_account": claims.service_account,
        "service_account_uid": claims.service_account_uid,
        "pod": {"name": claims.pod_name, "uid": claims.pod_uid},
        "node": node,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
        "nbf": claims.not_before if claims.not_before is not None else claims.issued_at,
        "verified_by": claims.verified_by,
    }


def pod_section(pod: PodRecord | None, found_by: str) -> dict[str, Any] | None:
    if pod is None:
        return None
    return {
        "uid": pod.uid,
        "namespace": pod.namespace,
        "name": pod.name,
        "service_account": pod.service_account,
        "phase": pod.phase,
        "ips": [ip for ip in (normalise_ip(i) for i in pod.ips) if ip],
        "node": pod.node_name or "",
        "labels": dict(pod.labels),
        "annotations": dict(pod.annotations),
        "start_time": pod.start_time or "",
        "terminating": pod.terminating,
        "found_by": found_by,
    }


def key_section(csr: CSRInfo | None, public_key: KeyInfo | None) -> dict[str, object] | None:
    """The key the certificate will carry, judged by policy whichever way it came.

    ZTS usually sends only csrPublicKey; the CSR's key wins when both are sent
    (the pipeline has checked they are the same key). None when neither is:
    nothing to judge, the CA has no key to certify."""
    if csr is not None:
        return KeyInfo.of_csr(csr).as_input()
    return public_key.as_input() if public_key is not None else None


def config_section(identity: IdentitySettings) -> dict[str, Any]:
    return {
        "provider": identity.provider,
        "dns_suffixes": list(identity.dns_suffixes),
        "trust_domain": identity.trust_domain,
        "cert_expiry_minutes": identity.cert_expiry_minutes,
        "cert_usage": identity.cert_usage,
        "allow_refresh": identity.allow_refresh,
        "min_rsa_bits": identity.min_rsa_bits,
        "allowed_ec_curves": list(ALLOWED_EC_CURVES),
    }


def facts_section(
    req: CallbackRequest, claims: TokenClaims, csr: CSRInfo | None, now: float
) -> dict[str, Any]:
    client_raw = req.attributes.get("clientIP", "")
    client_ip = normalise_ip(client_raw) if client_raw else None
    san_ips, san_invalid = _split_ips(req.list_attribute("sanIP"))
    _, csr_invalid = _split_ips(list(csr.ips)) if csr else ([], [])
    return {
        "now": int(now),
        "token_age_seconds": max(0, int(now) - claims.issued_at),
        "client_ip": client_ip or "",
        "client_ip_valid": client_ip is not None,
        "san_ips": san_ips,
        "san_ips_invalid": san_invalid,
        "csr_ips_invalid": csr_invalid,
    }


def build_input(
    req: CallbackRequest,
    claims: TokenClaims,
    pod: PodRecord | None,
    csr: CSRInfo | None,
    identity: IdentitySettings,
    *,
    now: float,
    found_by: str = "uid",
    public_key: KeyInfo | None = None,
) -> dict[str, Any]:
    """The input document. ``public_key`` is attribute csrPublicKey, parsed."""
    return {
        "version": INPUT_VERSION,
        "kind": req.kind,
        "request": request_section(req),
        "token": token_section(claims),
        "pod": pod_section(pod, found_by),
        "csr": csr.as_input() if csr else None,
        "key": key_section(csr, public_key),
        "config": config_section(identity),
        "facts": facts_section(req, claims, csr, now),
    }
