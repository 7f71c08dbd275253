"""JWKSVerifier with real keys and real signed tokens: algorithms, headers, kids, claims."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from tokens_support import (
    AUDIENCE,
    ISSUER,
    LIFETIME,
    NOW,
    JWKSServer,
    MemorySource,
    b64url,
    b64url_json,
    claims_of,
    forge,
    merged_jwks,
    mint,
    shared_issuer,
    token_settings,
)

from identityd.errors import InvalidToken, KeysUnavailable
from identityd.keys.issuer import TokenIssuer
from identityd.settings import MAX_TOKEN_BYTES
from identityd.tokens import FileKeySource, JWKSVerifier, TokenVerifier
from identityd.tokens.claims import TokenReason


def rs() -> TokenIssuer:
    return shared_issuer("RSA")


def es() -> TokenIssuer:
    return shared_issuer("EC")


def ps() -> TokenIssuer:
    return shared_issuer("RSA", "PS256")


def es384() -> TokenIssuer:
    return shared_issuer("EC", "ES384")


def rs512() -> TokenIssuer:
    return shared_issuer("RSA", "RS512")


def all_keys() -> dict[str, Any]:
    return merged_jwks(rs(), es(), ps(), es384(), rs512())


@pytest.fixture
def source() -> MemorySource:
    return MemorySource(all_keys())


@pytest.fixture
async def verifier(source: MemorySource) -> AsyncIterator[JWKSVerifier]:
    async with JWKSVerifier(token_settings(), source=source) as v:
        yield v


async def reason(verifier: JWKSVerifier, token: Any, *, now: float = NOW) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token, now=now)
    assert caught.value.status == 403
    return caught.value.code


def signing_input(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64url_json(header)}.{b64url_json(claims)}"


def sign_with(private_key: Any, alg: str, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Sign with pyjwt's algorithm object directly (any header, any key)."""
    data = signing_input(header, claims)
    algorithm = jwt.PyJWS().get_algorithm_by_name(alg)
    return f"{data}.{b64url(algorithm.sign(data.encode(), private_key))}"


def good_claims() -> dict[str, Any]:
    return claims_of(mint(rs()))


# --- the algorithms -------------------------------------------------------------


@pytest.mark.parametrize("issuer", [rs, es, ps, es384, rs512], ids=lambda f: f.__name__)
async def test_valid_tokens_verify(
    verifier: JWKSVerifier, issuer: Callable[[], TokenIssuer]
) -> None:
    claims = await verifier.verify(mint(issuer()), now=NOW + 10)
    assert claims.subject == "system:serviceaccount:sports-web:api"
    assert (claims.namespace, claims.service_account, claims.pod_name, claims.pod_uid) == (
        "sports-web",
        "api",
        "api-1",
        "pod-uid-1",
    )
    assert (claims.node_name, claims.node_uid) == ("node-1", "node-uid-1")
    assert (claims.issued_at, claims.expires_at, claims.not_before) == (NOW, NOW + LIFETIME, NOW)
    assert claims.verified_by == "jwks"
    assert claims.audience == (AUDIENCE,)


def test_is_a_token_verifier() -> None:
    verifier: TokenVerifier = JWKSVerifier(token_settings(), source=MemorySource({"keys": []}))
    assert verifier is not None


def alg_none() -> str:
    return forge({"alg": "none", "kid": rs().kid}, good_claims())


def hs256_with_public_pem() -> str:
    # The classic confusion: the RSA public key (which anyone has) as an HMAC secret.
    pem = (
        rs()
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "kid": rs().kid}
    data = signing_input(header, good_claims())
    return f"{data}.{b64url(hmac.new(pem, data.encode(), hashlib.sha256).digest())}"


def eddsa() -> str:
    return jwt.encode(
        good_claims(),
        ed25519.Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": rs().kid},
    )


def header_alg(alg: Any) -> Callable[[], str]:
    def build() -> str:
        header = {"kid": rs().kid} if alg is ... else {"alg": alg, "kid": rs().kid}
        return sign_with(rs().private_key, "RS256", header, good_claims())

    return build


