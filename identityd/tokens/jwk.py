"""The JSON Web Key side: a JWK Set document read into the keys a token may be checked with.

Pure: :func:`parse_jwks` keeps the RSA and EC signature keys of a set and skips
(logged) single keys that are not meant for signatures, malformed, weak or
duplicated rather than failing the whole set; :meth:`VerificationKey.fits`
refuses algorithm confusion. Where the document comes from is
:mod:`identityd.tokens.key_sources`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identityd.settings import MAX_RSA_BITS, MAX_RSA_EXPONENT_BITS, MIN_RSA_BITS
from identityd.tokens.jws import ALLOWED_ALGORITHMS

log = logging.getLogger(__name__)

_EC_ALG_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_JWK_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
# Keys read from one set; the API server publishes a handful.
MAX_JWKS_KEYS = 64

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True, eq=False)
class VerificationKey:
    kid: str | None
    alg: str | None  # the JWK's own "alg", when it names one
    public_key: PublicKey

    def fits(self, alg: str) -> bool:
        """Whether a token signed with ``alg`` may be checked with this key.

        Refuses algorithm confusion: an RSA key only for RS*/PS*, an EC key only
        for the ES alg of its curve, and never against the JWK's own ``alg``."""
        if self.alg is not None and self.alg != alg:
            return False
        if isinstance(self.public_key, rsa.RSAPublicKey):
            return alg[:2] in ("RS", "PS")
        return _EC_ALG_CURVES.get(alg) == self.public_key.curve.name


def parse_jwks(document: object) -> tuple[VerificationKey, ...]:
    """The usable signature keys of a JWK Set document.

    Raises ValueError when ``document`` is not a JWK Set. Single keys that are
    not RSA/EC signature keys, malformed, weak or duplicated are skipped (logged)
    rather than failing the whole set."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' list)")
    keys: list[VerificationKey] = []
    kids: set[str] = set()
    for index, entry in enumerate(document["keys"][:MAX_JWKS_KEYS]):
        try:
            key = _parse_jwk(entry)
        except ValueError as exc:
            log.warning("JWK #%d skipped: %s", index, exc)
            continue
        if key is None:
            continue
        if key.kid is not None:
            if key.kid in kids:
                log.warning("JWK #%d skipped: duplicate kid", index)
                continue
            kids.add(key.kid)
        keys.append(key)
    return tuple(keys)


def _parse_jwk(entry: object) -> VerificationKey | None:
    """One JWK: a key, None for a key not meant for us, ValueError for a broken one."""
    if not isinstance(entry, Mapping):
        raise ValueError("not an object")
    kty, use, kid, alg = (entry.get(name) for name in ("kty", "use", "kid", "alg"))
    if use is not None and use != "sig":
        return None
    if kty not in ("RSA", "EC"):
        return None
    if alg is not None and (not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS):
        return None
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if any(name in entry for name in ("d", "p", "q")):
        raise ValueError("contains private key material")
    public_key = _rsa_key(entry) if kty == "RSA" else _ec_key(entry)
    if public_key is None:
        return None
    key = VerificationKey(kid, alg, public_key)
    if alg is not None and not key.fits(alg):
        raise ValueError(f"alg {alg} does not fit the key type")
    return key


def _rsa_key(entry: Mapping[str, object]) -> rsa.RSAPublicKey:
    modulus = int.from_bytes(_b64url_member(entry, "n"), "big")
    exponent = int.from_bytes(_b64url_member(entry, "e"), "big")
    if not MIN_RSA_BITS <= modulus.bit_length() <= MAX_RSA_BITS:
        raise ValueError(f"RSA modulus of {modulus.bit_length()} bits")
    if exponent.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise ValueError("RSA exponent too large")
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()  # ValueError if invalid


def _ec_key(entry: Mapping[str, object]) -> ec.EllipticCurvePublicKey | None:
    crv = entry.get("crv")
    if not isinstance(crv, str) or crv not in _JWK_CURVES:
        return None  # secp256k1, ...: no allowed alg uses them
    curve, size = _JWK_CURVES[crv]
    x, y = _b64url_member(entry, "x"), _b64url_member(entry, "y")
    if len(x) != size or len(y) != size:
        raise ValueError(f"{crv} coordinates of the wrong length")
    point = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve)
    return point.public_key()  # ValueError if the point is not on the curve


def _b64url_member(entry: Mapping[str, object], name: str) -> bytes:
    value = entry.get(name)
    if not isinstance(value, str) or not value or not _BASE64URL.fullmatch(value):
        raise ValueError(f"{name} is not base64url")
    stripped = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{name} is not base64url") from exc
