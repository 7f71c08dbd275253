"""A PodInventory kept by a list+watch of pods (DESIGN §5, STYLE "The watch").

Per watched scope (all namespaces, or each configured namespace) one loop:

    list (paged)  ──replace_all──▶ synced ──▶ watch from the list's resourceVersion
      ▲                                        │ ADDED/MODIFIED upsert, DELETED remove,
      │ 410 Gone, or resync due                │ BOOKMARK only moves the resourceVersion
      └────────────────────────────────────────┘ stream end → watch again from the last RV;
                                                  error → backoff with jitter, then again

Each watch asks the server to end it (``timeoutSeconds``) before our inactivity
timeout would call it dead: the API server sends bookmarks only above the watch's
starting resourceVersion, so on a quiet cluster a healthy watch can carry no byte
for many minutes. Any exception, expected or not, is logged and retried with
backoff: the loop only ends when it is cancelled.

Fail closed: ``ready`` is False until every scope has listed once, and again
while a scope's watch has been down longer than ``staleness_seconds``; lookups
then raise InventoryUnavailable (503), never answer from stale data. A reconnect
ends an outage only if its stream then delivers something or ends cleanly: one
that fails before its first event (the same bad event every time) does not.

A pod the token names can be ahead of the watch: :meth:`WatchInventory.get`
reads through with one GET on a miss, or when the cached pod of that name has
another uid than the caller's (a pod recreated under its name); coalesced per
name, a few at a time, answers reused briefly. The answer enters the cache, and
a cached uid it shows gone leaves it.

Testable in one step: :meth:`WatchInventory.step` runs one iteration of every
scope's loop (a list, or one watch stream until it ends) without background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Self

from prometheus_client import CollectorRegistry, Counter, Gauge

from identityd.errors import InventoryUnavailable
from identityd.inventory.base import PodRecord
from identityd.inventory.store import DEFAULT_ANNOTATION_KEYS, PodStore, RecordBuilder
from identityd.kubeapi import (
    KubeAPIError,
    KubeConnection,
    PodsAPI,
    check_watch_timeout,
    watch_timeout,
)

log = logging.getLogger(__name__)

# A watch that ends cleanly sooner than this without delivering anything counts as
# a failure (backoff), so a server that closes every stream at once is not hammered.
_MIN_HEALTHY_WATCH_SECONDS = 1.0
# Read-through answers remembered at most this many names (then expired ones go).
_RECENT_LIMIT = 4096


@dataclass(frozen=True)
class WatchSettings:
    """Bounds of the pod watch. Defaults suit a cluster of ~100k pods."""

    # Namespaces to watch, one list+watch each; empty = all namespaces, one list+watch.
    namespaces: tuple[str, ...] = ()
    # Only pods matching this label selector (API-server syntax); None = all pods.
    label_selector: str | None = None
    # Pods per list page: bounds the memory of one response (~1-2 MB at 500).
    page_size: int = 500
    # One list page or one read-through GET during a relist.
    request_timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0
    # timeoutSeconds asked of the server per watch, randomised from this up to 2x but
    # below 5/6 of the inactivity timeout (60-100 s by default; client-go randomises
    # too), so many replicas do not reconnect in step and a healthy server always
    # ends a quiet stream before it would count as dead.
    watch_timeout_seconds: float = 60.0
    # No byte on an open watch for this long = a dead stream (a half-open TCP
    # connection never errors). Bookmarks cannot be relied on to keep it alive: the
    # API server sends them only above the watch's starting resourceVersion.
    inactivity_timeout_seconds: float = 120.0
    # A watch down longer than this makes the inventory not ready (503): a pod
    # deleted meanwhile would otherwise stay allowed for as long as the outage.
    staleness_seconds: float = 60.0
    # Full relist this often (randomised +10%) to repair any drift the watch
    # missed; 0 = never. Each costs one paged list of every pod.
    resync_seconds: float = 1800.0
    # Reconnect backoff: initial * 2^(failures-1), capped, with equal jitter.
    backoff_initial_seconds: float = 0.5
    # Capped low on purpose: callbacks get 503 while the watch is down, so being back
    # within a second of the API server matters more than sparing it one retry a second.
    backoff_max_seconds: float = 1.0
    # The GET of a pod missing from the cache (a callback waits for it).
    read_through_timeout_seconds: float = 2.0
    # At most this many read-through GETs at a time (others wait, within the timeout).
    read_through_concurrency: int = 4
    # A read-through answer (found or 404) is reused for the same name this long,
    # so a replayed token of a deleted pod costs one GET per window, not per request.
    read_through_cache_seconds: float = 2.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or item.name in ("namespaces", "label_selector"):
                continue
            if not isinstance(value, int | float):
                raise TypeError(f"{item.name}: expected a number, got {type(value).__name__}")
            allow_zero = item.name == "resync_seconds"
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"{item.name}: expected a positive number, got {value!r}")
        if isinstance(self.namespaces, str) or not all(
            isinstance(ns, str) and ns for ns in self.namespaces
        ):
            raise ValueError(f"namespaces: expected a tuple of names, got {self.namespaces!r}")
        if self.label_selector is not None and not isinstance(self.label_selector, str):
            raise TypeError("label_selector: expected str or None")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds: must not be below backoff_initial_seconds")
        check_watch_timeout(self.watch_timeout_seconds, self.inactivity_timeout_seconds)


class WatchMetrics:
    """The watch's Prometheus metrics, on the registry given (the app's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter(
            "identityd_inventory_events_total",
            "Pod watch events applied, by type.",
            ["type"],
            registry=r,
        )
        self.relists = Counter(
            "identityd_inventory_relists_total",
            "Full pod lists, by reason (initial, expired = 410 Gone, resync = periodic).",
            ["reason"],
            registry=r,
        )
        self.resync_repairs = Counter(
            "identityd_inventory_resync_repairs_total",
            "Pod records a periodic resync found missing, extra or different: drift the "
            "watch missed.",
            registry=r,
        )
        self.watch_restarts = Counter(
            "identityd_inventory_watch_restarts_total",
            "Pod watch streams ended, by reason (timeout = server ended it, resync, "
            "inactive, expired = 410, error).",
            ["reason"],
            registry=r,
        )
        self.last_event = Gauge(
            "identityd_inventory_last_event_timestamp_seconds",
            "Unix time of the last pod watch event or bookmark (time since = now - this).",
            multiprocess_mode="max",
            registry=r,
        )
        self.read_through = Counter(
            "identityd_inventory_read_through_total",
            "Cache misses read through to the API server, by result (hit = pod found, "
            "miss = not found, error = failed or timed out).",
            ["result"],
            registry=r,
        )