# Refused on the header alone: no key is looked up and no fetch happens.
REFUSED_ALGS: list[tuple[str, Callable[[], str]]] = [
    ("none", alg_none),
    ("None", lambda: forge({"alg": "None", "kid": rs().kid}, good_claims())),
    ("HS256 with the RSA public key", hs256_with_public_pem),
    ("HS512", lambda: jwt.encode(good_claims(), "k" * 64, algorithm="HS512")),
    ("EdDSA", eddsa),
    ("ES256K", header_alg("ES256K")),
    ("PS512", header_alg("PS512")),
    ("PS384", header_alg("PS384")),
    ("rs256 lowercase", header_alg("rs256")),
    ("missing", header_alg(...)),
    ("null", header_alg(None)),
    ("list", header_alg(["RS256"])),
    ("number", header_alg(256)),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in REFUSED_ALGS])
async def test_disallowed_alg_is_refused_before_any_key_lookup(
    verifier: JWKSVerifier, source: MemorySource, build: Callable[[], str]
) -> None:
    assert await reason(verifier, build()) == TokenReason.ALG_NOT_ALLOWED
    assert source.fetches == 0


def kid_of(issuer: TokenIssuer) -> dict[str, Any]:
    return {"kid": issuer.kid}


# Algorithm confusion between the header's alg and the key the kid names.
CONFUSED: list[tuple[str, Callable[[], str]]] = [
    # RSA signature, RS256 header, kid of an EC key.
    (
        "RS256 header on EC key",
        lambda: sign_with(
            rs().private_key, "RS256", {"alg": "RS256", **kid_of(es())}, good_claims()
        ),
    ),
    (
        "ES256 header on RSA key",
        lambda: sign_with(
            es().private_key, "ES256", {"alg": "ES256", **kid_of(rs())}, good_claims()
        ),
    ),
    (
        "ES384 header on P-256 key",
        lambda: sign_with(
            es384().private_key, "ES384", {"alg": "ES384", **kid_of(es())}, good_claims()
        ),
    ),
    (
        "ES256 header on P-384 key",
        lambda: sign_with(
            es().private_key, "ES256", {"alg": "ES256", **kid_of(es384())}, good_claims()
        ),
    ),
    # The right key signs, but the JWK says it is for PS256 only.
    (
        "RS256 on a PS256 JWK",
        lambda: sign_with(
            ps().private_key, "RS256", {"alg": "RS256", **kid_of(ps())}, good_claims()
        ),
    ),
    (
        "PS256 on an RS256 JWK",
        lambda: sign_with(
            rs().private_key, "PS256", {"alg": "PS256", **kid_of(rs())}, good_claims()
        ),
    ),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in CONFUSED])
async def test_alg_must_fit_the_key(verifier: JWKSVerifier, build: Callable[[], str]) -> None:
    assert await reason(verifier, build()) == TokenReason.ALG_NOT_ALLOWED


# --- ES512: the API server signs with a P-521 key when given one --------------------


@functools.cache
def p521_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP521R1())


def p521_jwk(**extra: Any) -> dict[str, Any]:
    """The public P-521 key as the API server publishes it (coordinates 66 bytes each)."""
    point = p521_key().public_key().public_numbers()
    coordinate = {name: b64url(value.to_bytes(66, "big"))
                  for name, value in (("x", point.x), ("y", point.y))}
    return {"kty": "EC", "crv": "P-521", "kid": "p521", "use": "sig", **coordinate, **extra}


def p521_source(**extra: Any) -> MemorySource:
    return MemorySource({"keys": [*all_keys()["keys"], p521_jwk(**extra)]})


@pytest.mark.parametrize("jwk_alg", [{}, {"alg": "ES512"}])
async def test_es512_with_a_p521_key_verifies(jwk_alg: dict[str, str]) -> None:
    token = sign_with(p521_key(), "ES512", {"alg": "ES512", "kid": "p521"}, good_claims())
    async with JWKSVerifier(token_settings(), source=p521_source(**jwk_alg)) as verifier:
        claims = await verifier.verify(token, now=NOW)
    assert (claims.pod_uid, claims.verified_by) == ("pod-uid-1", "jwks")


