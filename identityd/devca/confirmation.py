"""What the dev CA does with a register or refresh request before it signs: pure functions.

Mirrors ZTS (``ZTSImpl.postInstanceRegisterInformation`` /
``postInstanceRefreshInformation`` and ``X509CertRequest``): names are lower-cased,
the CSR's CN must be ``<domain>.<service>``, the instance id comes from the CSR's
``athenz://instanceid/<provider>/<id>`` URI or ``<id>.instanceid.athenz.<suffix>``
DNS name, and the InstanceConfirmation for the provider carries the CSR's SANs
(comma-joined), the caller's TCP address as ``clientIP``, and the instance id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from identityd.callback.request import parse_json
from identityd.errors import BadRequest, Unavailable
from identityd.keys.csr_info import CSRInfo
from identityd.keys.zts_wire import (
    ATTR_CERT_EXPIRY_TIME,
    ATTR_CERT_HOSTNAME,
    ATTR_CERT_REFRESH,
    ATTR_CERT_SUBJECT_OU,
    ATTR_CERT_USAGE,
    ATTR_CLIENT_IP,
    ATTR_CSR,
    ATTR_CSR_PUBLIC_KEY,
    ATTR_HOSTNAME,
    ATTR_INSTANCE_ID,
    ATTR_PRINCIPAL,
    ATTR_SAN_DNS,
    ATTR_SAN_IP,
    ATTR_SAN_URI,
    HOSTNAME_URI_PREFIX,
    INSTANCE_ID_DNS_MARKER,
    INSTANCE_ID_URI_PREFIX,
    InstanceConfirmation,
    join_list,
)
from identityd.settings import MAX_CSR_BYTES, MAX_TOKEN_BYTES

# ZTS's RDL name types (Names.tdl), simplified: SimpleName, DomainName/ServiceName, PathElement.
_SIMPLE = r"[a-zA-Z0-9_][a-zA-Z0-9_-]*"
SIMPLE_NAME = re.compile(rf"^{_SIMPLE}$")
COMPOUND_NAME = re.compile(rf"^{_SIMPLE}(\.{_SIMPLE})*$")
PATH_ELEMENT = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_:.@=-]*$")
MAX_NAME_CHARS = 256
USAGES = ("client", "server")


@dataclass(frozen=True)
class CertRequest:
    """A parsed register (``kind="instance"``) or refresh request."""

    kind: str
    provider: str
    domain: str
    service: str
    attestation_data: str = field(repr=False)
    csr_pem: str = field(repr=False)
    expiry_minutes: int | None = None
    hostname: str | None = None
    instance_id: str | None = None  # from the refresh path

    @property
    def principal(self) -> str:
        return f"{self.domain}.{self.service}"


@dataclass(frozen=True)
class Grant:
    """What the provider's answer lets the CA sign."""

    expiry_minutes: int | None
    refresh: bool
    usage: str | None  # None = client and server
    subject_ou: str | None


