"""Claim checks of a bound service-account token, after its signature verified (DESIGN §4).

Pure: the caller passes the decoded claims and the time; nothing here does I/O
or reads a clock. Every failure is an :class:`InvalidToken` with one of the
reason codes below; no input, however odd its types, raises anything else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from enum import StrEnum

from identityd.errors import InvalidToken
from identityd.tokens.base import TokenClaims


class TokenReason(StrEnum):
    """Reason codes of token verification (stable: the CA and the decision log see them)."""

    MALFORMED = "TOKEN_MALFORMED"
    HEADER_INVALID = "TOKEN_HEADER_INVALID"
    ALG_NOT_ALLOWED = "TOKEN_ALG_NOT_ALLOWED"
    UNKNOWN_KID = "TOKEN_UNKNOWN_KID"
    SIGNATURE_INVALID = "TOKEN_SIGNATURE_INVALID"
    ISSUER_MISMATCH = "TOKEN_ISSUER_MISMATCH"
    AUDIENCE_MISMATCH = "TOKEN_AUDIENCE_MISMATCH"
    EXPIRED = "TOKEN_EXPIRED"
    NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    TOO_OLD = "TOKEN_TOO_OLD"
    CLAIMS_MISSING = "TOKEN_CLAIMS_MISSING"
    SUBJECT_MISMATCH = "TOKEN_SUBJECT_MISMATCH"


SUBJECT_PREFIX = "system:serviceaccount:"

# C0/C1 controls (NUL included) and lone surrogates: never legitimate in a claim,
# and a lone surrogate would crash whatever encodes the string to UTF-8 later.
_FORBIDDEN_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# NumericDate bounds: negative or beyond float precision is no real token.
_MAX_NUMERIC_DATE = 2**53
# Claim values quoted in details are cut to this many characters.
_DETAIL_CHARS = 80


def validate_claims(
    claims: Mapping[str, object],
    *,
    issuer: str,
    audiences: Sequence[str],
    now: float,
    leeway: int,
    max_age: int,
) -> TokenClaims:
    """Check ``claims`` against the configuration at time ``now``; return them as a value.

    ``leeway`` widens every time window at both ends; ``max_age`` > 0 caps the
    age of the token (``now - iat``). Raises :class:`InvalidToken`.
    """
    if isinstance(audiences, str):
        raise TypeError("audiences: expected a sequence of strings, got a str")
    if not isinstance(claims, Mapping):
        raise InvalidToken(TokenReason.MALFORMED, "claims are not a JSON object")

    token_issuer = claims.get("iss")
    if token_issuer is None:
        raise InvalidToken(TokenReason.ISSUER_MISMATCH, "token has no issuer")
    if _text(token_issuer, "iss", TokenReason.MALFORMED) != issuer:
        raise InvalidToken(
            TokenReason.ISSUER_MISMATCH, f"issuer {_quote(token_issuer)} is not the configured one"
        )

    token_audience = _audience(claims.get("aud"))
    if not set(token_audience) & set(audiences):
        raise InvalidToken(TokenReason.AUDIENCE_MISMATCH, "no audience of the token is configured")

    expires_at = _numeric_date(claims, "exp")
    not_before = _numeric_date(claims, "nbf") if claims.get("nbf") is not None else None
    issued_at = _numeric_date(claims, "iat")
    if now > expires_at + leeway:
        raise InvalidToken(TokenReason.EXPIRED, f"expired {now - expires_at:.0f}s ago")
    if not_before is not None and now < not_before - leeway:
        raise InvalidToken(
            TokenReason.NOT_YET_VALID, f"not valid for another {not_before - now:.0f}s"
        )
    if issued_at > now + leeway:
        raise InvalidToken(
            TokenReason.NOT_YET_VALID, f"issued {issued_at - now:.0f}s in the future"
        )
    if max_age > 0 and now - issued_at > max_age + leeway:
        raise InvalidToken(
            TokenReason.TOO_OLD, f"issued {now - issued_at:.0f}s ago, more than {max_age}s"
        )

    k8s = _mapping(claims.get("kubernetes.io"), "kubernetes.io")
    namespace = _text(k8s.get("namespace"), "kubernetes.io.namespace", TokenReason.CLAIMS_MISSING)
    pod = _mapping(k8s.get("pod"), "kubernetes.io.pod")
    pod_name = _text(pod.get("name"), "kubernetes.io.pod.name", TokenReason.CLAIMS_MISSING)
    pod_uid = _text(pod.get("uid"), "kubernetes.io.pod.uid", TokenReason.CLAIMS_MISSING)
    account = _mapping(k8s.get("serviceaccount"), "kubernetes.io.serviceaccount")
    sa_name = _text(
        account.get("name"), "kubernetes.io.serviceaccount.name", TokenReason.CLAIMS_MISSING
    )
    sa_uid = _text(
        account.get("uid"), "kubernetes.io.serviceaccount.uid", TokenReason.CLAIMS_MISSING
    )
    node_name, node_uid = _node(k8s.get("node"))

    subject = claims.get("sub")
    expected_subject = f"{SUBJECT_PREFIX}{namespace}:{sa_name}"
    if subject is None:
        raise InvalidToken(TokenReason.SUBJECT_MISMATCH, "token has no subject")
    if _text(subject, "sub", TokenReason.MALFORMED) != expected_subject:
        raise InvalidToken(
            TokenReason.SUBJECT_MISMATCH,
            f"subject {_quote(subject)} does not name the token's service account",
        )

    return TokenClaims(
        issuer=issuer,
        audience=token_audience,
        subject=expected_subject,
        namespace=namespace,
        service_account=sa_name,
        service_account_uid=sa_uid,
        pod_name=pod_name,
        pod_uid=pod_uid,
        node_name=node_name,
        node_uid=node_uid,
        issued_at=int(issued_at),
        expires_at=int(expires_at),
        not_before=None if not_before is None else int(not_before),
        verified_by="jwks",
    )


def _text(value: object, name: str, wrong_type_code: str) -> str:
    """A non-empty string without control characters, or InvalidToken."""
    if not isinstance(value, str) or not value:
        raise InvalidToken(wrong_type_code, f"{name} is not a non-empty string")
    if _FORBIDDEN_CHARS.search(value):
        raise InvalidToken(TokenReason.MALFORMED, f"{name} contains control characters")
    return value


def _mapping(value: object, name: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise InvalidToken(TokenReason.CLAIMS_MISSING, f"{name} is not an object")
    return value


def _audience(value: object) -> tuple[str, ...]:
    # RFC 7519 §4.1.3: a single string or an array of strings.
    if value is None:
        raise InvalidToken(TokenReason.AUDIENCE_MISMATCH, "token has no audience")
    if isinstance(value, str):
        return (_text(value, "aud", TokenReason.MALFORMED),)
    if not isinstance(value, list) or not value:
        raise InvalidToken(TokenReason.MALFORMED, "aud is neither a string nor a non-empty list")
    return tuple(_text(item, "aud[]", TokenReason.MALFORMED) for item in value)


def _numeric_date(claims: Mapping[str, object], name: str) -> float:
    value = claims.get(name)
    if value is None:
        raise InvalidToken(TokenReason.CLAIMS_MISSING, f"token has no {name}")
    # bool is an int subclass; true is not a date.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(TokenReason.MALFORMED, f"{name} is not a number")
    # A comparison, not math.isfinite: NaN fails it, and 10**400 cannot become a float.
    if not 0 <= value <= _MAX_NUMERIC_DATE:
        raise InvalidToken(TokenReason.MALFORMED, f"{name} is out of range")
    return float(value)


def _node(value: object) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    node = _mapping(value, "kubernetes.io.node")
    name = _text(node.get("name"), "kubernetes.io.node.name", TokenReason.MALFORMED)
    uid = node.get("uid")
    return name, None if uid is None else _text(
        uid, "kubernetes.io.node.uid", TokenReason.MALFORMED
    )


def _quote(value: object) -> str:
    """A claim value for a detail: repr-escaped and cut short."""
    text = repr(value)
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."
