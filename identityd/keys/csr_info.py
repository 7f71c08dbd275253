"""What identityd reads out of a CSR, as a plain value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CSRInfo:
    cn: str | None
    dns: tuple[str, ...]
    ips: tuple[str, ...]  # normalised (ipaddress.ip_address(...).compressed)
    uris: tuple[str, ...]
    # SAN kinds identityd never grants (email, directoryName, otherName, ...).
    other_sans: tuple[str, ...]
    key_type: str  # "RSA" | "EC" | "Ed25519" | "Ed448" | "DSA" | ...
    key_bits: int
    curve: str | None  # "secp256r1", ... for EC
    public_key_sha256: str  # hex SHA-256 of the SubjectPublicKeyInfo DER
    subject: str  # RFC 4514 string, for the decision log and policy

    def as_input(self) -> dict[str, object]:
        return {
            "cn": self.cn or "",
            "dns": list(self.dns),
            "ips": list(self.ips),
            "uris": list(self.uris),
            "other_sans": list(self.other_sans),
            "key_type": self.key_type,
            "key_bits": self.key_bits,
            "curve": self.curve or "",
            "public_key_sha256": self.public_key_sha256,
            "subject": self.subject,
        }
