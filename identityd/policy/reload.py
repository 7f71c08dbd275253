"""Hot reload: watch a policy source and load every new set into the engine.

A :class:`PolicySource` gives the whole current set (``{module_id: rego_source}``);
the reloader polls it, and when the content differs from the last set it tried,
hands the new set to ``engine.load``. Each engine keeps its old set when the new
one fails to compile, so a broken edit never replaces a working policy; the
failure is logged, counted and reported through the status callback
``(module_ids, ok, error)`` (the ConfigMap source turns it into the kube-mgmt
status annotation). A set that failed is not tried again until it changes. When
the engine cannot be reached (OPA down), nothing is reported and the same set is
tried again on the next round.

Change detection hashes the content, not file times: a ConfigMap volume swaps a
``..data`` symlink and editors may keep mtimes, and reading a few small files
every few seconds costs nothing.

A source that knows when it changes (the ConfigMap watch) implements
:class:`ObservedSource`: the reloader subscribes :meth:`PolicyReloader.trigger` to it,
so a change is loaded at once rather than at the next poll, and hands it the
:class:`ReloadResult` of every load attempt (the source holds back a ConfigMap that
broke the set and writes each ConfigMap's status from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from identityd.errors import ConfigError, PolicyCompileError, PolicyUnavailable
from identityd.metrics import Metrics
from identityd.policy.base import PolicyEngine
from identityd.policy.sources import load_policy_dir

__all__ = [
    "DEFAULT_RELOAD_INTERVAL_SECONDS",
    "DirectorySource",
    "ObservedSource",
    "PolicyReloader",
    "PolicySource",
    "ReloadOutcome",
    "ReloadResult",
    "StatusCallback",
]

log = logging.getLogger(__name__)

# How often the source is polled. An edit is in force at most this long after
# it is saved; each round reads the source once.
DEFAULT_RELOAD_INTERVAL_SECONDS = 2.0
# After a trigger, wait this long before the round, so a burst of changes (kubectl
# apply of several ConfigMaps) is loaded as one set rather than one round each.
TRIGGER_SETTLE_SECONDS = 0.05
# settle(): at most this many rounds in a row (each a change the source asked for).
DEFAULT_SETTLE_ROUNDS = 16

# (module_ids, ok, error): the set that was tried, whether it is now in force, and
# why not ("<module_id>: <message>" when a module is to blame).
StatusCallback = Callable[[tuple[str, ...], bool, str | None], Awaitable[None] | None]


class PolicySource(Protocol):
    """Where a policy set comes from: the whole set, each time it is asked."""

    @property
    def name(self) -> str:
        """For logs: the directory, the ConfigMap selector, ..."""
        ...

    async def snapshot(self) -> dict[str, str]:
        """The current ``{module_id: rego_source}``; ConfigError when unreadable or empty."""
        ...


@runtime_checkable
class ObservedSource(PolicySource, Protocol):
    """A source that says when it changed and hears how each load attempt went."""

    def subscribe(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` (cheap, synchronous) whenever the set may have changed."""
        ...

    async def observe(self, result: ReloadResult) -> None:
        """The result of a round that tried the last snapshot (LOADED or REJECTED), or
        found it unusable (UNAVAILABLE, SOURCE_ERROR). Not called for UNCHANGED."""
        ...


