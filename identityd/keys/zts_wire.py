"""The subset of Athenz ZTS's wire format the agent and the dev CA speak (one definition).

From ``core/zts/src/main/rdl/Instance.rdli`` and ``InstanceProvider.rdli`` in
AthenZ/athenz: an agent registers with ``POST /zts/v1/instance``
(InstanceRegisterInformation → 201 + InstanceIdentity, ``Location`` header) and
refreshes with ``POST /zts/v1/instance/{provider}/{domain}/{service}/{instanceId}``
(InstanceRefreshInformation → 200 + InstanceIdentity, over mTLS with the current
certificate). Between the two, ZTS asks the provider with an InstanceConfirmation
whose attributes carry the names below. Errors are a ResourceError body.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NotRequired, TypedDict
from urllib.parse import quote

import aiohttp

ZTS_PREFIX = "/zts/v1"
INSTANCE_PATH = f"{ZTS_PREFIX}/instance"

# InstanceConfirmation attribute names ZTS sends (InstanceProvider.java). Lists are
# comma-joined strings.
ATTR_SAN_DNS = "sanDNS"
ATTR_SAN_IP = "sanIP"
ATTR_SAN_URI = "sanURI"
ATTR_CLIENT_IP = "clientIP"
ATTR_INSTANCE_ID = "instanceId"
ATTR_CSR_PUBLIC_KEY = "csrPublicKey"
ATTR_HOSTNAME = "hostname"
ATTR_CERT_HOSTNAME = "certHostname"
ATTR_PRINCIPAL = "principal"
# Not a ZTS attribute: the PEM CSR itself, which identityd verifies when present (DESIGN §2).
ATTR_CSR = "csr"

# Attributes a provider may set in its answer, which the CA reads and removes.
ATTR_CERT_EXPIRY_TIME = "certExpiryTime"  # minutes, as a string
ATTR_CERT_REFRESH = "certRefresh"  # "true" | "false"
ATTR_CERT_USAGE = "certUsage"  # "client" | "server"; absent = both
ATTR_CERT_SUBJECT_OU = "certSubjectOU"
ANSWER_ATTRIBUTES = (
    ATTR_CERT_EXPIRY_TIME,
    ATTR_CERT_REFRESH,
    ATTR_CERT_USAGE,
    ATTR_CERT_SUBJECT_OU,
)

# SAN forms that name the instance (DESIGN §3) and the host (ZTS's certHostname).
INSTANCE_ID_URI_PREFIX = "athenz://instanceid/"
INSTANCE_ID_DNS_MARKER = ".instanceid.athenz."
HOSTNAME_URI_PREFIX = "athenz://hostname/"


class InstanceRegisterInformation(TypedDict):
    provider: str
    domain: str
    service: str
    attestationData: str
    csr: str
    expiryTime: NotRequired[int]  # minutes; the CA enforces its own maximum
    hostname: NotRequired[str]
    hostCnames: NotRequired[list[str]]


class InstanceRefreshInformation(TypedDict, total=False):
    attestationData: str
    csr: str
    expiryTime: int
    hostname: str
    hostCnames: list[str]


class InstanceIdentity(TypedDict):
    provider: str
    name: str  # <domain>.<service>
    instanceId: str
    x509Certificate: NotRequired[str]
    x509CertificateSigner: NotRequired[str]
    attributes: NotRequired[dict[str, str]]


class InstanceConfirmation(TypedDict):
    provider: str
    domain: str
    service: str
    attestationData: str
    attributes: NotRequired[dict[str, str]]


class ResourceError(TypedDict):
    code: int
    message: str


def join_list(values: Iterable[str]) -> str:
    """ZTS's list encoding in attributes: comma-joined, no spaces."""
    return ",".join(values)


def refresh_path(provider: str, domain: str, service: str, instance_id: str) -> str:
    """``/zts/v1/instance/{provider}/{domain}/{service}/{instanceId}``, each part escaped."""
    parts = (provider, domain, service, instance_id)
    return "/".join([INSTANCE_PATH, *(quote(part, safe="") for part in parts)])


async def read_answer(content: aiohttp.StreamReader, limit: int) -> bytes:
    """An HTTP answer's body, whole, or its first ``limit`` + 1 bytes when longer (the
    caller refuses those). ``read(n)`` alone returns what has arrived so far: one
    chunk, one TLS record."""
    raw = b""
    while len(raw) <= limit:
        chunk = await content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return raw
