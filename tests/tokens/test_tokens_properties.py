"""Properties: whatever arrives as a token, verification answers with InvalidToken (or
KeysUnavailable), never with another exception, and never echoes the token."""

from __future__ import annotations

import asyncio
import string
from typing import Any

import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokens_support import (
    NOW,
    MemorySource,
    b64url,
    b64url_json,
    claims_of,
    merged_jwks,
    mint,
    shared_issuer,
    token_settings,
)

from identityd.errors import InvalidToken, KeysUnavailable
from identityd.tokens import JWKSVerifier
from identityd.tokens.base import TokenClaims

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
b64url_text = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=60)


def outcome(token: Any) -> TokenClaims | Exception:
    """Verify once, on a fresh loop; return the claims or the expected exception."""

    async def run() -> TokenClaims | Exception:
        source = MemorySource(merged_jwks(shared_issuer("RSA"), shared_issuer("EC")))
        async with JWKSVerifier(
            token_settings(refetch_interval_seconds=0.0), source=source
        ) as verifier:
            try:
                return await verifier.verify(token, now=NOW)
            except (InvalidToken, KeysUnavailable) as exc:
                return exc

    result = asyncio.run(run())
    if isinstance(result, Exception) and isinstance(token, str) and len(token) >= 8:
        assert token not in str(result)
    return result


@PROFILE
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_arbitrary_text_or_bytes(token: str | bytes) -> None:
    assert isinstance(outcome(token), InvalidToken)


@PROFILE
@given(st.lists(b64url_text, min_size=1, max_size=5).map(".".join))
def test_arbitrary_base64url_segments(token: str) -> None:
    assert isinstance(outcome(token), InvalidToken)


@PROFILE
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "crit", "jku", "typ", "b64", "x5c"]),
        st.sampled_from(["RS256", "ES256", "none", "HS256", "EdDSA"]) | json_values,
        max_size=4,
    ),
    payload=json_values,
    signature=st.binary(max_size=300),
)
def test_arbitrary_header_payload_and_signature(
    header: dict[str, Any], payload: Any, signature: bytes
) -> None:
    token = f"{b64url_json(header)}.{b64url_json(payload)}.{b64url(signature)}"
    assert isinstance(outcome(token), InvalidToken)


@PROFILE
@given(
    changes=st.dictionaries(
        st.sampled_from(["iss", "aud", "exp", "nbf", "iat", "sub", "kubernetes.io", "jti"]),
        json_values,
        max_size=4,
    ),
    k8s_changes=st.dictionaries(
        st.sampled_from(["namespace", "pod", "serviceaccount", "node"]), json_values, max_size=3
    ),
)
def test_validly_signed_arbitrary_claims(
    changes: dict[str, Any], k8s_changes: dict[str, Any]
) -> None:
    issuer = shared_issuer("EC")
    claims = claims_of(mint(issuer))
    claims["kubernetes.io"].update(k8s_changes)
    claims.update(changes)
    # Signed by hand: pyjwt's encode would refuse some of these claims itself.
    data = f"{b64url_json({'alg': 'ES256', 'kid': issuer.kid})}.{b64url_json(claims)}"
    signature = jwt.PyJWS().get_algorithm_by_name("ES256").sign(data.encode(), issuer.private_key)
    token = f"{data}.{b64url(signature)}"
    result = outcome(token)
    if not changes and not k8s_changes:
        assert isinstance(result, TokenClaims)
    assert isinstance(result, TokenClaims | InvalidToken)