class DirectorySource:
    """The ``*.rego`` files under a directory (see ``load_policy_dir``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    @property
    def name(self) -> str:
        return str(self._path)

    async def snapshot(self) -> dict[str, str]:
        return await asyncio.to_thread(load_policy_dir, self._path)


class ReloadOutcome(enum.StrEnum):
    LOADED = "loaded"  # a new set is in force
    UNCHANGED = "unchanged"  # same content as the last set tried; nothing done
    REJECTED = "rejected"  # the new set does not compile; the old one stays
    UNAVAILABLE = "unavailable"  # the engine cannot be reached; tried again next round
    SOURCE_ERROR = "source_error"  # the source cannot be read (or is empty)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: ReloadOutcome
    module_ids: tuple[str, ...] = ()
    error: str | None = None
    module: str | None = None  # the module a rejection names, when it names one

    @property
    def ok(self) -> bool:
        return self.outcome in (ReloadOutcome.LOADED, ReloadOutcome.UNCHANGED)


class PolicyReloader:
    """Polls ``source`` every ``interval`` seconds and loads changes into ``engine``.

    :meth:`reload_once` is one round (the initial load at start-up, and the test
    hook); :meth:`start` runs rounds in the background until :meth:`aclose`, one
    every ``interval`` and one soon after each :meth:`trigger`.
    """

    def __init__(
        self,
        source: PolicySource,
        engine: PolicyEngine,
        *,
        interval: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
        on_status: StatusCallback | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise TypeError(
                f"interval: expected seconds as a number, got {type(interval).__name__}"
            )
        if not interval > 0:
            raise ValueError(f"interval: must be positive, got {interval!r}")
        self._source = source
        self._engine = engine
        self._interval = float(interval)
        self._on_status = on_status
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._tried: str | None = None  # digest of the last set loaded or rejected
        self._source_error: str | None = None  # the last one reported
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set by trigger(): a round is wanted now
        self._observer = source if isinstance(source, ObservedSource) else None
        if self._observer is not None:
            self._observer.subscribe(self.trigger)
        self.loaded = 0
        self.rejected = 0
        self.last: ReloadResult | None = None

    async def reload_once(self) -> ReloadResult:
        """Read the source; if it changed, load it. Never raises for a bad policy."""
        async with self._lock:
            result = await self._round()
            self.last = result
            # Inside the lock: the source pairs the result with the snapshot it gave.
            if self._observer is not None and result.outcome is not ReloadOutcome.UNCHANGED:
                await self._observe(self._observer, result)
        return result

    def trigger(self) -> None:
        """Ask for a round now (the background loop runs it within a moment)."""
        self._wake.set()

    async def settle(self, max_rounds: int = DEFAULT_SETTLE_ROUNDS) -> ReloadResult:
        """Rounds until the source stops asking for another, at most ``max_rounds``.

        For start-up with an observed source: a ConfigMap that breaks the set is held
        back by the source, which asks for a round without it."""
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"max_rounds: expected a positive integer, got {max_rounds!r}")
        self._wake.clear()
        result = await self.reload_once()
        for _ in range(max_rounds - 1):
            if not self._wake.is_set():
                break
            self._wake.clear()
            result = await self.reload_once()
        return result

    async def start(self) -> None:
        """Poll in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="identityd-policy-reload")
            self._task.add_done_callback(_log_failure)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> PolicyReloader:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            if self._wake.is_set():
                await asyncio.sleep(TRIGGER_SETTLE_SECONDS)
            self._wake.clear()  # before the round: a change during it asks for another
            await self.reload_once()

    async def _round(self) -> ReloadResult:
        try:
            modules = await self._source.snapshot()
        except ConfigError as exc:
            return await self._source_failed(exc)
        self._source_error = None
        ids = tuple(modules)
        digest = _digest(modules)
        if digest == self._tried:
            return ReloadResult(ReloadOutcome.UNCHANGED, ids)
        try:
            await self._engine.load(modules)
        except PolicyCompileError as exc:
            self._tried = digest
            self.rejected += 1
            self._count("error")
            log.warning(
                "policy set from %s rejected, the previous one stays: %s",
                self._source.name,
                exc.detail,
            )
            await self._report(ids, False, exc.detail)
            return ReloadResult(ReloadOutcome.REJECTED, ids, exc.detail, exc.module)
        except PolicyUnavailable as exc:
            self._count("unavailable")
            log.warning("policy set from %s not loaded, will retry: %s", self._source.name, exc)
            return ReloadResult(ReloadOutcome.UNAVAILABLE, ids, str(exc))
        self._tried = digest
        self.loaded += 1
        self._count("ok")
        log.info("policy set from %s loaded: %d modules", self._source.name, len(ids))
        await self._report(ids, True, None)
        return ReloadResult(ReloadOutcome.LOADED, ids)

    async def _source_failed(self, exc: ConfigError) -> ReloadResult:
        error = str(exc)
        if error != self._source_error:  # once per distinct error, not every round
            self._source_error = error
            self._count("error")
            log.warning(
                "policy source %s unreadable, the current set stays: %s", self._source.name, error
            )
            await self._report((), False, error)
        return ReloadResult(ReloadOutcome.SOURCE_ERROR, (), error)

    async def _report(self, ids: tuple[str, ...], ok: bool, error: str | None) -> None:
        if self._on_status is None:
            return
        # The callback is an edge (it writes ConfigMaps): its failure must not stop reloads.
        try:
            outcome = self._on_status(ids, ok, error)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception("policy status callback failed")

    async def _observe(self, observer: ObservedSource, result: ReloadResult) -> None:
        # The source's bookkeeping is an edge too (status writes): never stop reloads.
        try:
            await observer.observe(result)
        except Exception:
            log.exception("policy source %s failed to take the result", observer.name)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.policy_loads.labels(result=result).inc()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("policy reloading stopped", exc_info=task.exception())


def _digest(modules: Mapping[str, str]) -> str:
    text = json.dumps(sorted(modules.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
