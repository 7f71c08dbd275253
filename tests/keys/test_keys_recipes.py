"""generate_key / build_csr / key_to_pem / public_key_sha256: the agent's and dev CA's recipes."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from identityd.keys import build_csr, generate_key, key_to_pem, parse_csr, public_key_sha256


@pytest.mark.parametrize(
    ("kind", "bits", "check"),
    [
        ("EC", None, lambda k: isinstance(k, ec.EllipticCurvePrivateKey)
         and k.curve.name == "secp256r1"),
        ("EC", 256, lambda k: isinstance(k, ec.EllipticCurvePrivateKey)),
        ("EC384", None, lambda k: isinstance(k, ec.EllipticCurvePrivateKey)
         and k.curve.name == "secp384r1"),
        ("RSA", None, lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 2048),
        ("RSA", 3072, lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 3072),
        ("Ed25519", None, lambda k: isinstance(k, ed25519.Ed25519PrivateKey)),
    ],
)
def test_generate_key(kind: str, bits: int | None, check: object) -> None:
    assert check(generate_key(kind, bits))  # type: ignore[operator]


def test_default_key_is_p256() -> None:
    key = generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


@pytest.mark.parametrize(
    ("kind", "bits", "argument"),
    [("RSA", 1024, "bits"), ("RSA", 2047, "bits"), ("EC", 384, "bits"), ("EC384", 256, "bits"),
     ("Ed25519", 448, "bits"), ("DSA", None, "kind"), ("ec", None, "kind")],
)
def test_generate_key_refuses(kind: str, bits: int | None, argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument}:"):
        generate_key(kind, bits)


def test_build_csr_is_a_verified_pem_csr() -> None:
    key = generate_key("EC")
    pem = build_csr(key, cn="sports.web.api", dns=["a.example.com"], ips=["fd00::1"],
                    uris=["spiffe://sports.web/sa/api"])
    assert pem.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    csr = x509.load_pem_x509_csr(pem.encode())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=sports.web.api"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in sans.get_values_for_type(x509.IPAddress)] == ["fd00::1"]


def test_build_csr_without_sans_has_no_extension() -> None:
    csr = x509.load_pem_x509_csr(build_csr(generate_key("EC"), cn="a.b").encode())
    assert len(csr.extensions) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dns": "a.example.com"}, TypeError, "dns: expected a sequence"),
        ({"uris": ["ok", 5]}, TypeError, "uris: expected strings"),
        ({"ips": ["10.0.0.300"]}, ValueError, "ips: not an IP address"),
    ],
)
def test_build_csr_refuses_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build_csr(generate_key("EC"), cn="a.b", **kwargs)  # type: ignore[arg-type]


def test_build_csr_refuses_other_keys() -> None:
    with pytest.raises(TypeError, match="key:"):
        build_csr(b"not a key", cn="a.b")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["EC", "RSA", "Ed25519"])
def test_key_to_pem_is_unencrypted_pkcs8(kind: str) -> None:
    key = generate_key(kind)
    pem = key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert public_key_sha256(loaded.public_key()) == public_key_sha256(key.public_key())


def test_public_key_sha256_is_the_spki_digest_and_matches_the_csr() -> None:
    key = generate_key("EC")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = public_key_sha256(key.public_key())
    assert digest == hashlib.sha256(spki).hexdigest()
    assert parse_csr(build_csr(key, cn="a.b")).public_key_sha256 == digest
    assert public_key_sha256(generate_key("EC").public_key()) != digest
