"""What one worker lets a connection hold: a bounded number of them, none idle for long.

A connection costs a file descriptor whatever it sends. Without a bound, clients
that open connections and send nothing (or a request head a byte at a time) hold
descriptors until the process has none left, and then every legitimate client is
refused too. So:

- aiohttp's keep-alive timer closes a connection that has not completed a request
  head within ``idle_timeout`` of opening, or of its previous answer
  (``runner_options``; aiohttp's own default is an hour);
- :class:`CappedSockSite` closes a new connection at once while the worker
  already holds ``max_connections``;
- the soft open-file limit is raised to the hard one, and the cap kept below it;
- :class:`ThrottledLoopErrors` logs a repeated event-loop error (``accept()`` out
  of descriptors repeats in a tight loop) once per interval with a count.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("identityd.serve")

# Descriptors kept for what is not a callback connection: the listening and probe
# sockets, the API server's watches, OPA, JWKS fetches, log files.
RESERVED_DESCRIPTORS = 64
LOOP_ERROR_INTERVAL_SECONDS = 10.0


def runner_options(idle_timeout: float) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` (handed to each connection's handler)."""
    return {"keepalive_timeout": idle_timeout}


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (as Go's runtime does); the soft
    limit now in force. A refusal leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def connection_cap(max_connections: int) -> int:
    """``max_connections``, kept below the open-file limit less the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - RESERVED_DESCRIPTORS))


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class CappedSockSite(web.SockSite):
    """``web.SockSite`` that closes new connections while the worker holds ``limit``."""

    __slots__ = ("_limit", "_refused", "_reported")

    def __init__(self, runner: web.BaseRunner, sock: Any, *, limit: int, **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self._limit = limit
        self._refused = 0
        self._reported = 0.0

    @property
    def refused(self) -> int:
        """Connections closed at once because the cap was reached."""
        return self._refused

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) < self._limit:
                return server()
            self._refused += 1
            now = time.monotonic()
            if now - self._reported >= LOOP_ERROR_INTERVAL_SECONDS:
                self._reported = now
                log.warning(
                    "worker holds %d connections (the cap): closing new ones (%d so far)",
                    self._limit,
                    self._refused,
                )
            return _Refused()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )


class ThrottledLoopErrors:
    """An event-loop exception handler that logs each kind of error at most once per
    ``interval``, with how many were not logged in between."""

    def __init__(self, interval: float = LOOP_ERROR_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        key = str(context.get("message", "")) + type(context.get("exception")).__name__
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > 1000:  # distinct messages are few; never grow without end
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            context = {**context, "message": f"{context.get('message')} "
                       f"({suppressed} more like it in the last {self._interval:g}s)"}
        loop.default_exception_handler(context)