ES512_CONFUSED: list[tuple[str, Callable[[], str]]] = [
    ("ES512 header on a P-256 key",
     lambda: sign_with(es().private_key, "ES256", {"alg": "ES512", **kid_of(es())},
                       good_claims())),
    ("ES512 header on a P-384 key",
     lambda: sign_with(es384().private_key, "ES384", {"alg": "ES512", **kid_of(es384())},
                       good_claims())),
    ("ES384 header on the P-521 key",
     lambda: sign_with(es384().private_key, "ES384", {"alg": "ES384", "kid": "p521"},
                       good_claims())),
    ("ES512 header on an RSA key",
     lambda: sign_with(p521_key(), "ES512", {"alg": "ES512", **kid_of(rs())}, good_claims())),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in ES512_CONFUSED])
async def test_es512_must_fit_a_p521_key(build: Callable[[], str]) -> None:
    async with JWKSVerifier(token_settings(), source=p521_source()) as verifier:
        assert await reason(verifier, build()) == TokenReason.ALG_NOT_ALLOWED


async def test_es512_signature_by_another_p521_key_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP521R1())
    token = sign_with(other, "ES512", {"alg": "ES512", "kid": "p521"}, good_claims())
    async with JWKSVerifier(token_settings(), source=p521_source()) as verifier:
        assert await reason(verifier, token) == TokenReason.SIGNATURE_INVALID


async def test_rs256_on_ps256_jwk_would_otherwise_verify() -> None:
    # The case above is a real signature by the right key: only the JWK's alg refuses it.
    token = sign_with(ps().private_key, "RS256", {"alg": "RS256", **kid_of(ps())}, good_claims())
    jwk = dict(ps().jwks()["keys"][0])
    del jwk["alg"]
    async with JWKSVerifier(token_settings(), source=MemorySource({"keys": [jwk]})) as verifier:
        assert (await verifier.verify(token, now=NOW)).pod_uid == "pod-uid-1"


def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def tampered_payload() -> str:
    header, _, signature = mint(rs()).split(".")
    claims = good_claims()
    claims["kubernetes.io"]["namespace"] = "kube-system"
    return f"{header}.{b64url_json(claims)}.{signature}"


SIGNATURE_CASES: list[tuple[str, Callable[[], str]]] = [
    (
        "other RSA key, known kid",
        lambda: sign_with(
            other_rsa_key(), "RS256", {"alg": "RS256", **kid_of(rs())}, good_claims()
        ),
    ),
    (
        "other EC key, known kid",
        lambda: sign_with(
            ec.generate_private_key(ec.SECP256R1()),
            "ES256",
            {"alg": "ES256", **kid_of(es())},
            good_claims(),
        ),
    ),
    ("tampered payload", tampered_payload),
    (
        "signature of another token",
        lambda: mint(rs()).rsplit(".", 1)[0] + "." + mint(rs(), lifetime=60).rsplit(".", 1)[1],
    ),
    ("empty signature", lambda: mint(rs()).rsplit(".", 1)[0] + "."),
    # 86 base64url characters for 64 bytes; 84 are whole groups (63 bytes).
    ("ES256 signature a byte short", lambda: mint(es())[:-2]),
    (
        "no kid, signed by a stranger",
        lambda: sign_with(other_rsa_key(), "RS256", {"alg": "RS256"}, good_claims()),
    ),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in SIGNATURE_CASES])
async def test_bad_signature(verifier: JWKSVerifier, build: Callable[[], str]) -> None:
    assert await reason(verifier, build()) == TokenReason.SIGNATURE_INVALID


@pytest.mark.parametrize("issuer", [rs, es, ps], ids=lambda f: f.__name__)
async def test_token_without_kid_tries_the_keys_of_its_type(
    verifier: JWKSVerifier, issuer: Callable[[], TokenIssuer]
) -> None:
    token = mint(issuer(), extra_headers={"kid": None})
    assert "kid" not in jwt.get_unverified_header(token)
    assert (await verifier.verify(token, now=NOW)).pod_uid == "pod-uid-1"