class _Shard:
    """One list+watch: every namespace (``namespace`` None) or one."""

    __slots__ = (
        "down_since",
        "expired_in_row",
        "failures",
        "namespace",
        "next_resync",
        "rv",
        "store",
        "synced",
    )

    def __init__(self, namespace: str | None) -> None:
        self.namespace = namespace
        self.store = PodStore()
        self.rv: str | None = None  # None: a list is needed
        self.synced = False
        self.down_since: float | None = None  # clock time the watch went down
        self.failures = 0  # failed attempts since the last success
        self.expired_in_row = 0  # watches refused with 410 since one last delivered
        self.next_resync = 0.0

    @property
    def scope(self) -> str:
        return self.namespace or "*"


@dataclass
class _Flight:
    """One in-flight read-through; uids deleted by the watch meanwhile are not inserted,
    nor is anything once a relist has swapped the cache meanwhile (it may be newer)."""

    deleted: set[str] = field(default_factory=set)
    relisted: bool = False
    task: asyncio.Task[PodRecord | None] | None = None


EventObserver = Callable[[str, PodRecord | None], None]


class WatchInventory:
    """The cluster's pods, kept by list+watch. Start with ``async with`` or :meth:`start`.

    ``observer(event_type, record)`` is called after each applied watch event
    (record None for DELETED and BOOKMARK): for benchmarks and tests."""

    def __init__(
        self,
        connection: KubeConnection,
        settings: WatchSettings | None = None,
        *,
        annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS,
        metrics: WatchMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        observer: EventObserver | None = None,
    ) -> None:
        if not isinstance(connection, KubeConnection):
            raise TypeError(f"connection: expected KubeConnection, got {type(connection).__name__}")
        self._connection = connection
        self._settings = settings = settings if settings is not None else WatchSettings()
        # One builder for every list, event and read-through: equal label sets shared.
        self._build = RecordBuilder(annotation_keys)
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._observer = observer
        namespaces = tuple(dict.fromkeys(settings.namespaces)) or (None,)
        self._shards = {ns: _Shard(ns) for ns in namespaces}
        self._api: PodsAPI | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._recent: dict[tuple[str, str], tuple[float, PodRecord | None]] = {}
        self._read_slots = asyncio.Semaphore(settings.read_through_concurrency)
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Build the API client (no background work); :meth:`step` needs only this."""
        if self._closed:
            raise RuntimeError("this WatchInventory is closed")
        if self._api is None:
            self._api = await PodsAPI.connect(self._connection)

    async def start(self) -> None:
        """Open, then run every scope's loop in the background until :meth:`aclose`."""
        await self.open()
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(shard), name=f"pod-watch {shard.scope}")
                for shard in self._shards.values()
            ]
            for task in self._tasks:
                task.add_done_callback(_log_crash)

    async def aclose(self) -> None:
        self._closed = True
        pending = [*self._tasks, *(f.task for f in self._flights.values() if f.task)]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_synced(self) -> None:
        """Return once every scope has listed (wrap in ``asyncio.timeout`` to bound it)."""
        while not all(shard.synced for shard in self._shards.values()):
            self._raise_if_crashed()
            await asyncio.sleep(0.01)

    async def step(self) -> None:
        """One iteration of every scope's loop: a list, or one watch stream until it
        ends (then the backoff, after a failure). The loop's body, for tests."""
        await self.open()
        await asyncio.gather(*(self._step(shard) for shard in self._shards.values()))

    # -- PodInventory -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._unready_reason() is None

    def size(self) -> int:
        return sum(len(shard.store) for shard in self._shards.values())

    @property
    def resource_versions(self) -> dict[str | None, str | None]:
        """Each scope's last seen resourceVersion (None before its first list)."""
        return {ns: shard.rv for ns, shard in self._shards.items()}

    async def get_by_uid(self, uid: str) -> PodRecord | None:
        """From the cache only (the API cannot GET by uid); the caller then tries
        :meth:`get` by the token's namespace/name, which reads through."""
        self._check_ready()
        for shard in self._shards.values():
            record = shard.store.get_by_uid(uid)
            if record is not None:
                return record
        return None

    async def get(self, namespace: str, name: str, *, uid: str | None = None) -> PodRecord | None:
        """The pod named so; on a cache miss, one GET of it (the answer enters the cache).

        ``uid``, when given, is the uid the caller expects: a cached pod of that
        name with another uid is then read through too (a pod recreated under its
        name, ahead of the watch). None for a 404 or a namespace not watched;
        InventoryUnavailable when not ready or the GET fails or times out."""
        self._check_ready()
        shard = self._shard_for(namespace)
        if shard is None:
            return None
        record = shard.store.get(namespace, name)
        if record is not None and (uid is None or record.uid == uid):
            return record
        return await self._read_through(shard, namespace, name)

    # -- readiness ----------------------------------------------------------------------------

    def _unready_reason(self) -> tuple[str, str] | None:
        if self._closed:
            return "INVENTORY_UNAVAILABLE", "pod inventory closed"
        if any(task.done() for task in self._tasks):
            return "INVENTORY_UNAVAILABLE", "pod watch stopped"
        now = self._clock()
        for shard in self._shards.values():
            if not shard.synced:
                return "INVENTORY_UNAVAILABLE", f"pods in {shard.scope} not listed yet"
            if shard.down_since is not None and (
                now - shard.down_since > self._settings.staleness_seconds
            ):
                return "INVENTORY_STALE", (
                    f"pod watch in {shard.scope} down for {now - shard.down_since:.0f}s"
                )
        return None

    def _check_ready(self) -> None:
        reason = self._unready_reason()
        if reason is not None:
            raise InventoryUnavailable(*reason)

    def _raise_if_crashed(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise InventoryUnavailable(
                    "INVENTORY_UNAVAILABLE", "pod watch stopped"
                ) from task.exception()

    def _mark_down(self, shard: _Shard, since: float | None = None) -> None:
        if shard.down_since is None:
            shard.down_since = since if since is not None else self._clock()

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self, shard: _Shard) -> None:
        while True:
            await self._step(shard)

    async def _step(self, shard: _Shard) -> None:
        try:
            if shard.rv is None or self._resync_due(shard):
                await self._relist(shard)
            else:
                await self._watch(shard)
            return
        except KubeAPIError as exc:
            if exc.expired and shard.rv is not None:
                # 410 on the watch: our resourceVersion is gone; list again, at once the
                # first time, with backoff if even a fresh list's version is refused.
                log.info(
                    "pod watch %s: resourceVersion %s expired; relisting", shard.scope, shard.rv
                )
                shard.rv = None
                shard.expired_in_row += 1
                if shard.expired_in_row == 1:
                    return
                delay = self._backoff(shard.expired_in_row - 1)
                await asyncio.sleep(delay)
                return
            shard.failures += 1
            self._mark_down(shard)
            delay = self._backoff(shard.failures)
            log.warning(
                "pod watch %s: %s (failure %d; retry in %.2fs)",
                shard.scope,
                exc,
                shard.failures,
                delay,
            )
        except Exception:  # the loop must outlive a bug; readiness fails closed meanwhile
            # Not a KubeAPIError: a bug here or an error the edge does not know. Ending
            # the loop would leave the cache frozen for good; retrying with backoff lets
            # readiness fail closed (stale) while it lasts, and recover when it passes.
            shard.failures += 1
            self._mark_down(shard)
            delay = self._backoff(shard.failures)
            log.exception(
                "pod watch %s: unexpected error (failure %d; retry in %.2fs)",
                shard.scope,
                shard.failures,
                delay,
            )
        await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        s = self._settings
        ceiling = min(s.backoff_max_seconds, s.backoff_initial_seconds * 2 ** (failures - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def _resync_due(self, shard: _Shard) -> bool:
        return bool(self._settings.resync_seconds) and self._clock() >= shard.next_resync

    async def _relist(self, shard: _Shard) -> None:
        s = self._settings
        reason = "initial" if not shard.synced else ("expired" if shard.rv is None else "resync")
        api = self._require_api()
        # An expired continue token restarts the paged list (list_all), never an
        # unpaged list of every pod.
        records, rv = await api.list_all(
            shard.namespace,
            self._build,
            limit=s.page_size,
            label_selector=s.label_selector,
            request_timeout=s.request_timeout_seconds,
        )
        if reason == "resync" and self._metrics is not None:
            self._metrics.resync_repairs.inc(_drift(shard.store, records))
        shard.store.replace_all(records)
        for flight in self._flights.values():
            flight.relisted = True
        shard.rv = rv
        shard.synced = True
        shard.down_since = None
        shard.failures = 0
        if s.resync_seconds:
            shard.next_resync = self._clock() + s.resync_seconds * (1 + 0.1 * self._rng.random())
        if self._metrics is not None:
            self._metrics.relists.labels(reason=reason).inc()
        log.info(
            "pod list %s (%s): %d pods at resourceVersion %s", shard.scope, reason, len(records), rv
        )

    async def _watch(self, shard: _Shard) -> None:
        api = self._require_api()
        s = self._settings
        timeout = watch_timeout(
            s.watch_timeout_seconds, s.inactivity_timeout_seconds, self._rng.random()
        )
        until_resync = None
        if s.resync_seconds:
            until_resync = max(0.0, shard.next_resync - self._clock())
            timeout = min(timeout, until_resync)
        stream = await api.watch(
            shard.namespace,
            resource_version=shard.rv or "",
            label_selector=s.label_selector,
            timeout_seconds=max(1, int(timeout)),
            connect_timeout=s.connect_timeout_seconds,
            inactivity_timeout=s.inactivity_timeout_seconds,
        )
        if shard.down_since is not None and (
            self._clock() - shard.down_since > s.staleness_seconds
        ):
            # Past the bound the cache is untrusted, and this stream would replay the
            # outage's events while lookups already answer from it: relist instead.
            stream.close()
            shard.rv = None
            return
        # Connected from our resourceVersion within the bound: up again, unless this
        # stream fails before it delivers anything (below).
        was_down, shard.down_since = shard.down_since, None
        opened = last_data = self._clock()
        received = 0
        reason = "error"
        try:
            # The server ends the stream at timeoutSeconds (whole seconds); end it here
            # at the resync time too, whatever the server does.
            async with asyncio.timeout(until_resync):
                while (event := await stream.next()) is not None:
                    self._apply(shard, event)
                    received += 1
                    last_data = self._clock()
                    if received == 1:
                        shard.failures = shard.expired_in_row = 0
            reason = "timeout"
        except TimeoutError:  # ours: stream.next() raises KubeAPIError for its own
            reason = "resync"
            return
        except KubeAPIError as exc:
            reason = (
                "expired"
                if exc.expired
                else "inactive"
                if exc.code == "KUBE_WATCH_INACTIVE"
                else "error"
            )
            raise
        except asyncio.CancelledError:
            reason = "stopped"
            raise
        finally:
            stream.close()
            if not received and reason in ("error", "expired", "inactive"):
                # Nothing came through (e.g. the first event fails every time): the
                # outage never ended, and must not restart its clock at each reconnect.
                shard.down_since = was_down
            # A dead stream was stale from its last byte, not from when we noticed.
            self._mark_down(shard, last_data if reason == "inactive" else None)
            if self._metrics is not None and reason != "stopped":
                self._metrics.watch_restarts.labels(reason=reason).inc()
        if not received and self._clock() - opened < _MIN_HEALTHY_WATCH_SECONDS:
            raise KubeAPIError(
                "KUBE_WATCH_CLOSED", "watch pods: the server ended the stream at once"
            )

    def _apply(self, shard: _Shard, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj: dict[str, Any] = event["object"]
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        record: PodRecord | None = None
        if kind in ("ADDED", "MODIFIED"):
            record = self._build(obj)
            if record is not None:
                shard.store.upsert(record)
        elif kind == "DELETED":
            uid = meta.get("uid")
            if isinstance(uid, str):
                shard.store.delete(uid)
                for flight in self._flights.values():
                    flight.deleted.add(uid)
        elif kind != "BOOKMARK":
            raise KubeAPIError(
                "KUBE_BAD_RESPONSE", f"watch pods: unknown event type {kind!r}", status=200
            )
        rv = meta.get("resourceVersion")
        if isinstance(rv, str) and rv:
            shard.rv = rv
        if self._metrics is not None:
            self._metrics.events.labels(type=kind).inc()
            self._metrics.last_event.set(time.time())
        if self._observer is not None:
            self._observer(str(kind), record)

    # -- read-through -------------------------------------------------------------------------

    def _shard_for(self, namespace: str) -> _Shard | None:
        return self._shards.get(namespace) or self._shards.get(None)

    async def _read_through(self, shard: _Shard, namespace: str, name: str) -> PodRecord | None:
        key = (namespace, name)
        recent = self._recent.get(key)
        if recent is not None and recent[0] > self._clock():
            return recent[1]
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.create_task(self._fetch(shard, namespace, name, flight))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._landed(key, flight, task))
        if flight.task is None:
            raise RuntimeError("read-through flight without a task")
        return await asyncio.shield(flight.task)

    def _landed(self, key: tuple[str, str], flight: _Flight, task: asyncio.Task[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: a caller that went away must not leave it "unseen"

    async def _fetch(
        self, shard: _Shard, namespace: str, name: str, flight: _Flight
    ) -> PodRecord | None:
        api = self._require_api()
        s = self._settings
        held = shard.store.get(namespace, name)  # a pod of this name the cache has now
        try:
            async with asyncio.timeout(s.read_through_timeout_seconds), self._read_slots:
                if s.label_selector:
                    # The server applies the selector: a pod outside it is not ours.
                    found, _ = await api.list_all(
                        namespace,
                        _identity,
                        limit=0,
                        label_selector=s.label_selector,
                        field_selector=f"metadata.name={name}",
                        request_timeout=s.read_through_timeout_seconds,
                    )
                    obj = found[0] if found else None
                else:
                    obj = await api.get(
                        namespace, name, request_timeout=s.read_through_timeout_seconds
                    )
        except (KubeAPIError, TimeoutError) as exc:
            if self._metrics is not None:
                self._metrics.read_through.labels(result="error").inc()
            code = exc.code if isinstance(exc, KubeAPIError) else "KUBE_TIMEOUT"
            raise InventoryUnavailable(
                "INVENTORY_LOOKUP_FAILED", f"read-through of pod {namespace}/{name}: {code}"
            ) from exc
        record = self._build(obj) if obj else None
        if record is not None and record.uid in flight.deleted:
            record = None  # the watch saw it deleted while we asked
        if held is not None and (record is None or record.uid != held.uid):
            # The name has no pod now, or another: a name is unique at any moment, so
            # the uid the cache held under it is gone for good (its DELETED is late).
            shard.store.delete(held.uid)
        if record is not None and not flight.relisted:
            current = shard.store.get(namespace, name)
            if current is not None and current.uid == record.uid:
                record = current  # the watch got there first and is at least as fresh
            else:
                shard.store.upsert(record)
        if self._metrics is not None:
            self._metrics.read_through.labels(result="miss" if record is None else "hit").inc()
        self._remember((namespace, name), record)
        return record

    def _remember(self, key: tuple[str, str], record: PodRecord | None) -> None:
        now = self._clock()
        if len(self._recent) >= _RECENT_LIMIT:
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
            if len(self._recent) >= _RECENT_LIMIT:
                self._recent.clear()
        self._recent[key] = (now + self._settings.read_through_cache_seconds, record)

    def _require_api(self) -> PodsAPI:
        if self._api is None:
            raise RuntimeError("WatchInventory is not open; use start() or open()")
        return self._api


def _identity(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


def _log_crash(task: asyncio.Task[None]) -> None:
    # The loop only ends by cancellation; anything else is a bug, and the inventory
    # now answers "not ready" (fail closed) rather than serve a cache nobody updates.
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "%s stopped; the pod inventory is no longer ready",
            task.get_name(),
            exc_info=task.exception(),
        )


def _drift(store: PodStore, fresh: list[PodRecord]) -> int:
    """How many records a relist changes: added, removed or different."""
    changed = sum(1 for record in fresh if store.get_by_uid(record.uid) != record)
    kept = {record.uid for record in fresh}
    return changed + sum(1 for record in store if record.uid not in kept)
