"""Certificate recipes for the dev CA, the demo and tests: a CA, and leaf certificates it signs.

Not a production CA: no revocation, no policy, keys kept in memory.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identityd.keys.csr import generate_key, key_to_pem

# Leaf certificates are backdated a little so a peer's clock skew does not reject them.
BACKDATE = datetime.timedelta(minutes=5)
USAGES = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "both": [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
}


@dataclass(frozen=True)
class Issued:
    key_pem: bytes
    cert_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


class CertificateAuthority:
    def __init__(self, common_name: str, *, lifetime_days: int = 365) -> None:
        self.key = generate_key("EC")
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=lifetime_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self._signing_key, hashes.SHA256())
        )

    @property
    def _signing_key(self) -> CertificateIssuerPrivateKeyTypes:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):
            raise TypeError("the CA key must be an EC key")
        return self.key

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(
        self,
        public_key: x509.Certificate | object,
        *,
        common_name: str,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        usage: str = "both",
        lifetime: datetime.timedelta = datetime.timedelta(hours=24),
        ou: str | None = None,
    ) -> x509.Certificate:
        """Sign a leaf certificate for ``public_key`` (from a CSR or a fresh key)."""
        if usage not in USAGES:
            raise ValueError(f"usage: expected one of {sorted(USAGES)}, got {usage!r}")
        now = datetime.datetime.now(datetime.UTC)
        attributes = []
        if ou:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(USAGES[usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._signing_key, hashes.SHA256())

    def issue(self, common_name: str, **kwargs: object) -> Issued:
        """A fresh EC key and a certificate for it."""
        key = generate_key("EC")
        cert = self.sign(key.public_key(), common_name=common_name, **kwargs)  # type: ignore[arg-type]
        return Issued(key_to_pem(key), cert.public_bytes(serialization.Encoding.PEM))
