"""A :class:`CertificateAuthority` from PEM files, and facts read off a certificate.

``CertificateAuthority()`` always makes a fresh key; the dev CA keeps its key
across restarts (agents and identityd trust its certificate), so it is loaded
here. Only what ``CertificateAuthority.sign`` uses is set: ``key`` and
``certificate``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from identityd.errors import ConfigError
from identityd.keys.certs import CertificateAuthority
from identityd.keys.csr import public_key_sha256


def authority_from_pem(cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
    """The CA of ``cert_pem`` signing with ``key_pem`` (an EC key); ConfigError if they
    do not parse, do not match, or the certificate is not a CA."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ConfigError("CONFIG_ERROR", f"CA files do not parse ({type(exc).__name__})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CONFIG_ERROR", "the CA key must be an EC key")
    if public_key_sha256(key.public_key()) != public_key_sha256(certificate.public_key()):
        raise ConfigError("CONFIG_ERROR", "the CA key does not match the CA certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise ConfigError("CONFIG_ERROR", "the CA certificate is not a CA (basicConstraints)")
    authority = CertificateAuthority.__new__(CertificateAuthority)
    authority.key = key
    authority.certificate = certificate
    return authority


@dataclass(frozen=True)
class CertFacts:
    """What the agent and the dev CA read off a leaf certificate."""

    common_name: str | None
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    uris: tuple[str, ...]
    public_key_sha256: str

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before


def cert_facts(certificate: x509.Certificate) -> CertFacts:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if names else None
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(ip.compressed for ip in san.get_values_for_type(x509.IPAddress))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, ips, uris = (), (), ()
    return CertFacts(
        common_name=cn if isinstance(cn, str) else None,
        serial=certificate.serial_number,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        dns=dns,
        ips=ips,
        uris=uris,
        public_key_sha256=public_key_sha256(certificate.public_key()),
    )
