"""parse_public_key (ZTS's csrPublicKey) against real keys of every kind, and broken input:
the facts policy judges the key by, and the same fingerprint as the CSR's key."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from identityd.errors import BadRequest
from identityd.keys import KeyInfo, build_csr, generate_key, parse_csr, parse_public_key
from identityd.settings import MAX_CSR_BYTES


def public_pem(key: Any, form: serialization.PublicFormat | None = None) -> str:
    text: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, form or serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return text.decode("ascii")


def spki_sha256(key: Any) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(
    ("make", "facts"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), ("RSA", 1024, None)),
        (lambda: generate_key("RSA"), ("RSA", 2048, None)),
        (lambda: generate_key("EC"), ("EC", 256, "secp256r1")),
        (lambda: generate_key("EC384"), ("EC", 384, "secp384r1")),
        (lambda: ec.generate_private_key(ec.SECP192R1()), ("EC", 192, "secp192r1")),
        (lambda: ec.generate_private_key(ec.SECP256K1()), ("EC", 256, "secp256k1")),
        (lambda: ec.generate_private_key(ec.SECP521R1()), ("EC", 521, "secp521r1")),
        (ed25519.Ed25519PrivateKey.generate, ("Ed25519", 256, None)),
        (ed448.Ed448PrivateKey.generate, ("Ed448", 456, None)),
        (lambda: dsa.generate_private_key(1024), ("DSA", 1024, None)),
        # Key agreement only: no CSR could carry one, but csrPublicKey can name it.
        (x25519.X25519PrivateKey.generate, ("X25519", 256, None)),
        (x448.X448PrivateKey.generate, ("X448", 448, None)),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else "",
)
def test_every_key_kind_is_described_weak_ones_too(
    make: Callable[[], Any], facts: tuple[str, int, str | None]
) -> None:
    key = make()
    info = parse_public_key(public_pem(key))
    assert info == KeyInfo(
        source="csrPublicKey",
        key_type=facts[0],
        key_bits=facts[1],
        curve=facts[2],
        public_key_sha256=spki_sha256(key),
    )


@pytest.mark.parametrize("kind", ["EC", "RSA", "Ed25519"])
def test_same_key_as_the_csrs(kind: str) -> None:
    key = generate_key(kind)
    csr = parse_csr(build_csr(key, cn="sports.web.api"))
    from_csr = KeyInfo.of_csr(csr)
    from_zts = parse_public_key(public_pem(key))
    assert from_csr.source == "csr"
    # Only the source differs: policy judges either the same way.
    assert (from_csr.key_type, from_csr.key_bits, from_csr.curve, from_csr.public_key_sha256) == (
        from_zts.key_type,
        from_zts.key_bits,
        from_zts.curve,
        from_zts.public_key_sha256,
    )
    assert from_zts.public_key_sha256 == csr.public_key_sha256


def test_pkcs1_rsa_public_key_is_read_too() -> None:
    key = rsa.generate_private_key(65537, 1024)
    pem = public_pem(key, serialization.PublicFormat.PKCS1)
    assert pem.startswith("-----BEGIN RSA PUBLIC KEY-----")
    info = parse_public_key(pem)
    assert (info.key_type, info.key_bits, info.public_key_sha256) == ("RSA", 1024, spki_sha256(key))


def test_as_input_is_the_policy_contract() -> None:
    ec_key = parse_public_key(public_pem(generate_key("EC")))
    assert ec_key.as_input() == {
        "source": "csrPublicKey",
        "key_type": "EC",
        "key_bits": 256,
        "curve": "secp256r1",
        "public_key_sha256": ec_key.public_key_sha256,
    }
    # No curve is "", as in input.csr.
    assert (
        parse_public_key(public_pem(ed25519.Ed25519PrivateKey.generate())).as_input()["curve"] == ""
    )


def _ec_pem() -> str:
    return public_pem(generate_key("EC"))


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "-----BEGIN x\n",
        "not a key",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        _ec_pem().replace("PUBLIC KEY", "CERTIFICATE"),
        _ec_pem()[:60] + "!" + _ec_pem()[61:],
        _ec_pem() + "\u00e9",  # non-ASCII
        _ec_pem() + " " * MAX_CSR_BYTES,  # oversized
        build_csr(generate_key("EC"), cn="a.b"),  # a CSR is not a public key
        generate_key("EC")
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode(),
    ],
    ids=[
        "empty",
        "truncated",
        "prose",
        "bad-der",
        "wrong-label",
        "broken-base64",
        "non-ascii",
        "oversized",
        "csr",
        "private-key",
    ],
)
def test_what_is_not_a_public_key_is_a_bad_request(pem: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_public_key(pem)
    assert err.value.code == "BAD_CSR_PUBLIC_KEY"
    # The detail names what was wrong, never the text it was given.
    assert "BEGIN" not in str(err.value)


def test_not_a_string_is_a_caller_bug() -> None:
    with pytest.raises(TypeError):
        parse_public_key(b"-----BEGIN PUBLIC KEY-----")  # type: ignore[arg-type]


def test_csr_with_a_key_agreement_key_is_still_a_bad_csr() -> None:
    # csrPublicKey may name an X25519 key (policy refuses its type); a CSR cannot be
    # signed with one, and stays a malformed request as before.
    from tests.keys.test_keys_csr_parse import der_decode, der_encode

    pem = build_csr(generate_key("EC"), cn="a.b")
    root = der_decode(base64.b64decode("".join(pem.strip().splitlines()[1:-1])))
    children = root[1]
    assert isinstance(children, list)
    request_info = children[0][1]  # certificationRequestInfo: version, subject, SPKI, ...
    assert isinstance(request_info, list)
    x25519_der = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    request_info[2] = der_decode(x25519_der)
    body = base64.encodebytes(der_encode(root)).decode()
    with pytest.raises(BadRequest) as err:
        parse_csr(f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n")
    assert err.value.code == "BAD_CSR"
    assert "X25519" in err.value.detail