# --- the header -----------------------------------------------------------------


HEADER_CASES: list[tuple[str, Callable[[], str], str]] = [
    (
        "crit exp",
        lambda: mint(rs(), extra_headers={"crit": ["exp"], "exp": 1}),
        TokenReason.HEADER_INVALID,
    ),
    (
        "crit b64 (pyjwt knows it)",
        lambda: mint(rs(), extra_headers={"crit": ["b64"]}),
        TokenReason.HEADER_INVALID,
    ),
    ("crit empty", lambda: mint(rs(), extra_headers={"crit": []}), TokenReason.HEADER_INVALID),
    (
        "crit not a list",
        lambda: mint(rs(), extra_headers={"crit": "exp"}),
        TokenReason.HEADER_INVALID,
    ),
    (
        "b64 true",
        lambda: sign_with(
            rs().private_key, "RS256", {"alg": "RS256", "b64": True, **kid_of(rs())}, good_claims()
        ),
        TokenReason.HEADER_INVALID,
    ),
    (
        "kid number",
        lambda: sign_with(rs().private_key, "RS256", {"alg": "RS256", "kid": 7}, good_claims()),
        TokenReason.HEADER_INVALID,
    ),
    ("header is a list", lambda: forge(["RS256"], good_claims(), b"x"), TokenReason.MALFORMED),
    ("header is a string", lambda: forge("RS256", good_claims(), b"x"), TokenReason.MALFORMED),
    (
        "header not JSON",
        lambda: b64url(b"{alg: RS256}") + "." + b64url_json(good_claims()) + ".c2ln",
        TokenReason.MALFORMED,
    ),
    (
        "header not UTF-8",
        lambda: b64url(b"\xff\xfe{}") + "." + b64url_json(good_claims()) + ".c2ln",
        TokenReason.MALFORMED,
    ),
]


@pytest.mark.parametrize(("build", "code"), [pytest.param(b, c, id=i) for i, b, c in HEADER_CASES])
async def test_header(verifier: JWKSVerifier, build: Callable[[], str], code: str) -> None:
    assert await reason(verifier, build()) == code


async def test_payload_that_is_not_json_but_signed_is_malformed(verifier: JWKSVerifier) -> None:
    header = {"alg": "RS256", **kid_of(rs())}
    data = f"{b64url_json(header)}.{b64url(b'not json')}"
    algorithm = jwt.PyJWS().get_algorithm_by_name("RS256")
    token = f"{data}.{b64url(algorithm.sign(data.encode(), rs().private_key))}"
    assert await reason(verifier, token) == TokenReason.MALFORMED


async def test_signed_array_payload_is_malformed(verifier: JWKSVerifier) -> None:
    token = sign_with(rs().private_key, "RS256", {"alg": "RS256", **kid_of(rs())}, {})
    header, _, _ = token.split(".")
    data = f"{header}.{b64url(b'[1,2]')}"
    algorithm = jwt.PyJWS().get_algorithm_by_name("RS256")
    token = f"{data}.{b64url(algorithm.sign(data.encode(), rs().private_key))}"
    assert await reason(verifier, token) == TokenReason.MALFORMED


async def test_ignored_key_headers_do_not_get_in_the_way(verifier: JWKSVerifier) -> None:
    # x5c/jwk/jku/x5u are ignored, not refused: a valid token carrying them verifies.
    attacker = TokenIssuer(ISSUER, key_type="EC")
    token = mint(
        rs(),
        extra_headers={
            "jwk": attacker.jwks()["keys"][0],
            "x5c": ["MIIB"],
            "jku": "https://evil.example/jwks",
            "x5u": "https://evil.example/cert",
            "typ": "JWT",
            "cty": "JWT",
        },
    )
    assert (await verifier.verify(token, now=NOW)).pod_uid == "pod-uid-1"


