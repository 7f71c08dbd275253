"""A local minting authority for bound service-account tokens (demo, tests, dev tools).

Tokens carry exactly the claims the Kubernetes API server's TokenRequest API
puts in a bound token, signed with a real private key, and :meth:`jwks`
publishes the public half the way ``/openid/v1/jwks`` does. Not for production.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# Signing algorithms per key type; the first is the default.
_ALGORITHMS = {"RSA": ("RS256", "RS384", "RS512", "PS256"), "EC": ("ES256", "ES384")}
_EC_CURVES: dict[str, tuple[type[ec.EllipticCurve], str, int]] = {
    "ES256": (ec.SECP256R1, "P-256", 32),
    "ES384": (ec.SECP384R1, "P-384", 48),
}
_RSA_BITS = 2048


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int, length: int | None = None) -> str:
    return _b64url(value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big"))


@dataclass(frozen=True)
class _SigningKey:
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    alg: str
    kid: str

    @staticmethod
    def generate(alg: str, kid: str | None) -> _SigningKey:
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if alg in _EC_CURVES:
            private_key = ec.generate_private_key(_EC_CURVES[alg][0]())
        else:
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
        return _SigningKey(private_key, alg, kid or thumbprint(_public_members(private_key, alg)))

    def public_jwk(self) -> dict[str, str]:
        return {
            **_public_members(self.private_key, self.alg),
            "kid": self.kid,
            "alg": self.alg,
            "use": "sig",
        }


def _public_members(
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, alg: str
) -> dict[str, str]:
    """The required public members of the key's JWK (RFC 7518 §6)."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        numbers = private_key.public_key().public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    _, crv, size = _EC_CURVES[alg]
    point = private_key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": crv,
        "x": _b64url_uint(point.x, size),
        "y": _b64url_uint(point.y, size),
    }


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) over the required members."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class TokenIssuer:
    """Signs bound service-account tokens for ``issuer`` with one current key.

    ``key_type`` "RSA" (2048 bits, RS256 unless ``alg`` says RS384/RS512/PS256)
    or "EC" (P-256/ES256, or P-384 with ``alg="ES384"``). ``kid`` defaults to
    the RFC 7638 thumbprint of the public key.
    """

    def __init__(
        self,
        issuer: str,
        *,
        key_type: str = "RSA",
        kid: str | None = None,
        alg: str | None = None,
    ) -> None:
        if key_type not in _ALGORITHMS:
            raise ValueError(f"key_type: expected 'RSA' or 'EC', got {key_type!r}")
        if alg is not None and alg not in _ALGORITHMS[key_type]:
            raise ValueError(f"alg: {alg!r} does not fit key_type {key_type!r}")
        self.issuer = issuer
        self._alg = alg or _ALGORITHMS[key_type][0]
        self._current = _SigningKey.generate(self._alg, kid)
        self._old: list[_SigningKey] = []

    @property
    def kid(self) -> str:
        return self._current.kid

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def private_key(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        """The current signing key, for tests that hand-craft tokens."""
        return self._current.private_key

    def mint(
        self,
        namespace: str,
        service_account: str,
        pod_name: str,
        pod_uid: str,
        *,
        audiences: Sequence[str],
        node_name: str | None = None,
        node_uid: str | None = None,
        sa_uid: str | None = None,
        now: float | None = None,
        lifetime: int = 3600,
        extra_headers: dict[str, Any] | None = None,
        claims_override: dict[str, Any] | None = None,
    ) -> str:
        """A signed bound token. In ``extra_headers`` and ``claims_override`` a value
        of None removes that header or claim (to build broken tokens in tests)."""
        if isinstance(audiences, str):
            raise TypeError("audiences: expected a sequence of strings, got a str")
        issued_at = int(time.time() if now is None else now)
        k8s: dict[str, Any] = {
            "namespace": namespace,
            "pod": {"name": pod_name, "uid": pod_uid},
            "serviceaccount": {"name": service_account, "uid": sa_uid or str(uuid.uuid4())},
        }
        if node_name is not None:
            k8s["node"] = {"name": node_name, "uid": node_uid or str(uuid.uuid4())}
        claims: dict[str, Any] = {
            "aud": list(audiences),
            "exp": issued_at + lifetime,
            "iat": issued_at,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": k8s,
            "nbf": issued_at,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        claims = _merged(claims, claims_override)
        # The API server writes only alg and kid; typ=None makes pyjwt drop its "JWT".
        headers = _merged({"kid": self._current.kid}, extra_headers)
        return jwt.encode(
            claims,
            self._current.private_key,
            algorithm=self._alg,
            headers={"typ": None, **headers},
        )

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public keys, current first, as a JWK Set."""
        return {"keys": [key.public_jwk() for key in (self._current, *self._old)]}

    def write_jwks(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`jwks` to ``path`` atomically (a reader never sees half a file)."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self.jwks(), out)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def rotate(self, *, kid: str | None = None) -> str:
        """Sign with a new key from now on; the old one stays in :meth:`jwks` until
        :meth:`drop_old`. Returns the new kid."""
        self._old.insert(0, self._current)
        self._current = _SigningKey.generate(self._alg, kid)
        return self._current.kid

    def drop_old(self) -> None:
        self._old.clear()


def _merged(base: dict[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = {**base, **(override or {})}
    return {key: value for key, value in merged.items() if value is not None}
