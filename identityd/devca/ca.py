"""The development CA: ZTS's register and refresh flows around a provider callback.

Not a production CA: keys and instance records live in memory (a restart forgets
which certificates may refresh; agents then register again), there is no
revocation list, no ZMS authorisation of the provider for the domain, and no
audit store beyond :attr:`DevCA.events`.

Register: parse → CSR CN = ``<domain>.<service>`` → instance id from the CSR →
provider known → ask the provider (``/instance``) → sign → 201.
Refresh: the mTLS client certificate must be ``<domain>.<service>`` and one this
CA issued for that instance (current or previous serial; anything else revokes
the record, as ZTS does) → same CSR checks → ask the provider (``/refresh``) →
sign → 200.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identityd.devca.confirmation import (
    CertRequest,
    build_confirmation,
    check_csr,
    lifetime_minutes,
    parse_refresh,
    parse_register,
    read_grant,
)
from identityd.devca.provider import Provider
from identityd.errors import BadRequest, Denied
from identityd.keys.ca_pem import cert_facts
from identityd.keys.certs import CertificateAuthority
from identityd.keys.csr import parse_csr
from identityd.keys.zts_wire import InstanceIdentity, refresh_path
from identityd.settings import DEFAULT_CERT_EXPIRY_MINUTES

log = logging.getLogger("identityd.devca")

# ZTS's default upper bound for instance certificates is 30 days.
MAX_CERT_EXPIRY_MINUTES = 30 * 24 * 60
_REVOKED = -1


class Unauthenticated(Denied):
    """ZTS answers 401 when the refresh comes without a usable client certificate."""

    status = 401
    default_code = "CLIENT_CERT_REQUIRED"


@dataclass(frozen=True)
class DevCASettings:
    default_expiry_minutes: int = DEFAULT_CERT_EXPIRY_MINUTES
    max_expiry_minutes: int = MAX_CERT_EXPIRY_MINUTES
    # Forward the PEM CSR to the provider as attribute "csr" (DESIGN §2).
    forward_csr: bool = True
    # Send attribute csrPublicKey (the CSR's public key as PEM), as ZTS does.
    send_csr_public_key: bool = True


@dataclass
class InstanceRecord:
    """ZTS's X509CertRecord: which certificates of an instance may refresh."""

    provider: str
    instance_id: str
    principal: str
    current_serial: int
    previous_serial: int


@dataclass(frozen=True)
class IssueEvent:
    """One certificate issued; the attestation is kept only as a digest."""

    kind: str
    provider: str
    instance_id: str
    principal: str
    serial: int
    client_ip: str
    attestation_sha256: str
    lifetime_minutes: int
    usage: str


