"""A JWKS endpoint double: a real aiohttp server on loopback serving one JWK Set, as the
API server serves ``/openid/v1/jwks``, with the faults a key endpoint has.

    async with JWKSDouble(issuer.jwks()) as keys:
        settings = TokenSettings(jwks=keys.url, ...)
        await keys.refuse()          # down: connections refused on the same port
        keys.document = issuer.jwks()  # the keys it serves once back
        await keys.accept()

``GET {path}`` → 200 with :attr:`JWKSDouble.document`; any other path → 404. Test
controls: :meth:`~JWKSDouble.refuse` / :meth:`~JWKSDouble.accept` (the port refuses
connections in between), :meth:`~JWKSDouble.set_delay` (slow), :meth:`~JWKSDouble.set_status`
(up, but answering an HTTP error); every GET of the set is counted in
:attr:`JWKSDouble.fetches`.

``tests/tokens/tokens_support.JWKSServer`` serves several paths on a fresh port for the
key-source unit tests; it cannot go down and come back on the same port, which a fault
test of a running identityd needs (its configured URL does not change).
"""

from __future__ import annotations

import asyncio
from typing import Any, Self

from aiohttp import web

JWKS_PATH = "/openid/v1/jwks"


class JWKSDouble:
    def __init__(
        self,
        document: Any,
        *,
        path: str = JWKS_PATH,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.document = document
        self.fetches = 0  # GETs of the set that reached the handler
        self._path = path
        self._host, self._port = host, port
        self._delay = 0.0
        self._status = 200
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self._path, self._jwks)
        # A short shutdown: a delayed handler must not hold up refuse() or close().
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        if self._runner is None:
            raise RuntimeError("the double is not started")
        self._site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await self._site.start()
        server = self._site._server  # the port, when 0 was asked for
        if self._port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self._port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}{self._path}"

    # -- test controls ------------------------------------------------------------------------

    def set_delay(self, seconds: float) -> None:
        """Hold every GET this long before answering; 0 to stop."""
        self._delay = seconds

    def set_status(self, status: int) -> None:
        """Answer every GET with ``status`` (and no key set unless 200) from now on."""
        self._status = status

    async def refuse(self) -> None:
        """Down: open connections are cut and new ones refused until :meth:`accept`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()
        await asyncio.sleep(0)  # let the transports close

    async def accept(self) -> None:
        """Listen again on the same port."""
        if self._site is None:
            await self._listen()

    # -- handler ------------------------------------------------------------------------------

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._status != 200:
            return web.Response(status=self._status)
        return web.json_response(self.document)


__all__ = ["JWKS_PATH", "JWKSDouble"]
