"""Per-client rate limits and a global concurrency bound for the callback routes.

    request ─ client_key ─▶ "cn:<client cert CN>" (mTLS) or "ip:<peer address>"
            ─ ClientRates.check ─▶ over its rate?        429 RATE_LIMITED
            ─ ConcurrencyGate.slot ─▶ no slot, queue full? 503 OVERLOADED
                                   ─▶ no slot within the queue timeout? 503 OVERLOADED
            ─ the handler (the decision pipeline)

Two different statuses on purpose. A client over *its own* rate is told so with
429: it alone is misbehaving, everyone else is served. A full queue is identityd
unable to answer anyone in time: 503, like every other "cannot answer" (DESIGN §2).
Both are non-200, so to the CA both are a deny: a limit never turns a deny into an
allow, it can only turn an answer into a refusal.

The bookkeeping is pure (an explicit clock, no I/O); :func:`limits_middleware` is
the aiohttp edge. Limits are per process: with ``--workers N`` a client gets N
times the rate, and each worker has its own in-flight bound and queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from identityd.callback.peer import single_cn
from identityd.errors import IdentitydError, Unavailable
from identityd.settings import LimitSettings


class RateLimited(IdentitydError):
    """One client sent more than its rate; the others are unaffected."""

    status = 429
    default_code = "RATE_LIMITED"


class Overloaded(Unavailable):
    """No decision slot could be had: the queue is full or the wait too long."""

    default_code = "OVERLOADED"


# --- pure: token buckets -------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    updated: float


class ClientRates:
    """One token bucket per client key, at most ``max_clients`` of them (LRU)."""

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        max_clients: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_second
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str) -> None:
        """Take one token for ``key``; RateLimited when its bucket is empty."""
        wait = self.take(key)
        if wait > 0:
            raise RateLimited(None, f"over {self._rate:g} requests/s, retry in {wait:.2f}s")

    def take(self, key: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            # max(): a clock that steps back must not drain the bucket.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._rate


# --- the concurrency gate --------------------------------------------------------


class ConcurrencyGate:
    """At most ``max_in_flight`` holders; at most ``max_queued`` waiting, served in
    arrival order, each for at most ``timeout`` seconds. A released slot goes
    straight to the oldest waiter, so a newcomer cannot overtake the queue."""

    def __init__(self, max_in_flight: int, max_queued: int, timeout: float) -> None:
        self._free = max_in_flight
        self._max_queued = max_queued
        self._timeout = timeout
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def free(self) -> int:
        return self._free

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; Overloaded if not possible."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self._max_queued:
            raise Overloaded(None, f"{len(self._waiters)} requests already queued")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except BaseException as exc:
            granted = waiter.done() and not waiter.cancelled()
            if granted:
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                self._discard(waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded(None, f"no decision slot within {self._timeout:g}s") from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; _free is unchanged
                return
        self._free += 1

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


# --- the edge: aiohttp -------------------------------------------------------------


@dataclass
class LimitCounters:
    """Refusals so far, by reason code (the lead may export these as metrics)."""

    refused: dict[str, int] = field(default_factory=dict)


class Limiter:
    """Everything the middleware needs, built from :class:`LimitSettings`."""

    def __init__(
        self,
        settings: LimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_refuse: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.rates = ClientRates(
            settings.rate_per_second, settings.burst, settings.max_clients, clock=clock
        )
        self.gate = ConcurrencyGate(
            settings.max_in_flight, settings.max_queued, settings.queue_timeout_seconds
        )
        self.counters = LimitCounters()
        self._on_refuse = on_refuse

    def refused(self, code: str) -> None:
        self.counters.refused[code] = self.counters.refused.get(code, 0) + 1
        if self._on_refuse is not None:
            self._on_refuse(code)

    def check_rate(self, key: str) -> None:
        try:
            self.rates.check(key)
        except RateLimited as exc:
            self.refused(exc.code)
            raise

    @asynccontextmanager
    async def decision_slot(self) -> AsyncIterator[None]:
        """Hold one of the gate's slots (Overloaded, counted, when none comes)."""
        try:
            await self.gate.acquire()
        except Overloaded as exc:
            self.refused(exc.code)
            raise
        try:
            yield
        finally:
            self.gate.release()


def client_key(peername: object, peercert: Mapping[str, Any] | None) -> str:
    """``cn:<CN>`` of a verified client certificate, else ``ip:<peer address>``.

    Never a header: X-Forwarded-For and the like are whatever the client says."""
    cn = single_cn(peercert) if peercert else None
    if cn is not None:  # several CNs: the address, never another client's bucket
        return f"cn:{cn}"
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        return f"ip:{peername[0]}"
    return "unknown"


def _request_key(request: web.Request) -> str:
    transport = request.transport
    if transport is None:
        return "unknown"
    return client_key(transport.get_extra_info("peername"), transport.get_extra_info("peercert"))


def limits_middleware(limiter: Limiter, *, gate: bool = True) -> Middleware:
    """Rate and concurrency limits on the callback routes only (probes and metrics
    are never limited). Place it inside the error middleware, which renders the
    refusals: ``middlewares=[error_middleware, limits_middleware(limiter)]``.

    With ``gate=True`` a request holds its slot from before its body is read, so
    slow-body clients (cut off after BODY_READ_TIMEOUT_SECONDS) count against
    ``max_in_flight``. With ``gate=False`` only the rate is checked here, and the
    handler is expected to hold ``limiter.decision_slot()`` around the decision."""
    paths = frozenset(limiter.settings.paths)

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in paths:
            return await handler(request)
        limiter.check_rate(_request_key(request))
        if not gate:
            return await handler(request)
        async with limiter.decision_slot():
            return await handler(request)

    return limits
