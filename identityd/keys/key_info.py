"""The public key a certificate would carry, as a plain value the policy judges."""

from __future__ import annotations

from dataclasses import dataclass

from identityd.keys.csr_info import CSRInfo

# Where the key came from: the forwarded CSR, or ZTS's attribute csrPublicKey.
SOURCE_CSR = "csr"
SOURCE_CSR_PUBLIC_KEY = "csrPublicKey"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    source: str  # SOURCE_CSR | SOURCE_CSR_PUBLIC_KEY
    key_type: str  # "RSA" | "EC" | "Ed25519" | "Ed448" | "DSA"
    key_bits: int
    curve: str | None  # "secp256r1", ... for EC
    public_key_sha256: str  # hex SHA-256 of the SubjectPublicKeyInfo DER

    @classmethod
    def of_csr(cls, csr: CSRInfo) -> KeyInfo:
        return cls(
            source=SOURCE_CSR,
            key_type=csr.key_type,
            key_bits=csr.key_bits,
            curve=csr.curve,
            public_key_sha256=csr.public_key_sha256,
        )

    def as_input(self) -> dict[str, object]:
        return {
            "source": self.source,
            "key_type": self.key_type,
            "key_bits": self.key_bits,
            "curve": self.curve or "",
            "public_key_sha256": self.public_key_sha256,
        }
