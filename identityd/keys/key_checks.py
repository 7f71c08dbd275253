"""Refuse public keys no honest agent makes, as they were received (csrPublicKey or a CSR's key).

cryptography loads an RSA key whose modulus is even, a power of 2 or 3, or 20,000
bits long, and an EC key with explicit curve parameters (it names the curve and
re-encodes it); policy would then judge such a key by its size and curve alone.
These checks run on every request, so they stay cheap: a gcd against the product
of the primes below 1000 (not one division per prime), a bit length, and one
re-encoding, whose bytes also give the fingerprint.
"""

from __future__ import annotations

import math

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from identityd.errors import BadRequest
from identityd.settings import MAX_RSA_BITS, MAX_RSA_EXPONENT_BITS

SMALL_PRIME_BOUND = 1000

_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_PKCS1 = serialization.PublicFormat.PKCS1


def _primes_below(bound: int) -> list[int]:
    sieve = bytearray([1]) * bound
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(bound) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, bound, i)))
    return [i for i, prime in enumerate(sieve) if prime]


# One gcd with this product finds any factor below the bound (about 1,400 bits).
_SMALL_PRIMES_PRODUCT = math.prod(_primes_below(SMALL_PRIME_BOUND))


def check_public_key(key: PublicKeyTypes, received_der: bytes, *, code: str) -> bytes:
    """Refuse a broken or non-canonically encoded key; return its SubjectPublicKeyInfo DER.

    ``received_der`` is the key exactly as it came: a SubjectPublicKeyInfo, or
    for an ``RSA PUBLIC KEY`` PEM the PKCS#1 RSAPublicKey. Raises
    ``BadRequest(code)`` with a detail that names the defect, never the key.
    """
    if isinstance(key, rsa.RSAPublicKey):
        _check_rsa(key.public_numbers(), code)
    spki = key.public_bytes(serialization.Encoding.DER, _SPKI)
    # DER is one encoding per value, so any other bytes for the same key are a
    # second meaning: explicit EC parameters (which a CA may copy into the
    # certificate as they are), a compressed point, a different algorithm
    # identifier. Comparing with the re-encoding refuses them all at once.
    if received_der != spki and not (
        isinstance(key, rsa.RSAPublicKey)
        and received_der == key.public_bytes(serialization.Encoding.DER, _PKCS1)
    ):
        raise BadRequest(
            code,
            "public key not in its canonical encoding (e.g. explicit EC parameters, "
            "a compressed point, RSA parameters without NULL)",
        )
    return spki


def _check_rsa(numbers: rsa.RSAPublicNumbers, code: str) -> None:
    n, e = numbers.n, numbers.e
    # The size first: every other check is then on a bounded number.
    if n.bit_length() > MAX_RSA_BITS:
        raise BadRequest(code, f"RSA modulus of {n.bit_length()} bits, at most {MAX_RSA_BITS}")
    if n % 2 == 0:
        raise BadRequest(code, "RSA modulus is even")
    if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
        raise BadRequest(code, f"RSA modulus has a prime factor below {SMALL_PRIME_BOUND}")
    # cryptography refuses these two when it loads the key today; checked here so a
    # version or backend that does not can never let one through.
    if e < 3 or e % 2 == 0:
        raise BadRequest(code, "RSA public exponent is even or below 3")
    if e.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise BadRequest(
            code,
            f"RSA public exponent of {e.bit_length()} bits, at most {MAX_RSA_EXPONENT_BITS}",
        )


def csr_spki_der(der: bytes) -> bytes:
    """The subjectPKInfo element of a DER CertificationRequest (RFC 2986), as received.

    CertificationRequest ::= SEQUENCE { certificationRequestInfo SEQUENCE {
    version INTEGER, subject Name, subjectPKInfo SubjectPublicKeyInfo, ... }, ... }
    """
    outer, _ = _element(der, 0, 0x30)
    pos, _ = _element(der, outer, 0x30)  # into certificationRequestInfo
    _, pos = _element(der, pos, 0x02)  # version
    _, pos = _element(der, pos, 0x30)  # subject
    _, end = _element(der, pos, 0x30)  # subjectPKInfo
    return der[pos:end]


def _element(der: bytes, pos: int, tag: int) -> tuple[int, int]:
    """(where the value starts, where the element ends) of the DER element at ``pos``."""
    if pos + 2 > len(der) or der[pos] != tag:
        raise BadRequest("BAD_CSR", "unexpected CSR structure")
    length, start = der[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(der):
            raise BadRequest("BAD_CSR", "unexpected CSR structure")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise BadRequest("BAD_CSR", "unexpected CSR structure")
    return start, start + length
