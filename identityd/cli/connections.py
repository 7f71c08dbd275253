"""What one worker lets a connection hold: a bounded number of them, none idle for long.

A connection costs a file descriptor whatever it sends. Without a bound, clients
that open connections and send nothing (or a request head a byte at a time) hold
descriptors until the process has none left, and then every legitimate client is
refused too. So:

- aiohttp's keep-alive timer closes a connection that has not completed a request
  head within ``idle_timeout`` of opening, or of its previous answer
  (``runner_options``; aiohttp's own default is an hour);
- :class:`CappedSockSite` closes a new connection at once while the worker
  already holds ``max_connections``. They are counted as ``accept()`` returns
  them (:class:`CountingListener`), not when aiohttp sees them: over TLS that is
  only after the handshake, and a connection stuck in its handshake holds a
  descriptor and asyncio's ~256 KiB TLS buffer. The handshake itself gets
  ``HANDSHAKE_TIMEOUT_SECONDS`` (asyncio's default is 60 s);
- a worker takes one new connection each time its loop finds the listening socket
  ready (:class:`CountingListener`), so a burst of connections spreads over the
  workers sharing the socket instead of going to whichever woke first;
- the soft open-file limit is raised to the hard one, and the cap kept below it;
- :class:`ThrottledLoopErrors` logs a repeated event-loop error (``accept()`` out
  of descriptors repeats in a tight loop) once per interval with a count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("identityd.serve")

# Descriptors kept for what is not a callback connection: the listening and probe
# sockets, the API server's watches, OPA, JWKS fetches, log files.
RESERVED_DESCRIPTORS = 64
LOOP_ERROR_INTERVAL_SECONDS = 10.0
# A TLS handshake takes milliseconds; a client that needs longer is not a CA.
HANDSHAKE_TIMEOUT_SECONDS = 5.0
# The probe and metrics port: the kubelet and Prometheus need a few.
PROBE_MAX_CONNECTIONS = 64


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


class CountingListener(socket.socket):
    """A listening socket (a duplicate of ``sock``'s descriptor) whose ``accept()``
    counts the accepted connections still open and closes a new one at once while
    ``limit`` are, whatever stage (TLS handshake, request, keep-alive) they are in.

    It also hands asyncio one connection per round. asyncio accepts up to the
    backlog (100) in a loop each time the socket is ready, so the worker that
    wakes first takes a whole burst; a CA opens its keep-alive pool in a burst and
    then spreads requests evenly over it, so one worker got most of the load
    (bench/load.py: 90 % CPU against 52 %). One per round (nginx's default,
    ``multi_accept off``) leaves the rest to the sibling workers, all woken by
    the same readiness, and a worker busy evaluating comes back for more later.
    """

    def __init__(self, sock: socket.socket, limit: int) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        self.setblocking(False)
        self.limit = limit
        self.refused = 0
        self._open: list[socket.socket] = []
        self._reported = float("-inf")
        self._took_one = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._took_one:
            # The round's second call: end it (asyncio's loop stops on this) and
            # let the next readiness, here or in a sibling worker, take the next.
            self._took_one = False
            raise BlockingIOError
        conn, address = super().accept()
        # asyncio closes each connection's socket object when the connection ends.
        self._open = [c for c in self._open if c.fileno() != -1]
        if len(self._open) >= self.limit:
            conn.close()
            self._over_limit()
            # asyncio ends this round of accepts on it and waits for the next.
            raise ConnectionAbortedError
        self._open.append(conn)
        self._took_one = True
        return conn, address

    def _over_limit(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._reported >= LOOP_ERROR_INTERVAL_SECONDS:
            self._reported = now
            log.warning(
                "%d connections open on %s (the cap): closing new ones (%d so far)",
                self.limit,
                self.getsockname(),
                self.refused,
            )


class CappedSockSite(web.SockSite):
    """``web.SockSite`` on a :class:`CountingListener`, with a bounded TLS handshake."""

    __slots__ = ("_listener",)

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, limit: int, **kwargs: Any):
        listener = CountingListener(sock, limit)
        super().__init__(runner, listener, **kwargs)
        self._listener = listener

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            server,
            sock=self._listener,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS if self._ssl_context else None,
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
