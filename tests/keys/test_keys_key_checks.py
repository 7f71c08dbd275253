"""Broken and non-canonical keys are refused, as csrPublicKey and inside a CSR alike, before
policy ever sees them (400 BAD_CSR_PUBLIC_KEY / BAD_CSR); honest keys of every kind still pass.

The CSRs here are validly self-signed with their broken key where that is possible
(a modulus with a small factor, or too large, whose primes we know; an EC key with
explicit parameters or a compressed point): cryptography verifies them, so only the
key checks can refuse them."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from identityd.errors import BadRequest
from identityd.keys import build_csr, generate_key, parse_csr, parse_public_key
from identityd.keys.key_checks import csr_spki_der
from identityd.settings import MAX_RSA_BITS
from tests.keys import broken_keys as bk


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _n2048() -> int:
    return bk.rsa_with_factor_3().n // 3  # a product of two 1024-bit primes


# (id, SubjectPublicKeyInfo DER, words the detail must contain)
PUBLIC_KEYS: list[tuple[str, Callable[[], bytes], str]] = [
    ("even modulus", lambda: bk.rsa_spki(_n2048() + 1), "even"),
    ("modulus 2^2047", lambda: bk.rsa_spki(1 << 2047), "even"),
    ("modulus 3^1293", lambda: bk.rsa_spki(3**1293), "prime factor below 1000"),
    ("modulus with factor 3", lambda: bk.rsa_with_factor_3().spki(), "prime factor below 1000"),
    ("modulus with factor 997", lambda: bk.rsa_with_factor_997().spki(), "prime factor below 1000"),
    ("modulus of 8193 bits", lambda: bk.rsa_spki(bk.odd_without_small_factors(8193)), "8193 bits"),
    ("modulus of 20000 bits", lambda: bk.rsa_spki(bk.odd_without_small_factors(20000)), "20000"),
    ("exponent of 65 bits", lambda: bk.rsa_spki(_n2048(), (1 << 64) + 1), "exponent"),
    ("exponent 2", lambda: bk.rsa_spki(_n2048(), 2), ""),
    ("exponent 4", lambda: bk.rsa_spki(_n2048(), 4), ""),
    ("exponent 1", lambda: bk.rsa_spki(_n2048(), 1), ""),
    (
        "RSA algorithm without NULL parameters",
        lambda: bk.rsa_spki(_n2048(), null_parameters=False),
        "canonical",
    ),
    ("EC explicit P-256 parameters", lambda: bk.ec_explicit_spki(_p256()), "explicit"),
    ("EC compressed point", lambda: bk.ec_compressed_spki(_p256()), "canonical"),
]


@pytest.mark.parametrize(("der", "detail"), [pytest.param(d, w, id=i) for i, d, w in PUBLIC_KEYS])
def test_broken_csr_public_key_is_a_bad_request(der: Callable[[], bytes], detail: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_public_key(bk.public_key_pem(der()))
    assert (err.value.status, err.value.code) == (400, "BAD_CSR_PUBLIC_KEY")
    assert detail in err.value.detail
    assert "BEGIN" not in str(err.value)


# CSRs validly signed by their broken key: before the checks, these parsed and verified.
SIGNED_CSRS: list[tuple[str, Callable[[], str], str]] = [
    ("factor 3", lambda: bk.rsa_csr(bk.rsa_with_factor_3()), "prime factor below 1000"),
    ("factor 997", lambda: bk.rsa_csr(bk.rsa_with_factor_997()), "prime factor below 1000"),
    ("over 8192 bits", lambda: bk.rsa_csr(bk.rsa_over_8192_bits()), "at most 8192"),
    ("EC explicit parameters", lambda: bk.ec_csr(bk.ec_explicit_spki), "explicit"),
    ("EC compressed point", lambda: bk.ec_csr(bk.ec_compressed_spki), "canonical"),
]


@pytest.mark.parametrize(("make", "detail"), [pytest.param(m, w, id=i) for i, m, w in SIGNED_CSRS])
def test_validly_signed_csr_with_a_broken_key_is_a_bad_request(
    make: Callable[[], str], detail: str
) -> None:
    pem = make()
    # The control: cryptography reads it and the signature holds.
    assert x509.load_pem_x509_csr(pem.encode()).is_signature_valid
    with pytest.raises(BadRequest) as err:
        parse_csr(pem)
    assert (err.value.status, err.value.code) == (400, "BAD_CSR")
    assert detail in err.value.detail


@pytest.mark.parametrize(
    ("n", "detail"),
    [
        pytest.param(lambda: _n2048() * 2, "even", id="even"),
        pytest.param(lambda: 1 << 2047, "even", id="power-of-2"),
        pytest.param(lambda: 3**1293, "prime factor", id="power-of-3"),
        pytest.param(lambda: bk.odd_without_small_factors(20000), "at most 8192", id="20000-bits"),
    ],
)
def test_broken_key_in_a_csr_is_refused_before_its_signature(
    n: Callable[[], int], detail: str
) -> None:
    """Nobody can sign for these keys; still the answer is the key (400), not the
    signature (403 CSR_SIGNATURE_INVALID), and no signature check runs on them."""
    with pytest.raises(BadRequest) as err:
        parse_csr(bk.unsigned_rsa_csr(n()))
    assert (err.value.status, err.value.code) == (400, "BAD_CSR")
    assert detail in err.value.detail


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spki(key: Any) -> bytes:
    der: bytes = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(3, 2048),  # exponent 3 is odd and >= 3: fine
        lambda: generate_key("RSA", 3072),
        lambda: generate_key("EC"),
        lambda: generate_key("EC384"),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["RSA-2048-e3", "RSA-3072", "P-256", "P-384", "P-521", "Ed25519"],
)
def test_honest_keys_pass_both_ways_with_the_same_fingerprint(make: Callable[[], Any]) -> None:
    key = make()
    from_zts = parse_public_key(bk.public_key_pem(_spki(key)))
    from_csr = parse_csr(build_csr(key, cn="sports.web.api"))
    assert from_csr.public_key_sha256 == from_zts.public_key_sha256 == _sha256(_spki(key))


@pytest.mark.parametrize(
    "make",
    [ed448.Ed448PrivateKey.generate, lambda: dsa.generate_private_key(1024)],
    ids=["Ed448", "DSA-1024"],
)
def test_other_honest_key_kinds_pass_as_csr_public_key(make: Callable[[], Any]) -> None:
    key = make()
    assert parse_public_key(bk.public_key_pem(_spki(key))).public_key_sha256 == _sha256(_spki(key))


def test_the_largest_modulus_allowed_is_8192_bits() -> None:
    info = parse_public_key(bk.public_key_pem(bk.rsa_spki(bk.odd_without_small_factors(8192))))
    assert info.key_bits == MAX_RSA_BITS == 8192


def test_pkcs1_in_its_own_canonical_form_is_read() -> None:
    key = generate_key("RSA")
    pkcs1 = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    assert parse_public_key(bk.to_pem(pkcs1, "RSA PUBLIC KEY")).key_type == "RSA"
    # The same broken modulus in PKCS#1 form is refused all the same.
    broken = bk.seq(bk.der_int(1 << 2047), bk.der_int(65537))
    with pytest.raises(BadRequest) as err:
        parse_public_key(bk.to_pem(broken, "RSA PUBLIC KEY"))
    assert (err.value.code, err.value.detail) == ("BAD_CSR_PUBLIC_KEY", "RSA modulus is even")


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(lambda: 2 * bk.public_key_pem(_spki(generate_key("EC"))), id="two-blocks"),
        pytest.param(
            lambda: bk.public_key_pem(_spki(generate_key("EC"))) + "x", id="trailing-text"
        ),
        pytest.param(lambda: "prose\n" + bk.public_key_pem(_spki(generate_key("EC"))), id="prose"),
    ],
)
def test_csr_public_key_is_one_pem_block_and_nothing_else(pem: Callable[[], str]) -> None:
    """Which key would be meant? Refused, as for a CSR (the first block used to win)."""
    with pytest.raises(BadRequest) as err:
        parse_public_key(pem())
    assert err.value.code == "BAD_CSR_PUBLIC_KEY"


def _der(pem: str) -> bytes:
    return base64.b64decode("".join(pem.strip().splitlines()[1:-1]))


def test_csr_spki_der_is_the_key_as_received() -> None:
    key = generate_key("EC")
    assert csr_spki_der(_der(build_csr(key, cn="a.b"))) == _spki(key)
    p256 = _p256()
    explicit = bk.csr_with_key(
        bk.ec_explicit_spki(p256), None, signature_algorithm=bk.ECDSA_WITH_SHA256_ALGORITHM
    )
    assert csr_spki_der(_der(explicit)) == bk.ec_explicit_spki(p256)  # as sent, not re-encoded
    for cut in (1, 3, 40):
        with pytest.raises(BadRequest):
            csr_spki_der(_der(explicit)[:cut])