async def test_embedded_jwk_is_not_trusted(verifier: JWKSVerifier, source: MemorySource) -> None:
    # The attacker signs with their own key and ships its public half in the header.
    attacker = TokenIssuer(ISSUER, key_type="EC")
    token = mint(attacker, extra_headers={"jwk": attacker.jwks()["keys"][0]})
    assert await reason(verifier, token) == TokenReason.UNKNOWN_KID
    token = mint(attacker, extra_headers={"jwk": attacker.jwks()["keys"][0], "kid": es().kid})
    assert await reason(verifier, token) == TokenReason.SIGNATURE_INVALID


async def test_jku_and_x5u_are_never_fetched() -> None:
    attacker = TokenIssuer(ISSUER, key_type="RSA", kid=rs().kid)  # same kid as the real key
    async with JWKSServer() as server:
        server.routes = {"/jwks": all_keys(), "/evil/jwks": attacker.jwks(), "/evil/x5u": b"{}"}
        headers = {"jku": server.url("/evil/jwks"), "x5u": server.url("/evil/x5u")}
        async with JWKSVerifier(token_settings(jwks=server.url("/jwks"))) as verifier:
            forged = mint(attacker, extra_headers=headers)
            assert await reason(verifier, forged) == TokenReason.SIGNATURE_INVALID
            stranger = mint(TokenIssuer(ISSUER), extra_headers=headers)
            assert await reason(verifier, stranger) == TokenReason.UNKNOWN_KID
            genuine = mint(rs(), extra_headers=headers)
            assert (await verifier.verify(genuine, now=NOW)).pod_uid == "pod-uid-1"
        assert server.count("/evil/jwks") == server.count("/evil/x5u") == 0
        assert set(server.hits) == {"/jwks"}


KID_INJECTIONS = [
    "../../../../etc/passwd",
    "/dev/random",
    "http://127.0.0.1:1/jwks",
    "{port_url}",
    "' OR '1'='1",
    "%2e%2e%2f%2e%2e%2fjwks",
    "kid\x00null",
    "kid\nX-Injected: 1",
    "${jndi:ldap://127.0.0.1/a}",
    "k" * 10_000,
    "",
    "ключ",
]


@pytest.mark.parametrize("kid", KID_INJECTIONS, ids=lambda k: repr(k[:24]))
async def test_kid_is_only_a_lookup_key(kid: str, tmp_path: Path) -> None:
    async with JWKSServer() as server:
        server.routes = {"/jwks": all_keys(), "/etc/passwd": {"keys": []}}
        kid = kid.replace("{port_url}", server.url("/etc/passwd"))
        async with JWKSVerifier(token_settings(jwks=server.url("/jwks"))) as verifier:
            token = mint(rs(), extra_headers={"kid": kid})
            with pytest.raises(InvalidToken) as caught:
                await verifier.verify(token, now=NOW)
        assert caught.value.code == TokenReason.UNKNOWN_KID
        assert set(server.hits) == {"/jwks"}
        assert len(caught.value.detail) < 200


# --- the token's shape and size ------------------------------------------------------


SHAPES: list[tuple[str, Any]] = [
    ("empty", ""),
    ("one part", "abc"),
    ("two parts", "abc.def"),
    ("four parts", "a.b.c.d"),
    ("empty header", ".e30.c2ln"),
    ("empty payload", "e30..c2ln"),
    ("spaces", "e30 .e30.c2ln"),
    ("newline", mint(shared_issuer("RSA")) + "\n"),
    ("padding", "e30=.e30.c2ln"),
    ("standard base64", "e3+/.e30.c2ln"),
    ("non-ASCII", "é30.e30.c2ln"),
    ("bad base64 length", "eyJhbGciOiJSUzI1NiJ9x.e30.c2ln"),
    ("bytes", mint(shared_issuer("RSA")).encode()),
    ("None", None),
    ("int", 42),
    ("JSON serialization", '{"payload":"e30","signatures":[]}'),
]


@pytest.mark.parametrize("token", [pytest.param(t, id=i) for i, t in SHAPES])
async def test_malformed(verifier: JWKSVerifier, source: MemorySource, token: Any) -> None:
    assert await reason(verifier, token) == TokenReason.MALFORMED
    assert source.fetches == 0


