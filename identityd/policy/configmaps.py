"""Policies from ConfigMaps, the convention of OPA's kube-mgmt, with its status write-back:
the edges around :class:`~identityd.policy.configmap_state.PolicyState` (which content is
offered, what is held back, which status each ConfigMap should carry).

Which ConfigMaps: those labelled ``openpolicyagent.org/policy=rego`` in the configured
namespaces, selected by the API server (``labelSelector``).

How: one list+watch per namespace, as the pod inventory's (``inventory/watch.py``):
list, mark synced, watch from the list's resourceVersion with bookmarks; 410 Gone →
relist; a dead stream fails after an inactivity timeout, and each watch asks the server
to end it before that (a quiet watch may carry no bookmark at all); any error, expected
or not, is logged and retried with backoff and jitter. A change
of ``data`` (or a ConfigMap added or deleted) wakes the reloader at once
(:class:`~identityd.policy.reload.ObservedSource`); a change of metadata only, such as
our own status annotation, does not — so our write cannot start a reload loop.

Status annotations are PATCHed only where they differ from the annotation last seen,
only while ``leader`` says we lead. Every replica computes the same statuses; one
writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, Self

from identityd.errors import ConfigError
from identityd.kubeapi import (
    ConfigMapsAPI,
    JSONObject,
    KubeAPIError,
    KubeConnection,
    check_watch_timeout,
    watch_timeout,
)
from identityd.policy.configmap_state import (
    POLICY_LABEL_SELECTOR,
    STATUS_ANNOTATION,
    PolicyConfigMap,
    PolicyState,
)
from identityd.policy.reload import ReloadResult

__all__ = ["ConfigMapSettings", "ConfigMapSource", "Leadership"]

log = logging.getLogger(__name__)

# A watch that ends cleanly sooner than this without an event counts as a failure.
_MIN_HEALTHY_WATCH_SECONDS = 1.0


class Leadership(Protocol):
    """Who may write status (:class:`~identityd.policy.leader.LeaderElector`)."""

    @property
    def is_leader(self) -> bool: ...

    def subscribe(self, callback: Callable[[bool], None]) -> None: ...


@dataclass(frozen=True)
class ConfigMapSettings:
    """Where the policy ConfigMaps are, and the bounds of their watch and status writes."""

    namespaces: tuple[str, ...]
    label_selector: str = POLICY_LABEL_SELECTOR
    # PATCH the kube-mgmt-status annotation (when leading, if a leader is given).
    write_status: bool = True
    # ConfigMaps per list page.
    page_size: int = 100
    request_timeout_seconds: float = 10.0
    connect_timeout_seconds: float = 10.0
    # timeoutSeconds asked of the server per watch, randomised from this up to 2x but
    # below 5/6 of the inactivity timeout (60-100 s by default): the server ends a quiet
    # stream before it would count as dead.
    watch_timeout_seconds: float = 60.0
    # No byte for this long = a dead stream. The API server bookmarks only above the
    # watch's starting resourceVersion: a quiet namespace gets none.
    inactivity_timeout_seconds: float = 120.0
    # Reconnect and status-write retry backoff: initial * 2^(failures-1), capped, jittered.
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.namespaces, str) or not isinstance(self.namespaces, tuple):
            raise TypeError("namespaces: expected a tuple of namespace names")
        if not self.namespaces or not all(isinstance(ns, str) and ns for ns in self.namespaces):
            raise ValueError(f"namespaces: expected one or more names, got {self.namespaces!r}")
        if not isinstance(self.label_selector, str) or not self.label_selector:
            raise ValueError("label_selector: expected a non-empty selector")
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("namespaces", "label_selector", "write_status"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{item.name}: expected a number, got {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"{item.name}: expected a positive number, got {value!r}")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds: must not be below backoff_initial_seconds")
        check_watch_timeout(self.watch_timeout_seconds, self.inactivity_timeout_seconds)


@dataclass
class _Shard:
    namespace: str
    rv: str | None = None
    synced: bool = False
    failures: int = 0
    expired_in_row: int = 0
    synced_event: asyncio.Event = field(default_factory=asyncio.Event)


class ConfigMapSource:
    """The policy set from ConfigMaps (an ObservedSource), and their status write-back.

    ``leader``: only while it leads are statuses written (None: always, for one replica).
    Start with :meth:`start` (or ``async with``); :meth:`wait_synced` until every
    namespace is listed. :meth:`step` (one list or one watch stream of a namespace)
    and :meth:`write_status_once` are the test hooks; counters: ``changes`` (data
    changes seen), ``status_writes``, ``status_failures``."""

    def __init__(
        self,
        connection: KubeConnection | None,
        settings: ConfigMapSettings,
        *,
        leader: Leadership | None = None,
        api: ConfigMapsAPI | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_status_write: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_status_write(ok)`` is told of every status PATCH that succeeded or
        failed (not of 404/409, which the watch resolves); for metrics."""
        if connection is None and api is None:
            raise ValueError("connection: required unless an api is given")
        self._connection = connection
        self._settings = settings
        self._leader = leader
        self._api = api
        self._owns_api = api is None
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._shards = {ns: _Shard(ns) for ns in settings.namespaces}
        self.state = PolicyState()
        self._listeners: list[Callable[[], None]] = []
        self._dirty = asyncio.Event()  # statuses may need writing
        self._tasks: list[asyncio.Task[None]] = []
        self.changes = 0
        self.status_writes = 0
        self.status_failures = 0
        self._on_status_write = on_status_write
        if leader is not None:
            leader.subscribe(lambda _leading: self._dirty.set())

    # -- PolicySource / ObservedSource --------------------------------------------------------

    @property
    def name(self) -> str:
        return (
            f"ConfigMaps {self._settings.label_selector} in {','.join(self._settings.namespaces)}"
        )

    async def snapshot(self) -> dict[str, str]:
        if not self.synced:
            waiting = [s.namespace for s in self._shards.values() if not s.synced]
            raise ConfigError(
                "POLICY_CONFIGMAPS_NOT_SYNCED", f"ConfigMaps in {','.join(waiting)} not listed yet"
            )
        modules = self.state.snapshot()
        if not modules:
            raise ConfigError("POLICY_CONFIGMAPS_EMPTY", f"no loadable module in {self.name}")
        return modules

    def subscribe(self, on_change: Callable[[], None]) -> None:
        self._listeners.append(on_change)

    async def observe(self, result: ReloadResult) -> None:
        if self.state.observe(result):
            self._notify()
        self._dirty.set()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return all(shard.synced for shard in self._shards.values())

    async def wait_synced(self) -> None:
        for shard in self._shards.values():
            await shard.synced_event.wait()

    async def start(self) -> None:
        """List+watch every namespace and write statuses, in the background (idempotent)."""
        if self._tasks:
            return
        await self.open()
        for shard in self._shards.values():
            self._tasks.append(
                asyncio.create_task(self._run(shard), name=f"identityd-policy-cm-{shard.namespace}")
            )
        self._tasks.append(
            asyncio.create_task(self._write_loop(), name="identityd-policy-cm-status")
        )
        for task in self._tasks:
            task.add_done_callback(_log_crash)

    async def open(self) -> None:
        """Connect without starting the loops (for :meth:`step`)."""
        if self._api is None:
            if self._connection is None:
                raise ValueError("connection: required unless an api is given")
            self._api = await ConfigMapsAPI.connect(self._connection)

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_api and self._api is not None:
            await self._api.aclose()
            self._api = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the watch ----------------------------------------------------------------------------

    async def _run(self, shard: _Shard) -> None:
        while True:
            await self.step(shard.namespace)

    async def step(self, namespace: str) -> None:
        """One iteration of a namespace's loop: a list, or one watch stream until it
        ends; on failure, the backoff sleep. Raises nothing but cancellation."""
        shard = self._shards[namespace]
        try:
            if shard.rv is None:
                await self._relist(shard)
            else:
                await self._watch(shard)
            return
        except KubeAPIError as exc:
            if exc.expired and shard.rv is not None:
                # Our resourceVersion is gone: relist at once, with backoff if it repeats.
                log.info(
                    "policy ConfigMaps %s: resourceVersion %s expired; relisting",
                    namespace,
                    shard.rv,
                )
                shard.rv = None
                shard.expired_in_row += 1
                if shard.expired_in_row == 1:
                    return
                delay = self._backoff(shard.expired_in_row - 1)
            else:
                shard.failures += 1
                delay = self._backoff(shard.failures)
                log.warning(
                    "policy ConfigMaps %s: %s (failure %d; retry in %.2fs)",
                    namespace,
                    exc,
                    shard.failures,
                    delay,
                )
        except Exception:  # the loop must outlive a bug
            # Not a KubeAPIError: ending the loop would freeze the policy set for good.
            shard.failures += 1
            delay = self._backoff(shard.failures)
            log.exception(
                "policy ConfigMaps %s: unexpected error (failure %d; retry in %.2fs)",
                namespace,
                shard.failures,
                delay,
            )
        await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        s = self._settings
        ceiling = min(s.backoff_max_seconds, s.backoff_initial_seconds * 2 ** (failures - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def _relist(self, shard: _Shard) -> None:
        s = self._settings
        api = self._require_api()
        # An expired continue token restarts the paged list (list_all), never unpaged.
        cms, rv = await api.list_all(
            shard.namespace,
            PolicyConfigMap.from_object,
            limit=s.page_size,
            label_selector=s.label_selector,
            request_timeout=s.request_timeout_seconds,
        )
        was_synced = self.synced
        changed = self.state.replace_namespace(shard.namespace, cms)
        shard.rv, shard.synced, shard.failures = rv, True, 0
        shard.synced_event.set()
        log.info(
            "policy ConfigMaps %s listed: %d at resourceVersion %s", shard.namespace, len(cms), rv
        )
        if changed:
            self.changes += 1
        if self.synced and (changed or not was_synced):
            self._notify()
        self._dirty.set()

    async def _watch(self, shard: _Shard) -> None:
        s = self._settings
        api = self._require_api()
        timeout = watch_timeout(
            s.watch_timeout_seconds, s.inactivity_timeout_seconds, self._rng.random()
        )
        stream = await api.watch(
            shard.namespace,
            resource_version=shard.rv or "",
            label_selector=s.label_selector,
            timeout_seconds=max(1, int(timeout)),
            connect_timeout=s.connect_timeout_seconds,
            inactivity_timeout=s.inactivity_timeout_seconds,
        )
        opened = self._clock()
        received = 0
        try:
            while (event := await stream.next()) is not None:
                self._apply(shard, event)
                received += 1
                if received == 1:
                    shard.failures = shard.expired_in_row = 0
        finally:
            stream.close()
        if not received and self._clock() - opened < _MIN_HEALTHY_WATCH_SECONDS:
            raise KubeAPIError(
                "KUBE_WATCH_CLOSED", "watch configmaps: the server ended the stream at once"
            )

    def _apply(self, shard: _Shard, event: JSONObject) -> None:
        kind = event.get("type")
        obj: JSONObject = event["object"]
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        changed = False
        if kind in ("ADDED", "MODIFIED"):
            cm = PolicyConfigMap.from_object(obj)
            if cm is not None:
                changed = self.state.upsert(cm)
        elif kind == "DELETED":
            namespace, name = meta.get("namespace"), meta.get("name")
            if isinstance(namespace, str) and isinstance(name, str):
                changed = self.state.remove(namespace, name)
        elif kind != "BOOKMARK":
            raise KubeAPIError(
                "KUBE_BAD_RESPONSE", f"watch configmaps: unknown event type {kind!r}", status=200
            )
        rv = meta.get("resourceVersion")
        if isinstance(rv, str) and rv:
            shard.rv = rv
        if changed:
            self.changes += 1
            self._notify()
        if kind != "BOOKMARK":
            self._dirty.set()  # an annotation may differ from what it should be

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # -- status write-back --------------------------------------------------------------------

    def _may_write(self) -> bool:
        return self._settings.write_status and (self._leader is None or self._leader.is_leader)

    async def _write_loop(self) -> None:
        failures = 0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                written = await self.write_status_once()
            except Exception:  # the loop must outlive a bug
                log.exception("policy ConfigMap status: unexpected error; retrying")
                written = False
            if written:
                failures = 0
                continue
            failures += 1
            await asyncio.sleep(self._backoff(failures))
            self._dirty.set()

    def _tell_status_write(self, ok: bool) -> None:
        if self._on_status_write is not None:
            self._on_status_write(ok)

    async def write_status_once(self) -> bool:
        """PATCH every annotation that differs from what it should be, if we may write.
        False when a write failed (to be retried)."""
        s = self._settings
        ok = True
        for cm, value in self.state.pending_writes():
            if not self._may_write():  # asked before each write: leadership can end
                break
            api = self._require_api()
            # The resourceVersion is a precondition: a ConfigMap edited since we computed
            # its status answers 409, and the watch brings the edit (and a new status).
            meta: JSONObject = {"annotations": {STATUS_ANNOTATION: value}}
            if cm.resource_version:
                meta["resourceVersion"] = cm.resource_version
            try:
                stored = await api.patch(
                    cm.namespace,
                    cm.name,
                    {"metadata": meta},
                    request_timeout=s.request_timeout_seconds,
                )
            except KubeAPIError as exc:
                if exc.status in (404, 409):
                    continue  # deleted or edited meanwhile: the watch tells us
                self.status_failures += 1
                self._tell_status_write(False)
                ok = False
                log.warning(
                    "policy ConfigMap %s/%s: status not written: %s", cm.namespace, cm.name, exc
                )
                continue
            self.status_writes += 1
            self._tell_status_write(True)
            log.info("policy ConfigMap %s/%s: status %s", cm.namespace, cm.name, value)
            # The answer succeeds the object we patched; keep it unless the watch has
            # moved past that object already (resourceVersions are not to be ordered).
            updated = PolicyConfigMap.from_object(stored)
            current = self.state.configmaps.get(cm.key)
            # (upsert says "changed" never here: the precondition held the data.)
            if current == cm and updated is not None and self.state.upsert(updated):
                self.changes += 1
                self._notify()
        return ok

    def _require_api(self) -> ConfigMapsAPI:
        if self._api is None:
            raise RuntimeError("ConfigMapSource is not open; use start() or open()")
        return self._api


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped", task.get_name(), exc_info=task.exception())