def _name(value: object, key: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest("BAD_REQUEST", f"{key}: missing or not a string")
    if len(value) > MAX_NAME_CHARS or not pattern.match(value):
        raise BadRequest("BAD_REQUEST", f"{key}: not a valid name")
    return value.lower()


def _optional_str(doc: dict[str, Any], key: str, limit: int) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest("BAD_REQUEST", f"{key}: not a string of at most {limit} characters")
    return value


def _expiry(doc: dict[str, Any]) -> int | None:
    value = doc.get("expiryTime")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("BAD_REQUEST", "expiryTime: not an integer")
    return value if value > 0 else None


def _object(body: bytes) -> dict[str, Any]:
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise BadRequest("BAD_REQUEST", "body: not a JSON object")
    return doc


def _csr(doc: dict[str, Any]) -> str:
    csr = _optional_str(doc, "csr", MAX_CSR_BYTES)
    if not csr:
        raise BadRequest("BAD_CSR", "csr: missing")
    return csr


def parse_register(body: bytes) -> CertRequest:
    """An InstanceRegisterInformation body; BadRequest naming the field."""
    doc = _object(body)
    attestation = _optional_str(doc, "attestationData", MAX_TOKEN_BYTES * 2)
    if not attestation:
        raise BadRequest("BAD_REQUEST", "attestationData: missing")
    hostname = _optional_str(doc, "hostname", MAX_NAME_CHARS)
    return CertRequest(
        kind="instance",
        provider=_name(doc.get("provider"), "provider", COMPOUND_NAME),
        domain=_name(doc.get("domain"), "domain", COMPOUND_NAME),
        service=_name(doc.get("service"), "service", SIMPLE_NAME),
        attestation_data=attestation,
        csr_pem=_csr(doc),
        expiry_minutes=_expiry(doc),
        hostname=hostname.lower() if hostname else None,
    )


def parse_refresh(
    body: bytes, *, provider: str, domain: str, service: str, instance_id: str
) -> CertRequest:
    """An InstanceRefreshInformation body plus the names from its path."""
    doc = _object(body)
    hostname = _optional_str(doc, "hostname", MAX_NAME_CHARS)
    if not isinstance(instance_id, str) or not PATH_ELEMENT.match(instance_id):
        raise BadRequest("BAD_REQUEST", "instanceId: not a valid path element")
    return CertRequest(
        kind="refresh",
        provider=_name(provider, "provider", COMPOUND_NAME),
        domain=_name(domain, "domain", COMPOUND_NAME),
        service=_name(service, "service", SIMPLE_NAME),
        # Optional in ZTS's RDL; forwarded as given, the provider decides.
        attestation_data=_optional_str(doc, "attestationData", MAX_TOKEN_BYTES * 2) or "",
        csr_pem=_csr(doc),
        expiry_minutes=_expiry(doc),
        hostname=hostname.lower() if hostname else None,
        instance_id=instance_id,
    )


def instance_id_of(csr: CSRInfo, provider: str) -> str:
    """The instance id the CSR names, as ZTS reads it; BadRequest when absent or ambiguous."""
    from_uri: set[str] = set()
    for uri in csr.uris:
        if uri.startswith(INSTANCE_ID_URI_PREFIX):
            named_provider, sep, ident = uri[len(INSTANCE_ID_URI_PREFIX) :].partition("/")
            if not sep or not ident:
                raise BadRequest("CSR_INSTANCE_ID_INVALID", "malformed instance-id URI")
            if named_provider.lower() != provider:
                raise BadRequest(
                    "CSR_INSTANCE_ID_PROVIDER_MISMATCH",
                    f"instance-id URI names provider {named_provider!r}, not {provider!r}",
                )
            from_uri.add(ident)
    from_dns = {
        name.split(INSTANCE_ID_DNS_MARKER, 1)[0]
        for name in csr.dns
        if INSTANCE_ID_DNS_MARKER in name
    }
    found = from_uri or from_dns
    if len(found) > 1 or (from_uri and from_dns and from_uri != from_dns):
        raise BadRequest("CSR_INSTANCE_ID_CONFLICT", "the CSR names more than one instance id")
    if not found:
        raise BadRequest("CSR_INSTANCE_ID_MISSING", "the CSR names no instance id")
    ident = found.pop()
    if not PATH_ELEMENT.match(ident):
        raise BadRequest("CSR_INSTANCE_ID_INVALID", "instance id is not a valid path element")
    return ident


def check_csr(request: CertRequest, csr: CSRInfo) -> str:
    """CN and instance id checks of ZTS's X509CertRequest.validate; returns the instance id."""
    if (csr.cn or "").lower() != request.principal:
        raise BadRequest("CSR_CN_MISMATCH", f"CSR CN {csr.cn!r} is not {request.principal!r}")
    ident = instance_id_of(csr, request.provider)
    if request.instance_id is not None and ident != request.instance_id:
        raise BadRequest(
            "INSTANCE_ID_MISMATCH", "the CSR's instance id is not the one in the request path"
        )
    return ident


def build_confirmation(
    request: CertRequest,
    csr: CSRInfo,
    *,
    instance_id: str,
    client_ip: str,
    public_key_pem: str | None = None,
    principal: str | None = None,
    forward_csr: bool = True,
) -> InstanceConfirmation:
    """The InstanceConfirmation ZTS sends the provider for this request."""
    attributes = {
        ATTR_SAN_DNS: join_list(csr.dns),
        ATTR_SAN_URI: join_list(csr.uris),
        ATTR_CLIENT_IP: client_ip,
        ATTR_INSTANCE_ID: instance_id,
    }
    if public_key_pem:
        attributes[ATTR_CSR_PUBLIC_KEY] = public_key_pem
    if csr.ips:
        attributes[ATTR_SAN_IP] = join_list(csr.ips)
    if request.hostname:
        attributes[ATTR_HOSTNAME] = request.hostname
    hostnames = [
        u[len(HOSTNAME_URI_PREFIX) :] for u in csr.uris if u.startswith(HOSTNAME_URI_PREFIX)
    ]
    if hostnames:
        attributes[ATTR_CERT_HOSTNAME] = hostnames[0]
    if principal:
        attributes[ATTR_PRINCIPAL] = principal
    if forward_csr:
        attributes[ATTR_CSR] = request.csr_pem
    return {
        "provider": request.provider,
        "domain": request.domain,
        "service": request.service,
        "attestationData": request.attestation_data,
        "attributes": attributes,
    }


def read_grant(answer: object) -> Grant:
    """The cert* attributes of a provider's 200 answer; Unavailable when they are broken
    (a provider bug, not the agent's fault)."""
    if not isinstance(answer, dict):
        raise Unavailable("PROVIDER_ANSWER_INVALID", "the answer is not a JSON object")
    attributes = answer.get("attributes")
    attributes = {} if attributes is None else attributes
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise Unavailable("PROVIDER_ANSWER_INVALID", "attributes: not a map of strings")
    expiry_text = attributes.get(ATTR_CERT_EXPIRY_TIME, "")
    expiry: int | None = None
    if expiry_text:
        if not expiry_text.isdigit():
            raise Unavailable("PROVIDER_ANSWER_INVALID", "certExpiryTime: not a number")
        expiry = int(expiry_text) or None
    usage = attributes.get(ATTR_CERT_USAGE) or None
    if usage is not None and usage not in USAGES:
        raise Unavailable("PROVIDER_ANSWER_INVALID", f"certUsage {usage[:32]!r} not supported")
    return Grant(
        expiry_minutes=expiry,
        # ZTS: absent means refresh allowed; "false" means no refresh record is kept.
        refresh=attributes.get(ATTR_CERT_REFRESH, "true").lower() != "false",
        usage=usage,
        subject_ou=attributes.get(ATTR_CERT_SUBJECT_OU) or None,
    )


def lifetime_minutes(
    requested: int | None, granted: int | None, *, default: int, maximum: int
) -> int:
    """The shortest of what the agent asked, what the provider granted and the CA's
    maximum; the CA's default when neither side named one."""
    asked = [m for m in (requested, granted) if m is not None and m > 0]
    return min([*asked, maximum]) if asked else min(default, maximum)