BASE64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


async def test_non_canonical_base64url_is_malformed(verifier: JWKSVerifier) -> None:
    token = mint(rs())
    assert (await verifier.verify(token, now=NOW + 10)).pod_name == "api-1"
    # An RSA-2048 signature is 342 characters; the last one carries 4 unused bits.
    # Setting one gives another text for the same bytes: a lenient decoder would
    # accept this copy of a genuine token.
    data, _, signature = token.rpartition(".")
    last = BASE64URL_ALPHABET.index(signature[-1])
    twin = f"{data}.{signature[:-1]}{BASE64URL_ALPHABET[last ^ 1]}"
    assert await reason(verifier, twin) == TokenReason.MALFORMED


async def test_oversized_token_is_refused_before_decoding(
    verifier: JWKSVerifier, source: MemorySource
) -> None:
    token = mint(rs(), claims_override={"padding": "x" * MAX_TOKEN_BYTES})
    assert len(token) > MAX_TOKEN_BYTES
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token, now=NOW)
    assert caught.value.code == TokenReason.MALFORMED
    assert "larger than" in caught.value.detail
    assert source.fetches == 0


async def test_token_limit_is_configurable(source: MemorySource) -> None:
    token = mint(rs())
    async with JWKSVerifier(token_settings(), source=source, max_token_bytes=len(token)) as v:
        assert (await v.verify(token, now=NOW)).pod_uid == "pod-uid-1"
    async with JWKSVerifier(token_settings(), source=source, max_token_bytes=len(token) - 1) as v:
        assert await reason(v, token) == TokenReason.MALFORMED


# --- claims, through the verifier ----------------------------------------------------

LEEWAY = 30
EXP = NOW + LIFETIME

# (case id, mint overrides, settings overrides, verification time, expected code or None)
CLAIM_CASES: list[tuple[str, dict[str, Any], dict[str, Any], float, str | None]] = [
    ("ok", {}, {}, NOW, None),
    (
        "wrong iss",
        {"claims_override": {"iss": "https://evil"}},
        {},
        NOW,
        TokenReason.ISSUER_MISMATCH,
    ),
    (
        "issuer configured differently",
        {},
        {"issuer": "https://other"},
        NOW,
        TokenReason.ISSUER_MISMATCH,
    ),
    ("wrong aud", {"audiences": ["vault"]}, {}, NOW, TokenReason.AUDIENCE_MISMATCH),
    ("one of several aud", {"audiences": ["vault", AUDIENCE]}, {}, NOW, None),
    (
        "aud configured differently",
        {},
        {"audiences": ("other",)},
        NOW,
        TokenReason.AUDIENCE_MISMATCH,
    ),
    ("expired", {}, {}, EXP + 3600, TokenReason.EXPIRED),
    ("exp just inside leeway", {}, {}, EXP + LEEWAY, None),
    ("exp just outside leeway", {}, {}, EXP + LEEWAY + 1, TokenReason.EXPIRED),
    ("exp outside zero leeway", {}, {"leeway_seconds": 0}, EXP + 1, TokenReason.EXPIRED),
    ("nbf in future", {"now": NOW + 600}, {}, NOW, TokenReason.NOT_YET_VALID),
    ("nbf just inside leeway", {"now": NOW + LEEWAY}, {}, NOW, None),
    ("nbf just outside leeway", {"now": NOW + LEEWAY + 1}, {}, NOW, TokenReason.NOT_YET_VALID),
    ("too old", {"lifetime": 86400}, {"max_age_seconds": 3600}, NOW + 7200, TokenReason.TOO_OLD),
    ("old, no max age", {"lifetime": 86400}, {}, NOW + 7200, None),
    (
        "k8s claim missing",
        {"claims_override": {"kubernetes.io": None}},
        {},
        NOW,
        TokenReason.CLAIMS_MISSING,
    ),
    (
        "pod missing",
        {
            "claims_override": {
                "kubernetes.io": {
                    "namespace": "sports-web",
                    "serviceaccount": {"name": "api", "uid": "u"},
                }
            }
        },
        {},
        NOW,
        TokenReason.CLAIMS_MISSING,
    ),
    (
        "sa uid missing",
        {
            "claims_override": {
                "kubernetes.io": {
                    "namespace": "sports-web",
                    "pod": {"name": "p", "uid": "u"},
                    "serviceaccount": {"name": "api"},
                }
            }
        },
        {},
        NOW,
        TokenReason.CLAIMS_MISSING,
    ),
    (
        "sub mismatch",
        {"claims_override": {"sub": "system:serviceaccount:kube-system:admin"}},
        {},
        NOW,
        TokenReason.SUBJECT_MISMATCH,
    ),
    ("exp missing", {"claims_override": {"exp": None}}, {}, NOW, TokenReason.CLAIMS_MISSING),
    ("exp as string", {"claims_override": {"exp": "tomorrow"}}, {}, NOW, TokenReason.MALFORMED),
]


