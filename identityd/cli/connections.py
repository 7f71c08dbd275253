"""What one worker lets a connection hold: a bounded number of them, none idle for long.

A connection costs a file descriptor whatever it sends. Without a bound, clients
that open connections and send nothing (or a request head a byte at a time) hold
descriptors until the process has none left, and then every legitimate client is
refused too. So:

- aiohttp's keep-alive timer closes a connection that has not completed a request
  head within ``idle_timeout`` of opening, or of its previous answer
  (``runner_options``; aiohttp's own default is an hour);
- :class:`CappedSockSite` closes a new connection at once while the worker
  already holds ``max_connections``. Its :class:`Acceptor` counts them as
  ``accept()`` returns them, not when aiohttp sees them: over TLS that is only
  after the handshake, and a connection stuck in its handshake holds a
  descriptor and asyncio's ~256 KiB TLS buffer. The handshake itself gets
  ``HANDSHAKE_TIMEOUT_SECONDS`` (asyncio's default is 60 s);
- a worker takes one new connection each time its loop finds the listening socket
  ready, and leaves it for a few milliseconds to a sibling worker that holds
  fewer (:class:`AcceptShare`), so the connections of a client's keep-alive pool,
  and with them its requests, spread evenly over the workers;
- the soft open-file limit is raised to the hard one, and the cap kept below it;
- :class:`ThrottledLoopErrors` logs a repeated event-loop error (``accept()`` out
  of descriptors repeats in a tight loop) once per interval with a count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import select
import socket
import ssl
import time
from collections.abc import Callable, MutableSequence
from typing import Any

from aiohttp import web

log = logging.getLogger("identityd.serve")

# The probe and metrics port: the kubelet and Prometheus need a few.
PROBE_MAX_CONNECTIONS = 64
# Descriptors kept for what is not a callback connection: the probe port's
# connections, the listening sockets, the API server's watches, OPA, JWKS
# fetches, log files.
RESERVED_DESCRIPTORS = PROBE_MAX_CONNECTIONS + 64
LOOP_ERROR_INTERVAL_SECONDS = 10.0
# A TLS handshake takes milliseconds; a client that needs longer is not a CA.
HANDSHAKE_TIMEOUT_SECONDS = 5.0
# Per accepted connection (the kernel doubles it for its bookkeeping): answers are a
# few KiB, /metrics tens of KiB; see Acceptor.
SEND_BUFFER_BYTES = 64 * 1024
# How long a worker holding more connections than a sibling leaves a new one to it
# (not watching the socket for a pause at a time), and how long it then takes them
# itself when the sibling did not (busy evaluating, or stuck).
DEFER_SECONDS = 0.005
PAUSE_SECONDS = 0.001
TAKE_ALL_SECONDS = 1.0
# A slot of a worker that is not serving: left out of the comparison.
NOT_SERVING = -1


class AcceptShare:
    """The number of connections each worker on one listening socket holds, in
    memory the workers share (the supervisor's ``multiprocessing.RawArray``); this
    worker writes its own slot and reads the others.

    A kernel wakes every worker for a new connection and the first to call
    ``accept()`` gets it, so without this the split follows who woke first, not
    who has room (bench/load.py: 45 against 19 connections of a 64-connection
    pool, one worker at 88 % CPU and the other at 54 %). A worker ahead of a
    sibling leaves a pending connection to it for ``DEFER_SECONDS``; a sibling that
    does not take it in that time (evaluating, or wedged until the watchdog ends
    it) is not waited for again for ``TAKE_ALL_SECONDS``, so no connection waits
    long whatever the others do.
    """

    def __init__(
        self,
        counts: MutableSequence[int],
        index: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= index < len(counts):
            raise ValueError(f"index: {index} is not a slot of {len(counts)}")
        self._counts = counts
        self._index = index
        self._clock = clock
        # When this worker began leaving the pending connection(s) to a sibling;
        # None when it is not.
        self._deferring_since: float | None = None
        self._take_all_until = float("-inf")

    def publish(self, held: int) -> None:
        self._counts[self._index] = held

    def leave(self) -> None:
        """This worker no longer accepts (it stops): siblings stop comparing with it."""
        self._counts[self._index] = NOT_SERVING

    def defer(self, held: int) -> bool:
        """Whether to leave the pending connection to a sibling, ``held`` being
        the connections this worker has open (published here)."""
        self._counts[self._index] = held
        fewest = min(
            (c for i, c in enumerate(self._counts) if i != self._index and c != NOT_SERVING),
            default=held,
        )
        now = self._clock()
        if held <= fewest or now < self._take_all_until:
            self._deferring_since = None
            return False
        # The wait lasts until nothing is pending (``settled``), however late the
        # loop comes back: measured between calls, a loop turning slower than
        # DEFER_SECONDS (decisions in line) began a new wait at each call and never
        # took a connection a stopped sibling left.
        if self._deferring_since is None:
            self._deferring_since = now
        if now - self._deferring_since < DEFER_SECONDS:
            return True
        self._deferring_since = None
        self._take_all_until = now + TAKE_ALL_SECONDS
        return False

    def settled(self) -> None:
        """Nothing is pending any more (a sibling took it): the next is a new wait."""
        self._deferring_since = None


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


class Acceptor:
    """Takes connections off a worker's copy of a listening socket and hands each to
    asyncio (``loop.connect_accepted_socket``, which does the TLS handshake):

    - one per readiness of the socket: asyncio's own server takes up to the backlog
      (100) each time, so the worker that woke first got a whole burst;
    - none while ``limit`` are open, whatever stage (TLS handshake, request,
      keep-alive) they are in: the oldest still in its TLS handshake makes room
      (a client without a certificate can hold a handshake for its 5 s, so ~100
      connects a second would otherwise keep every slot from the CA), else the
      new one is closed at once;
    - none with a large send buffer: ``SO_SNDBUF`` of ``SEND_BUFFER_BYTES``. Linux
      grows a socket's send buffer to 4 MiB, charged to the pod's memory: a client
      that pipelines requests and reads the answers a byte at a time held ~0.8 MiB
      of kernel memory per connection, up to 4 MiB, so a full cap could take the
      pod over its memory limit. Answers are a few KiB;
    - none that stalls: ``TCP_USER_TIMEOUT`` (``stall_timeout``) ends a connection
      whose sent data stays unacknowledged, or whose reader keeps its window shut,
      that long; aiohttp has no write timeout, so a client that pipelines requests
      and never reads the answers held its connection for good;
    - none while a sibling worker holds fewer (``share``): the socket is not
      watched for ``PAUSE_SECONDS`` at a time, up to ``DEFER_SECONDS``, and the
      sibling, woken by the same readiness, takes it.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        limit: int,
        tls: Callable[[], ssl.SSLContext] | None = None,
        share: AcceptShare | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        # Our own descriptor: closing it at stop leaves the caller's socket open.
        self._sock = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)
        self._factory = protocol_factory
        self.limit = limit
        self._tls = tls  # the context for the next connection (TLSFiles.context)
        self.share = share
        self._stall_ms = int(stall_timeout * 1000) if stall_timeout else 0
        self.refused = 0
        self.evicted = 0
        self._open: list[socket.socket] = []
        # Connections being handed over (in their TLS handshake), oldest first.
        self._handshakes: dict[socket.socket, asyncio.Task[None]] = {}
        # Made in a running loop (a site's start): every call comes back on it.
        self._loop = asyncio.get_running_loop()
        self._started = False
        self._resume: asyncio.TimerHandle | None = None
        self._reported = float("-inf")

    def start(self) -> None:
        self._started = True
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        if self.share is not None:
            self.share.publish(0)

    def stop(self) -> None:
        """Stop accepting (open connections are the server's to close)."""
        if self.share is not None:
            self.share.leave()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        elif self._started and self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
        for task in self._handshakes.values():
            task.cancel()
        self._sock.close()

    def held(self) -> int:
        """Connections accepted and still open (asyncio closes each socket object
        when its connection ends)."""
        self._open = [c for c in self._open if c.fileno() != -1]
        return len(self._open)

    def _on_readable(self) -> None:
        held = self.held()
        if self.share is not None and self.share.defer(held):
            self._pause(PAUSE_SECONDS)
            return
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # a sibling took it, or the client left
        except OSError as exc:
            # Out of descriptors or buffers: asyncio's own server waits a second.
            self._loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": exc}
            )
            self._pause(1.0)
            return
        if held >= self.limit:
            if not self._evict_a_handshake():
                conn.close()
                self.refused += 1
                self._report("closing new ones")
                return
            self.evicted += 1
            self._report("closing the oldest still in its TLS handshake")
            held -= 1
        conn.setblocking(False)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        if self._stall_ms and conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self._stall_ms)
        self._open.append(conn)
        if self.share is not None:
            self.share.publish(held + 1)
        task = self._loop.create_task(self._hand_over(conn))
        self._handshakes[conn] = task
        task.add_done_callback(lambda _: self._handshakes.pop(conn, None))

    def _evict_a_handshake(self) -> bool:
        """Make room by ending the oldest connection still in its handshake."""
        for conn, task in self._handshakes.items():
            if task.done():
                continue
            task.cancel()  # its transport closes the socket
            del self._handshakes[conn]
            self._open.remove(conn)
            return True
        return False

    async def _hand_over(self, conn: socket.socket) -> None:
        context = self._tls() if self._tls is not None else None
        try:
            await self._loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS if context else None,
            )
        # A failed or timed-out handshake, or a client gone before it: its own
        # business, as in asyncio's server; the connection is closed.
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            # Its traceback holds asyncio's frames, whose waiter holds it: a cycle
            # keeping the SSLProtocol and its 256 KiB buffer until a full collection
            # (hundreds of MiB under a flood of aborted handshakes).
            exc.__traceback__ = None
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise

    def _pause(self, seconds: float) -> None:
        if self._resume is not None:
            return
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(seconds, self._watch_again)

    def _watch_again(self) -> None:
        self._resume = None
        if self._sock.fileno() == -1:
            return
        if self.share is not None and not _readable(self._sock):
            self.share.settled()  # a sibling took what was pending
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _report(self, action: str) -> None:
        now = time.monotonic()
        if now - self._reported >= LOOP_ERROR_INTERVAL_SECONDS:
            self._reported = now
            log.warning(
                "%d connections open on %s (the cap): %s (%d refused, %d evicted so far)",
                self.limit,
                self._sock.getsockname(),
                action,
                self.refused,
                self.evicted,
            )