class DevCA:
    def __init__(
        self,
        authority: CertificateAuthority,
        providers: Mapping[str, Provider],
        settings: DevCASettings | None = None,
    ) -> None:
        self._authority = authority
        self._providers = dict(providers)
        self._settings = settings or DevCASettings()
        self.records: dict[tuple[str, str], InstanceRecord] = {}
        self.events: list[IssueEvent] = []

    @property
    def ca_pem(self) -> str:
        return self._authority.cert_pem.decode("ascii")

    async def register(self, body: bytes, *, client_ip: str) -> tuple[InstanceIdentity, str]:
        """Handle ``POST /zts/v1/instance``; returns the identity and its Location."""
        request = parse_register(body)
        provider = self._provider(request.provider)
        identity = await self._issue(request, provider, client_ip=client_ip, principal=None)
        location = refresh_path(
            request.provider, request.domain, request.service, identity["instanceId"]
        )
        return identity, location

    async def refresh(
        self,
        body: bytes,
        *,
        provider: str,
        domain: str,
        service: str,
        instance_id: str,
        client_ip: str,
        client_cert: x509.Certificate | None,
    ) -> InstanceIdentity:
        """Handle ``POST /zts/v1/instance/{provider}/{domain}/{service}/{instanceId}``."""
        request = parse_refresh(
            body, provider=provider, domain=domain, service=service, instance_id=instance_id
        )
        if client_cert is None:
            raise Unauthenticated("CLIENT_CERT_REQUIRED", "refresh needs the current certificate")
        facts = cert_facts(client_cert)
        if (facts.common_name or "").lower() != request.principal:
            raise BadRequest(
                "PRINCIPAL_MISMATCH",
                f"client certificate is {facts.common_name!r}, the request names "
                f"{request.principal!r}",
            )
        record = self.records.get((request.provider, instance_id))
        if record is None:
            raise Denied("CERT_RECORD_NOT_FOUND", "no refreshable certificate for this instance")
        if record.principal != request.principal:
            raise BadRequest("SERVICE_MISMATCH", "the instance was registered for another service")
        if facts.serial not in (record.current_serial, record.previous_serial):
            # A certificate this CA never issued for the instance, or one replaced twice:
            # possibly stolen. ZTS revokes the instance; so does the dev CA.
            record.current_serial = record.previous_serial = _REVOKED
            raise Denied("CERT_REVOKED", "client certificate is not the instance's current one")
        return await self._issue(
            request,
            self._provider(request.provider),
            client_ip=client_ip,
            principal=request.principal,
            presented_serial=facts.serial,
        )

    def _provider(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            raise BadRequest("UNKNOWN_PROVIDER", f"no provider {name!r} is configured")
        return provider

    async def _issue(
        self,
        request: CertRequest,
        provider: Provider,
        *,
        client_ip: str,
        principal: str | None,
        presented_serial: int | None = None,
    ) -> InstanceIdentity:
        csr_info = parse_csr(request.csr_pem)
        instance_id = check_csr(request, csr_info)
        csr = x509.load_pem_x509_csr(request.csr_pem.encode("ascii"))
        public_key_pem = (
            csr.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )
        confirmation = build_confirmation(
            request,
            csr_info,
            instance_id=instance_id,
            client_ip=client_ip,
            public_key_pem=public_key_pem if self._settings.send_csr_public_key else None,
            principal=principal,
            forward_csr=self._settings.forward_csr,
        )
        grant = read_grant(await provider.confirm(request.kind, confirmation))
        minutes = lifetime_minutes(
            request.expiry_minutes,
            grant.expiry_minutes,
            default=self._settings.default_expiry_minutes,
            maximum=self._settings.max_expiry_minutes,
        )
        usage = grant.usage or "both"
        cert = self._authority.sign(
            csr.public_key(),
            common_name=request.principal,
            dns=csr_info.dns,
            ips=csr_info.ips,
            uris=csr_info.uris,
            usage=usage,
            lifetime=datetime.timedelta(minutes=minutes),
            ou=grant.subject_ou,
        )
        self._remember(request, instance_id, cert.serial_number, grant.refresh, presented_serial)
        self.events.append(
            IssueEvent(
                kind=request.kind,
                provider=request.provider,
                instance_id=instance_id,
                principal=request.principal,
                serial=cert.serial_number,
                client_ip=client_ip,
                attestation_sha256=hashlib.sha256(request.attestation_data.encode()).hexdigest(),
                lifetime_minutes=minutes,
                usage=usage,
            )
        )
        log.info(
            "%s %s instance %s: issued serial %x for %d minutes (%s)",
            request.kind,
            request.principal,
            instance_id,
            cert.serial_number,
            minutes,
            usage,
        )
        return {
            "provider": request.provider,
            "name": request.principal,
            "instanceId": instance_id,
            "x509Certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            "x509CertificateSigner": self.ca_pem,
        }

    def _remember(
        self,
        request: CertRequest,
        instance_id: str,
        serial: int,
        refreshable: bool,
        presented_serial: int | None,
    ) -> None:
        key = (request.provider, instance_id)
        if not refreshable:
            # certRefresh=false: ZTS keeps no record, so this certificate cannot refresh.
            self.records.pop(key, None)
            return
        record = self.records.get(key)
        if record is None or request.kind == "instance":
            self.records[key] = InstanceRecord(
                request.provider, instance_id, request.principal, serial, serial
            )
            return
        if presented_serial == record.current_serial:
            record.previous_serial = record.current_serial
        record.current_serial = serial