@pytest.mark.parametrize(
    ("mint_args", "settings_args", "now", "code"),
    [pytest.param(m, s, n, c, id=i) for i, m, s, n, c in CLAIM_CASES],
)
async def test_claims(
    source: MemorySource,
    mint_args: dict[str, Any],
    settings_args: dict[str, Any],
    now: float,
    code: str | None,
) -> None:
    token = mint(rs(), **mint_args)
    async with JWKSVerifier(token_settings(**settings_args), source=source) as verifier:
        if code is None:
            assert (await verifier.verify(token, now=now)).pod_uid == "pod-uid-1"
        else:
            assert await reason(verifier, token, now=now) == code


async def test_time_is_the_callers_not_the_wall_clock(verifier: JWKSVerifier) -> None:
    # A token from 1970 verifies at its own time; pyjwt's own exp check would refuse it.
    token = mint(rs(), now=1000)
    assert (await verifier.verify(token, now=1000)).issued_at == 1000
    assert await reason(verifier, mint(rs()), now=NOW + 10 * LIFETIME) == TokenReason.EXPIRED


async def test_details_never_contain_the_token(verifier: JWKSVerifier) -> None:
    for token in (
        mint(rs(), audiences=["vault"]),
        tampered_payload(),
        alg_none(),
        mint(rs(), extra_headers={"crit": ["x"]}),
        mint(rs()) + "x",
    ):
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(token, now=NOW)
        assert all(part not in str(caught.value) for part in token.split(".")[1:] if part)


# --- construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"issuer": ""},
        {"audiences": ()},
        {"audiences": "identityd"},
        {"leeway_seconds": -1},
        {"max_age_seconds": -5},
        {"refetch_interval_seconds": -1.0},
        {"max_key_age_seconds": 0.0},
    ],
)
def test_bad_settings(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="settings"):
        JWKSVerifier(token_settings(**bad), source=MemorySource({"keys": []}))


async def test_context_manager_closes_the_source(source: MemorySource) -> None:
    async with JWKSVerifier(token_settings(), source=source):
        pass
    assert source.closed


async def test_from_a_jwks_file(tmp_path: Path) -> None:
    issuer = TokenIssuer(ISSUER, key_type="EC")
    path = tmp_path / "jwks.json"
    issuer.write_jwks(path)
    async with JWKSVerifier(token_settings(jwks=str(path))) as verifier:
        assert (await verifier.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"
    async with JWKSVerifier(token_settings(), source=FileKeySource(path)) as verifier:
        assert (await verifier.verify(mint(issuer), now=NOW)).pod_uid == "pod-uid-1"


async def test_missing_jwks_file_is_unavailable(tmp_path: Path) -> None:
    async with JWKSVerifier(token_settings(jwks=str(tmp_path / "absent.json"))) as verifier:
        with pytest.raises(KeysUnavailable) as caught:
            await verifier.verify(mint(rs()), now=NOW)
    assert caught.value.status == 503
    assert "absent.json" in caught.value.detail