def _readable(sock: socket.socket) -> bool:
    """Whether a connection is pending on listening ``sock`` (poll: select() cannot
    watch a descriptor above 1023)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class CappedSockSite(web.BaseSite):
    """An aiohttp site on an already-bound socket, accepting through an
    :class:`Acceptor` (``web.SockSite`` hands the socket to asyncio's server)."""

    __slots__ = ("_acceptor", "_limit", "_share", "_sock", "_stall_timeout", "_tls")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        limit: int,
        share: AcceptShare | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tls: Callable[[], ssl.SSLContext] | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        """``tls``: the context for each new connection, when it can change
        (identityd/cli/tls_reload.py); else ``ssl_context`` throughout."""
        super().__init__(runner, ssl_context=ssl_context)
        self._sock, self._limit, self._share = sock, limit, share
        self._stall_timeout = stall_timeout
        if tls is None and ssl_context is not None:
            tls = lambda: ssl_context  # noqa: E731
        self._tls = tls
        self._acceptor: Acceptor | None = None

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    @property
    def acceptor(self) -> Acceptor | None:
        return self._acceptor

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        self._acceptor = Acceptor(
            self._sock,
            server,
            limit=self._limit,
            tls=self._tls,
            share=self._share,
            stall_timeout=self._stall_timeout,
        )
        self._acceptor.start()

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop()
        await super().stop()


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
