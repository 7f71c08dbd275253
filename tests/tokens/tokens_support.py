"""Helpers for the token tests: real issuers, hand-forged tokens, a key-source double
that counts fetches, a fake monotonic clock, and a JWKS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import Mapping
from typing import Any, Self

from aiohttp import web
from aiohttp.test_utils import TestServer

from identityd.errors import KeysUnavailable
from identityd.keys.issuer import TokenIssuer
from identityd.settings import TokenSettings

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "identityd"
NOW = 1_800_000_000
LIFETIME = 3600


@functools.cache
def shared_issuer(key_type: str = "RSA", alg: str | None = None) -> TokenIssuer:
    """One issuer per (key_type, alg) for the whole run: key generation is slow.
    Never rotate these; make a fresh TokenIssuer for rotation tests."""
    return TokenIssuer(ISSUER, key_type=key_type, alg=alg)


def mint(issuer: TokenIssuer, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "audiences": [AUDIENCE],
        "node_name": "node-1",
        "node_uid": "node-uid-1",
        "sa_uid": "sa-uid-1",
        "now": NOW,
        "lifetime": LIFETIME,
    }
    args.update(overrides)
    return issuer.mint("sports-web", "api", "api-1", "pod-uid-1", **args)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def forge(header: object, claims: object, signature: bytes = b"") -> str:
    """A compact JWS put together by hand (for tokens no library would sign)."""
    return f"{b64url_json(header)}.{b64url_json(claims)}.{b64url(signature)}"


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def token_settings(**overrides: Any) -> TokenSettings:
    values: dict[str, Any] = {"issuer": ISSUER, "audiences": (AUDIENCE,)}
    values.update(overrides)
    return TokenSettings(**values)


def merged_jwks(*issuers: TokenIssuer) -> dict[str, list[dict[str, str]]]:
    return {"keys": [key for issuer in issuers for key in issuer.jwks()["keys"]]}


class MemorySource:
    """A KeySource double: serves ``document``, counts fetches, fails on demand."""

    def __init__(self, document: object) -> None:
        self.document = document
        self.fetches = 0
        self.fail = False
        self.closed = False

    async def fetch(self) -> object:
        self.fetches += 1
        if self.fail:
            raise KeysUnavailable(None, "memory source set to fail")
        return self.document

    async def aclose(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class JWKSServer:
    """A real HTTP server on 127.0.0.1 (port 0) serving JSON per path, recording hits."""

    def __init__(self, routes: Mapping[str, object] | None = None) -> None:
        self.routes: dict[str, object] = dict(routes or {})
        self.status = 200
        self.delay = 0.0
        self.hits: list[str] = []
        self.authorization: list[str | None] = []
        self.redirects: dict[str, str] = {}
        self._server: TestServer | None = None

    @property
    def port(self) -> int:
        if self._server is None or self._server.port is None:
            raise RuntimeError("server not started")
        return self._server.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        return self.hits.count(path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        self.authorization.append(request.headers.get("Authorization"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status)
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        if request.path not in self.routes:
            return web.Response(status=404)
        body = self.routes[request.path]
        if isinstance(body, bytes):
            return web.Response(body=body, content_type="application/json")
        return web.json_response(body)

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server()
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
