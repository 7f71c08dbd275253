"""JWKSVerifier.verify over damaged genuine tokens: only InvalidToken comes out, with a
known reason code and without the token in it, unless the damage left a token that
means exactly the same (base64url's ignored trailing bits): then the same claims."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from identityd.errors import InvalidToken
from identityd.keys.issuer import TokenIssuer
from identityd.settings import TokenSettings
from identityd.tokens.base import TokenClaims
from identityd.tokens.claims import TokenReason
from identityd.tokens.jwk import parse_jwks
from identityd.tokens.jwks import JWKSVerifier
from identityd.tokens.jws import read_header
from identityd.tokens.key_sources import KeySource

PROFILE = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ISSUER = "https://kubernetes.default.svc.cluster.local"
NOW = 1_800_000_100
B64URL = string.ascii_letters + string.digits + "-_"
CODES = {reason.value for reason in TokenReason}


class StaticSource:
    """A KeySource double serving one JWK Set."""

    def __init__(self, document: object) -> None:
        self._document = document

    async def fetch(self) -> object:
        return self._document

    async def aclose(self) -> None:
        return None


class Verifier:
    """One JWKSVerifier on its own event loop, driven synchronously per example."""

    def __init__(self, issuers: list[TokenIssuer]) -> None:
        source: KeySource = StaticSource({"keys": [k for i in issuers for k in i.jwks()["keys"]]})
        self.loop = asyncio.new_event_loop()
        self.verifier = JWKSVerifier(
            TokenSettings(issuer=ISSUER, audiences=("identityd",), max_age_seconds=3600),
            source=source,
        )

    def verify(self, token: str) -> TokenClaims | InvalidToken:
        try:
            return self.loop.run_until_complete(self.verifier.verify(token, now=NOW))
        except InvalidToken as exc:
            return exc

    def close(self) -> None:
        self.loop.run_until_complete(self.verifier.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def issuers() -> list[TokenIssuer]:
    return [TokenIssuer(ISSUER), TokenIssuer(ISSUER, key_type="EC")]


@pytest.fixture(scope="module")
def verifier(issuers: list[TokenIssuer]) -> Iterator[Verifier]:
    v = Verifier(issuers)
    yield v
    v.close()


@pytest.fixture(scope="module")
def genuine(issuers: list[TokenIssuer]) -> list[str]:
    return [
        i.mint(
            "sports-web",
            "api",
            "api-1",
            "uid-1",
            audiences=["identityd"],
            node_name="node-1",
            now=NOW - 100,
        )
        for i in issuers
    ]


def damage(data: st.DataObject, token: str) -> str:
    parts = token.split(".")
    op = data.draw(
        st.sampled_from(["char", "insert", "delete", "swap", "dup", "drop", "case", "join"])
    )
    if op in ("char", "insert", "delete"):
        index = data.draw(st.integers(0, 2))
        seg = parts[index]
        at = data.draw(st.integers(0, max(0, len(seg) - 1)))
        char = data.draw(st.sampled_from(B64URL + "=.+/ \u00e9"))
        if op == "char":
            seg = seg[:at] + char + seg[at + 1 :]
        elif op == "insert":
            seg = seg[:at] + char + seg[at:]
        else:
            seg = seg[:at] + seg[at + 1 :]
        parts[index] = seg
    elif op == "swap":
        i, j = data.draw(st.permutations([0, 1, 2]))[:2]
        parts[i], parts[j] = parts[j], parts[i]
    elif op == "dup":
        parts.insert(data.draw(st.integers(0, 3)), parts[data.draw(st.integers(0, 2))])
    elif op == "drop":
        del parts[data.draw(st.integers(0, 2))]
    elif op == "case":
        index = data.draw(st.integers(0, 2))
        parts[index] = parts[index].swapcase()
    else:
        return token + data.draw(st.sampled_from(["", ".", "..", " x"])) + token
    return ".".join(parts)


@PROFILE
@given(data=st.data(), which=st.integers(0, 1))
def test_damaged_genuine_tokens(
    verifier: Verifier, genuine: list[str], data: st.DataObject, which: int
) -> None:
    token = genuine[which]
    original = verifier.verify(token)
    assert isinstance(original, TokenClaims)
    damaged = damage(data, token)
    result = verifier.verify(damaged)
    if isinstance(result, InvalidToken):
        event(result.code)
        assert result.code in CODES
        for segment in token.split("."):
            assert segment[:16] not in str(result) and segment[:16] not in result.detail
        return
    event("verified")
    assert result == original, "a damaged token verified with other claims"


@PROFILE
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_read_header_raises_only_invalid_token(text: str) -> None:
    try:
        header = read_header(text)
    except InvalidToken as exc:
        assert exc.code in CODES
        return
    assert header.alg in {"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"}


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
jwk_members = st.dictionaries(
    st.sampled_from(["kty", "use", "kid", "alg", "n", "e", "crv", "x", "y", "d"]),
    json_leaf | st.sampled_from(["RSA", "EC", "sig", "P-256", "RS256", "AQAB", "AA"]),
    max_size=7,
)


@PROFILE
@given(st.lists(jwk_members, max_size=4) | json_leaf)
def test_parse_jwks_takes_good_keys_or_refuses_with_value_error(keys: Any) -> None:
    try:
        parsed = parse_jwks({"keys": keys} if isinstance(keys, list) else keys)
    except ValueError:
        assert not isinstance(keys, list)
        return
    assert len(parsed) <= (len(keys) if isinstance(keys, list) else 0)
