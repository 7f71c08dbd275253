"""Parse and validate an InstanceConfirmation body (DESIGN §2) into a CallbackRequest.

Everything here is pure and raises BadRequest with a reason code; nothing is
trusted yet (the token is verified later). Strings with control characters are
refused here because the embedded Rego engine cuts strings at NUL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from identityd.errors import BadRequest
from identityd.settings import MAX_CSR_BYTES, MAX_JSON_DEPTH, MAX_SAN_ENTRIES, MAX_TOKEN_BYTES

KINDS = ("instance", "refresh")
# Attributes ZTS sends as PEM text (with newlines); the rest are single-line strings.
PEM_ATTRIBUTES = ("csr", "csrPublicKey")
# Attributes ZTS sends as comma-joined lists; the policy gets them split.
LIST_ATTRIBUTES = ("sanDNS", "sanIP", "sanURI")
MAX_ATTRIBUTES = 64
MAX_NAME_CHARS = 256  # provider, domain, service
MAX_ATTRIBUTE_CHARS = 4096  # any attribute but csr
# C0/C1 controls (NUL included) and lone surrogates, as the token claims refuse them:
# a lone surrogate passes json.loads but cannot be encoded to UTF-8 further on, and
# an unchecked attribute carrying one was echoed back in an allow.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class CallbackRequest:
    kind: str
    provider: str
    domain: str
    service: str
    attributes: dict[str, str]
    # The raw JWT and the CSR never appear in repr, logs or error details.
    token: str = field(repr=False)
    csr_pem: str | None = field(default=None, repr=False)
    token_wrapped: bool = False  # attestationData was {"identityToken": ...}
    attestation_data: str = field(default="", repr=False)  # verbatim, for the echo

    @property
    def instance_id(self) -> str:
        return self.attributes.get("instanceId", "")

    def list_attribute(self, name: str) -> list[str]:
        return split_list(self.attributes.get(name, ""))


def split_list(value: str) -> list[str]:
    """ZTS joins list attributes with ','; split, trim, and drop empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two parsers may pick different duplicates; refuse instead of guessing.
            raise BadRequest("BAD_JSON", f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise BadRequest("BAD_JSON", f"non-standard JSON constant {name}")


def _depth(value: Any, limit: int) -> int:
    """Depth of nested containers, stopping early past ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, bounded depth."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("BAD_JSON", "body is not UTF-8") from exc
    try:
        value = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except BadRequest:
        raise
    except RecursionError as exc:
        raise BadRequest("BAD_JSON", "JSON nested too deeply") from exc
    except ValueError as exc:
        raise BadRequest("BAD_JSON", f"invalid JSON at char {getattr(exc, 'pos', '?')}") from exc
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BadRequest("BAD_JSON", f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return value


def _string(obj: dict[str, Any], key: str, *, limit: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise BadRequest("BAD_REQUEST", f"{key}: {kind}")
    if required and not value:
        raise BadRequest("BAD_REQUEST", f"{key}: empty")
    _check_text(key, value, limit)
    return value


def _check_text(key: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise BadRequest("BAD_REQUEST", f"{key}: longer than {limit} characters")
    if _CONTROL.search(value):
        raise BadRequest("BAD_REQUEST", f"{key}: control character")


def _attributes(body: dict[str, Any]) -> dict[str, str]:
    raw = body.get("attributes", {})
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("BAD_REQUEST", "attributes: not an object")
    if len(raw) > MAX_ATTRIBUTES:
        raise BadRequest("BAD_REQUEST", f"attributes: more than {MAX_ATTRIBUTES}")
    attributes: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise BadRequest("BAD_REQUEST", f"attributes.{key[:64]}: not a string")
        _check_text("attribute name", key, MAX_NAME_CHARS)
        if key in PEM_ATTRIBUTES:
            # A PEM has newlines (nothing else may); the CSR parser validates csr strictly.
            if len(value) > MAX_CSR_BYTES:
                raise BadRequest("BAD_CSR", f"{key}: longer than {MAX_CSR_BYTES} bytes")
            if _CONTROL.search(value.replace("\n", "").replace("\r", "")):
                raise BadRequest("BAD_REQUEST", f"attributes.{key}: control character")
        else:
            _check_text(f"attributes.{key}", value, MAX_ATTRIBUTE_CHARS)
        attributes[key] = value
    for name in LIST_ATTRIBUTES:
        if len(split_list(attributes.get(name, ""))) > MAX_SAN_ENTRIES:
            raise BadRequest("BAD_REQUEST", f"attributes.{name}: more than {MAX_SAN_ENTRIES}")
    return attributes


def extract_token(attestation: str) -> tuple[str, bool]:
    """attestationData is a raw JWT or a JSON string ``{"identityToken": "<jwt>"}``."""
    text = attestation.strip()
    if not text.startswith("{"):
        return text, False
    try:
        wrapped = parse_json(text.encode("utf-8"))
    except BadRequest as exc:
        raise BadRequest("BAD_ATTESTATION_DATA", "attestationData: invalid JSON") from exc
    token = wrapped.get("identityToken") if isinstance(wrapped, dict) else None
    if not isinstance(token, str) or not token:
        raise BadRequest("BAD_ATTESTATION_DATA", "attestationData: no identityToken string")
    return token.strip(), True


def parse_request(kind: str, body: bytes) -> CallbackRequest:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise BadRequest("BAD_REQUEST", "body: not a JSON object")
    attestation = _string(doc, "attestationData", limit=MAX_TOKEN_BYTES * 2)
    token, wrapped = extract_token(attestation)
    attributes = _attributes(doc)
    csr = attributes.get("csr") or None
    return CallbackRequest(
        kind=kind,
        provider=_string(doc, "provider", limit=MAX_NAME_CHARS),
        domain=_string(doc, "domain", limit=MAX_NAME_CHARS),
        service=_string(doc, "service", limit=MAX_NAME_CHARS),
        attributes=attributes,
        token=token,
        csr_pem=csr,
        token_wrapped=wrapped,
        attestation_data=attestation,
    )
