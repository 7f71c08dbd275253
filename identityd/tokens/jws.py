"""The compact JWS: a token split and decoded once, and the header members we act on.

Pure, and nothing verified yet: :func:`parse_token` refuses an oversized or
malformed token, a ``crit`` header and an ``alg`` outside the allow-list before
any key is looked at; the signature and the claims are the verifier's
(:mod:`identityd.tokens.jwks`).

The compact form is split and decoded once, here, and the signature checked with
pyjwt's implementation of the algorithm (``jwt.algorithms``). ``jwt.decode``
would decode the token again and checks its base64url one character at a time
in Python: ~0.1 ms of a ~0.15 ms verification for a 1 KB bound token, measured.
The checks are pyjwt's: the base64url alphabet (one regular expression over the
token), canonical encoding (re-encoded, it must give the same text), a JSON
object header and payload.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from identityd.errors import InvalidToken
from identityd.settings import MAX_TOKEN_BYTES
from identityd.tokens.claims import TokenReason

# Only asymmetric algorithms: `none` and HMAC (whose "key" could be a public key
# anyone has) are refused before any key is looked at.
# The set the API server signs with (--service-account-key-file takes RSA and ECDSA
# P-256/384/521 keys), and PS256.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256"}
)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class TokenHeader:
    alg: str
    kid: str | None


@dataclass(frozen=True, slots=True)
class TokenParts:
    """A compact JWS split and decoded once; nothing in it is verified yet."""

    header: TokenHeader
    signing_input: bytes  # the first two segments, as signed
    payload: bytes
    signature: bytes


def _segment(text: str, name: str) -> bytes:
    """One base64url segment (alphabet already checked), canonical or refused."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken(TokenReason.MALFORMED, f"{name} is not base64url") from None
    # Unused trailing bits set: another text for the same bytes (pyjwt refuses it too).
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != text.encode("ascii"):
        raise InvalidToken(TokenReason.MALFORMED, f"{name} is not canonical base64url")
    return raw


def parse_token(token: object, *, max_bytes: int = MAX_TOKEN_BYTES) -> TokenParts:
    """Split and decode a compact JWS, and read the header members we act on.

    Raises InvalidToken for an oversized or malformed token, a ``crit`` or
    ``b64`` header (RFC 7515 §4.1.11: we implement no extension), a ``kid``
    that is not a string, or an ``alg`` outside :data:`ALLOWED_ALGORITHMS`.
    Other header members (``jku``, ``x5u``, ``x5c``, ``jwk``, ...) are ignored
    on purpose."""
    if not isinstance(token, str):
        raise InvalidToken(TokenReason.MALFORMED, "token is not a string")
    if len(token) > max_bytes:
        raise InvalidToken(TokenReason.MALFORMED, f"token is larger than {max_bytes} bytes")
    if not _COMPACT_JWS.fullmatch(token):
        raise InvalidToken(TokenReason.MALFORMED, "token is not three base64url segments")
    head, body, signature = token.split(".")
    try:
        header = json.loads(_segment(head, "header"))
    except (ValueError, RecursionError):
        raise InvalidToken(TokenReason.MALFORMED, "header is not a base64url JSON object") from None
    if not isinstance(header, dict):
        raise InvalidToken(TokenReason.MALFORMED, "header is not a base64url JSON object")
    if "crit" in header or "b64" in header:
        raise InvalidToken(
            TokenReason.HEADER_INVALID, "critical header extensions are not supported"
        )
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):  # null too
        raise InvalidToken(TokenReason.HEADER_INVALID, "kid or crit header is invalid")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        shown = repr(alg)[:40] if alg is not None else "missing"
        raise InvalidToken(TokenReason.ALG_NOT_ALLOWED, f"alg {shown} is not allowed")
    return TokenParts(
        header=TokenHeader(alg, kid),
        signing_input=f"{head}.{body}".encode("ascii"),
        payload=_segment(body, "payload"),
        signature=_segment(signature, "signature"),
    )


def read_header(token: object, *, max_bytes: int = MAX_TOKEN_BYTES) -> TokenHeader:
    """The parts of the unverified JOSE header we act on: ``alg`` and ``kid``
    (see :func:`parse_token` for what is refused)."""
    return parse_token(token, max_bytes=max_bytes).header
