"""Public keys and CSRs no honest agent makes, built by hand in DER (cryptography will not
build them): RSA moduli that are even, powers of 2 or 3, have a small factor or more
than 8192 bits; odd exponents; EC keys with explicit curve parameters or a compressed
point; and CSRs carrying such keys, validly self-signed where the key allows it.

Shared by tests/keys, tests/callback and the adversarial corpus.
"""

from __future__ import annotations

import base64
import hashlib
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identityd.keys import build_csr

# --- DER by hand -------------------------------------------------------------------------------


def tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + value


def der_int(value: int) -> bytes:
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(dotted: str) -> bytes:
    first, second, *rest = (int(p) for p in dotted.split("."))
    out = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def bit_string(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)


def octets(data: bytes) -> bytes:
    return tlv(0x04, data)


NULL = b"\x05\x00"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
EC_PUBLIC_KEY = "1.2.840.10045.2.1"
PRIME_P256 = "1.2.840.10045.3.1.7"


def to_pem(der: bytes, label: str) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def public_key_pem(der: bytes) -> str:
    return to_pem(der, "PUBLIC KEY")


# --- broken public keys (SubjectPublicKeyInfo DER) ----------------------------------------------


def rsa_spki(n: int, e: int = 65537, *, null_parameters: bool = True) -> bytes:
    algorithm = seq(oid(RSA_ENCRYPTION), NULL) if null_parameters else seq(oid(RSA_ENCRYPTION))
    return seq(algorithm, bit_string(seq(der_int(n), der_int(e))))


# P-256 spelled out (SEC 2), for the explicit-parameters form.
_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
_GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def ec_explicit_spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The P-256 key with the curve written out (SpecifiedECDomain) instead of its OID."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    parameters = seq(
        der_int(1),
        seq(oid("1.2.840.10045.1.1"), der_int(_P)),  # prime-field
        seq(octets((_P - 3).to_bytes(32, "big")), octets(_B.to_bytes(32, "big"))),
        octets(b"\x04" + _GX.to_bytes(32, "big") + _GY.to_bytes(32, "big")),
        der_int(_N),
        der_int(1),
    )
    return seq(seq(oid(EC_PUBLIC_KEY), parameters), bit_string(point))


def ec_compressed_spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    return seq(seq(oid(EC_PUBLIC_KEY), oid(PRIME_P256)), bit_string(point))


def odd_without_small_factors(bits: int) -> int:
    """The smallest odd number of ``bits`` bits with no prime factor below 1000
    (an RSA modulus in shape; nobody knows its factors, so it only goes where no
    signature is checked)."""
    small = math.prod(p for p in range(2, 1000) if all(p % q for q in range(2, math.isqrt(p) + 1)))
    n = (1 << (bits - 1)) + 1
    while math.gcd(n, small) != 1:
        n += 2
    return n


# --- RSA keys whose factors we know, so CSRs with them can be validly signed ------------------


@dataclass(frozen=True)
class RSAFactors:
    """An RSA modulus made of known primes (any number of them, small ones too)."""

    primes: tuple[int, ...]
    e: int = 65537

    @property
    def n(self) -> int:
        return math.prod(self.primes)

    @property
    def d(self) -> int:
        return pow(self.e, -1, math.lcm(*(p - 1 for p in self.primes)))

    def spki(self) -> bytes:
        return rsa_spki(self.n, self.e)

    def sign(self, data: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 §8.2), computed by hand."""
        size = (self.n.bit_length() + 7) // 8
        digest_info = seq(
            seq(oid("2.16.840.1.101.3.4.2.1"), NULL), octets(hashlib.sha256(data).digest())
        )
        encoded = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
        message, n, d = int.from_bytes(encoded, "big"), self.n, self.d
        # By the Chinese remainder theorem, one small power per prime: a 10,000-bit
        # modulus signs in milliseconds instead of seconds.
        signature = 0
        for p in self.primes:
            rest = n // p
            signature += pow(message, d % (p - 1), p) * rest * pow(rest, -1, p)
        return (signature % n).to_bytes(size, "big")


@cache
def _primes_1024() -> tuple[int, ...]:
    """Ten 1024-bit primes (from five RSA-2048 keys), made once per test session."""
    primes: list[int] = []
    for _ in range(5):
        numbers = rsa.generate_private_key(65537, 2048).private_numbers()
        primes += [numbers.p, numbers.q]
    return tuple(primes)


def rsa_with_factor_3() -> RSAFactors:
    """2,050 bits: 3 times two 1024-bit primes. Anyone can factor it."""
    p, q = _primes_1024()[:2]
    return RSAFactors((3, p, q))


def rsa_with_factor_997() -> RSAFactors:
    p, q = _primes_1024()[2:4]
    return RSAFactors((997, p, q))


def rsa_over_8192_bits() -> RSAFactors:
    """About 10,240 bits, ten 1024-bit primes: no small factor, only too large."""
    return RSAFactors(_primes_1024())


# --- CSRs carrying a given SubjectPublicKeyInfo ---------------------------------------------------


def _element(der: bytes, pos: int) -> tuple[int, int]:
    """(value start, element end) of the DER element at ``pos``."""
    length, start = der[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    return start, start + length


def csr_with_key(
    spki: bytes,
    sign: Callable[[bytes], bytes] | None,
    *,
    signature_algorithm: bytes,
    cn: str = "sports.web.api",
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
) -> str:
    """An honest CSR with its key replaced by ``spki`` and signed by ``sign`` over the new
    certificationRequestInfo (``None``: a signature of the right size that does not verify)."""
    template = build_csr(
        ec.generate_private_key(ec.SECP256R1()), cn=cn, dns=dns, ips=ips, uris=uris
    )
    der = base64.b64decode("".join(template.strip().splitlines()[1:-1]))
    outer, _ = _element(der, 0)
    info_start, info_end = _element(der, outer)
    _, pos = _element(der, info_start)  # version
    _, spki_at = _element(der, pos)  # subject
    _, spki_end = _element(der, spki_at)
    info = tlv(0x30, der[info_start:spki_at] + spki + der[spki_end:info_end])
    signature = sign(info) if sign else b"\x01" * 256
    return to_pem(seq(info, signature_algorithm, bit_string(signature)), "CERTIFICATE REQUEST")


SHA256_WITH_RSA_ALGORITHM = seq(oid(SHA256_WITH_RSA), NULL)
ECDSA_WITH_SHA256_ALGORITHM = seq(oid("1.2.840.10045.4.3.2"))


def rsa_csr(factors: RSAFactors, **names: Any) -> str:
    """A CSR with ``factors``' key, validly signed with it."""
    return csr_with_key(
        factors.spki(), factors.sign, signature_algorithm=SHA256_WITH_RSA_ALGORITHM, **names
    )


def unsigned_rsa_csr(n: int, e: int = 65537, **names: Any) -> str:
    """A CSR with the key (n, e) whose signature cannot verify (nobody knows d)."""
    return csr_with_key(
        rsa_spki(n, e), None, signature_algorithm=SHA256_WITH_RSA_ALGORITHM, **names
    )


def ec_csr(spki_of: Callable[[ec.EllipticCurvePrivateKey], bytes], **names: Any) -> str:
    """A CSR with a P-256 key in the encoding ``spki_of`` gives, validly signed with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    return csr_with_key(
        spki_of(key),
        lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())),
        signature_algorithm=ECDSA_WITH_SHA256_ALGORITHM,
        **names,
    )
