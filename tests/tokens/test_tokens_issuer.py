"""TokenIssuer: tokens in the TokenRequest API's format, its JWKS, rotation."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tokens_support import AUDIENCE, ISSUER, NOW, claims_of, shared_issuer

from identityd.keys.issuer import TokenIssuer, thumbprint


def public_key_of(issuer: TokenIssuer, kid: str) -> jwt.PyJWK:
    (jwk,) = [key for key in issuer.jwks()["keys"] if key["kid"] == kid]
    return jwt.PyJWK(jwk)


@pytest.mark.parametrize(
    ("key_type", "alg", "key_class", "bits"),
    [
        ("RSA", None, rsa.RSAPrivateKey, 2048),
        ("RSA", "PS256", rsa.RSAPrivateKey, 2048),
        ("EC", None, ec.EllipticCurvePrivateKey, 256),
        ("EC", "ES384", ec.EllipticCurvePrivateKey, 384),
    ],
)
def test_keys_and_algorithms(key_type: str, alg: str | None, key_class: type, bits: int) -> None:
    issuer = shared_issuer(key_type, alg)
    assert isinstance(issuer.private_key, key_class)
    assert issuer.private_key.key_size == bits
    assert issuer.alg == (alg or {"RSA": "RS256", "EC": "ES256"}[key_type])


def test_token_has_the_tokenrequest_shape() -> None:
    issuer = shared_issuer("RSA")
    token = issuer.mint(
        "sports-web",
        "api",
        "api-1",
        "pod-uid",
        audiences=["identityd", "vault"],
        node_name="node-1",
        node_uid="node-uid",
        sa_uid="sa-uid",
        now=NOW,
        lifetime=600,
    )
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": issuer.kid}
    claims = jwt.decode(
        token,
        public_key_of(issuer, issuer.kid),
        algorithms=["RS256"],
        audience="identityd",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    jti = claims.pop("jti")
    assert isinstance(jti, str) and len(jti) == 36
    assert claims == {
        "aud": ["identityd", "vault"],
        "exp": NOW + 600,
        "iat": NOW,
        "nbf": NOW,
        "iss": ISSUER,
        "sub": "system:serviceaccount:sports-web:api",
        "kubernetes.io": {
            "namespace": "sports-web",
            "pod": {"name": "api-1", "uid": "pod-uid"},
            "serviceaccount": {"name": "api", "uid": "sa-uid"},
            "node": {"name": "node-1", "uid": "node-uid"},
        },
    }


def test_node_only_when_given_and_uids_generated() -> None:
    issuer = shared_issuer("EC")
    first = claims_of(issuer.mint("ns", "sa", "pod", "uid", audiences=[AUDIENCE]))
    second = claims_of(issuer.mint("ns", "sa", "pod", "uid", audiences=[AUDIENCE]))
    assert "node" not in first["kubernetes.io"]
    assert first["kubernetes.io"]["serviceaccount"]["uid"]
    assert first["jti"] != second["jti"]


def test_overrides_replace_and_none_removes() -> None:
    issuer = shared_issuer("RSA")
    token = issuer.mint(
        "ns",
        "sa",
        "pod",
        "uid",
        audiences=[AUDIENCE],
        claims_override={"sub": "someone", "nbf": None},
        extra_headers={"kid": None, "jku": "https://evil.example/jwks"},
    )
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "jku": "https://evil.example/jwks"}
    claims = claims_of(token)
    assert claims["sub"] == "someone"
    assert "nbf" not in claims


def test_audiences_must_be_a_sequence_not_a_string() -> None:
    with pytest.raises(TypeError, match="audiences"):
        shared_issuer("RSA").mint("ns", "sa", "pod", "uid", audiences="identityd")


@pytest.mark.parametrize(
    ("key_type", "alg"),
    [("DSA", None), ("RSA", "ES256"), ("EC", "RS256"), ("RSA", "HS256"), ("EC", "ES512")],
)
def test_bad_key_type_or_alg(key_type: str, alg: str | None) -> None:
    with pytest.raises(ValueError, match=r"key_type|alg"):
        TokenIssuer(ISSUER, key_type=key_type, alg=alg)


def test_rfc7638_thumbprint_example() -> None:
    # RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
        "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
        "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
        "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(("key_type", "alg"), [("RSA", None), ("EC", None), ("EC", "ES384")])
def test_default_kid_is_the_thumbprint_of_the_published_key(key_type: str, alg: str | None) -> None:
    issuer = shared_issuer(key_type, alg)
    (jwk,) = issuer.jwks()["keys"]
    assert jwk["kid"] == issuer.kid == thumbprint(jwk)
    assert (jwk["alg"], jwk["use"]) == (issuer.alg, "sig")
    assert "d" not in jwk


def test_explicit_kid() -> None:
    issuer = TokenIssuer(ISSUER, key_type="EC", kid="key-1")
    assert issuer.kid == "key-1"
    assert jwt.get_unverified_header(issuer.mint("a", "b", "c", "d", audiences=["x"]))["kid"] == (
        "key-1"
    )


def test_rotation_keeps_the_old_key_until_dropped(tmp_path: Path) -> None:
    issuer = TokenIssuer(ISSUER, key_type="EC")
    old_kid = issuer.kid
    old_token = issuer.mint("ns", "sa", "pod", "uid", audiences=[AUDIENCE])
    new_kid = issuer.rotate()
    assert new_kid == issuer.kid != old_kid
    new_token = issuer.mint("ns", "sa", "pod", "uid", audiences=[AUDIENCE])
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert [key["kid"] for key in issuer.jwks()["keys"]] == [new_kid, old_kid]
    # Both verify against the published set while the old key is still in it.
    for token, kid in ((old_token, old_kid), (new_token, new_kid)):
        jwt.decode(token, public_key_of(issuer, kid), algorithms=["ES256"], audience=AUDIENCE)
    issuer.drop_old()
    assert [key["kid"] for key in issuer.jwks()["keys"]] == [new_kid]
    path = tmp_path / "jwks.json"
    issuer.write_jwks(path)
    assert json.loads(path.read_text()) == issuer.jwks()
    assert [p.name for p in tmp_path.iterdir()] == ["jwks.json"]  # no temp file left
