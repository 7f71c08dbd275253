"""Policies from ConfigMaps, the convention of OPA's kube-mgmt, with its status write-back.

Which ConfigMaps: those labelled ``openpolicyagent.org/policy=rego`` in the configured
namespaces, selected by the API server (``labelSelector``). As kube-mgmt does, every
key of ``data`` is one Rego module, whatever its name, with the id
``<namespace>/<configmap>/<key>``; ``binaryData`` is ignored.

How: one list+watch per namespace, as the pod inventory's (``inventory/watch.py``):
list, mark synced, watch from the list's resourceVersion with bookmarks; 410 Gone →
relist; a dead stream fails after an inactivity timeout, and each watch asks the server
to end it before that (a quiet watch may carry no bookmark at all); any error, expected
or not, is logged and retried with backoff and jitter. A change
of ``data`` (or a ConfigMap added or deleted) wakes the reloader at once
(:class:`~identityd.policy.reload.ObservedSource`); a change of metadata only, such as
our own status annotation, does not — so our write cannot start a reload loop.

A ConfigMap that breaks the set is held back, as kube-mgmt loads each ConfigMap on its
own: when the engine rejects a set and names a module of a ConfigMap whose content is
new, the next snapshot carries that ConfigMap's last loaded content instead (or none),
so the other ConfigMaps' edits still come into force. When the culprit cannot be told
(no module named, or the named one is unchanged), every changed ConfigMap is held back.
Any later change of data releases every hold and the whole current set is tried again.
A set that fails never replaces the one in force (the engines guarantee that).

Status: each ConfigMap's ``openpolicyagent.org/kube-mgmt-status`` annotation carries the
JSON kube-mgmt writes, ``{"status":"ok"}`` or ``{"status":"error","error":<OPA's error
body>}``, derived from state (held back → error; its current content in force → ok;
not tried yet → nothing), and PATCHed only where it differs from the annotation last
seen, only while ``leader`` says we lead. Every replica computes the same statuses;
one writes them.

:class:`PolicyState` is the pure core (no I/O); :class:`ConfigMapSource` the edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
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
from identityd.policy.reload import ReloadOutcome, ReloadResult

__all__ = [
    "POLICY_LABEL_SELECTOR",
    "STATUS_ANNOTATION",
    "ConfigMapSettings",
    "ConfigMapSource",
    "Leadership",
    "PolicyConfigMap",
    "PolicyState",
    "module_id",
    "status_value",
]

log = logging.getLogger(__name__)

POLICY_LABEL_SELECTOR = "openpolicyagent.org/policy=rego"
STATUS_ANNOTATION = "openpolicyagent.org/kube-mgmt-status"
# OPA's error body for a module that does not compile (PUT /v1/policies → 400), the
# value kube-mgmt puts under "error".
_OPA_ERROR_CODE = "invalid_parameter"
_OPA_ERROR_MESSAGE = "error(s) occurred while compiling module(s)"
# The OPA engine's detail: "rego_parse_error: message (row 3, col 1)".
_DETAIL = re.compile(
    r"^(?:(?P<code>rego_[a-z_]+):\s*)?(?P<message>.*?)"
    r"(?:\s*\(row (?P<row>\d+), col (?P<col>\d+)\))?(?P<more>\s*\(and \d+ more\))?$",
    re.DOTALL,
)
# A watch that ends cleanly sooner than this without an event counts as a failure.
_MIN_HEALTHY_WATCH_SECONDS = 1.0

Key = tuple[str, str]  # (namespace, name)
OK = '{"status":"ok"}'


def module_id(namespace: str, name: str, key: str) -> str:
    """kube-mgmt's policy id: ``<namespace>/<configmap>/<key>``."""
    return f"{namespace}/{name}/{key}"


def _go_json(value: object) -> str:
    """JSON as Go's encoding/json writes it (compact; <, >, & and U+2028/9 escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def status_value(error: str | None, module: str | None = None) -> str:
    """The annotation value: ``{"status":"ok"}`` for ``error=None``, otherwise
    ``{"status":"error","error":{...}}`` with the error in OPA's shape, the way kube-mgmt
    writes a module OPA refused: ``{"code", "message", "errors": [{"code", "message",
    "location": {"file", "row", "col"}}]}`` (``location`` when a module is named; row
    and col when the engine said)."""
    if error is None:
        return OK
    match = _DETAIL.match(error.strip())
    detail: JSONObject = {"code": "rego_compile_error", "message": error.strip()}
    if match is not None:
        detail = {
            "code": match["code"] or "rego_compile_error",
            "message": (match["message"] + (match["more"] or "")).strip(),
        }
    if module is not None:
        location: JSONObject = {"file": module}
        if match is not None and match["row"] is not None:
            location |= {"row": int(match["row"]), "col": int(match["col"])}
        detail["location"] = location
    return _go_json(
        {
            "status": "error",
            "error": {"code": _OPA_ERROR_CODE, "message": _OPA_ERROR_MESSAGE, "errors": [detail]},
        }
    )


@dataclass(frozen=True, slots=True)
class PolicyConfigMap:
    """What the source keeps of a ConfigMap: its modules' text and its status annotation."""

    namespace: str
    name: str
    data: Mapping[str, str]
    status: str | None = None  # the kube-mgmt-status annotation as last seen
    resource_version: str = ""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @staticmethod
    def from_object(obj: JSONObject) -> PolicyConfigMap | None:
        """None for an object without a namespace and name. Non-string data values
        (the API server never sends them) are dropped."""
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            return None
        namespace, name = meta.get("namespace"), meta.get("name")
        if not isinstance(namespace, str) or not namespace or not isinstance(name, str) or not name:
            return None
        data = obj.get("data")
        modules = (
            {k: v for k, v in sorted(data.items()) if isinstance(k, str) and isinstance(v, str)}
            if isinstance(data, dict)
            else {}
        )
        annotations = meta.get("annotations")
        status = annotations.get(STATUS_ANNOTATION) if isinstance(annotations, dict) else None
        rv = meta.get("resourceVersion")
        return PolicyConfigMap(
            namespace,
            name,
            modules,
            status if isinstance(status, str) else None,
            rv if isinstance(rv, str) else "",
        )


@dataclass(frozen=True, slots=True)
class _Verdict:
    data: Mapping[str, str]  # the content it is about
    status: str  # the annotation value


class PolicyState:
    """The pure core: the ConfigMaps seen, the content in force, what is held back,
    and the status each ConfigMap should carry. No I/O, no clock."""

    def __init__(self) -> None:
        self.configmaps: dict[Key, PolicyConfigMap] = {}
        self._good: dict[Key, Mapping[str, str]] | None = None  # per ConfigMap, in force
        self._held: dict[Key, _Verdict] = {}  # held back from the set, with their error
        self._failed: dict[Key, _Verdict] = {}  # blamed, not held (nothing else to blame)
        self._offer: dict[Key, Mapping[str, str]] | None = None  # the last snapshot

    # -- what the watch saw -------------------------------------------------------------------

    def upsert(self, cm: PolicyConfigMap) -> bool:
        """Keep ``cm``; True when its data changed (a new set to try)."""
        old = self.configmaps.get(cm.key)
        self.configmaps[cm.key] = cm
        changed = old is None or old.data != cm.data
        if changed:
            self._held.clear()
        return changed

    def remove(self, namespace: str, name: str) -> bool:
        changed = self.configmaps.pop((namespace, name), None) is not None
        if changed:
            self._held.clear()
        return changed

    def replace_namespace(self, namespace: str, cms: list[PolicyConfigMap]) -> bool:
        """A relist of one namespace; True when any data changed."""
        fresh = {cm.key: cm for cm in cms if cm.namespace == namespace}
        old = {k: cm for k, cm in self.configmaps.items() if k[0] == namespace}
        changed = {k: cm.data for k, cm in old.items()} != {k: cm.data for k, cm in fresh.items()}
        for key in old:
            del self.configmaps[key]
        self.configmaps.update(fresh)
        if changed:
            self._held.clear()
        return changed

    # -- what the reloader asks and is told ---------------------------------------------------

    def snapshot(self) -> dict[str, str]:
        """The set to try: each ConfigMap's current content, or for one held back, the
        content of it in force (nothing if none). Remembered for :meth:`observe`."""
        offer: dict[Key, Mapping[str, str]] = {}
        for key, cm in sorted(self.configmaps.items()):
            held = self._held.get(key)
            if held is not None and held.data == cm.data:
                if self._good is not None and key in self._good:
                    offer[key] = self._good[key]
                continue
            offer[key] = cm.data
        self._offer = offer
        return {
            module_id(ns, name, k): text
            for (ns, name), data in offer.items()
            for k, text in data.items()
        }

    def observe(self, result: ReloadResult) -> bool:
        """Take the outcome of trying the last snapshot. True when a ConfigMap was newly
        held back, so a set without it should be tried now."""
        offer = self._offer
        if offer is None:
            return False
        if result.outcome is ReloadOutcome.LOADED:
            self._good = dict(offer)
            self._failed.clear()
            return False
        if result.outcome is not ReloadOutcome.REJECTED:
            return False  # engine down or source unreadable: nothing learnt about the policy
        status = status_value(_message(result), result.module)
        culprit = _key_of(result.module)
        good = self._good or {}
        changed = [k for k, data in offer.items() if good.get(k) != data]
        if culprit in changed:
            blamed = [culprit]
        elif changed:
            blamed = changed  # cannot tell which: hold back every change
        else:
            if culprit is not None and culprit in offer:
                self._failed[culprit] = _Verdict(offer[culprit], status)
            return False
        for key in blamed:
            self._held[key] = _Verdict(offer[key], status)
        log.warning(
            "policy ConfigMaps held back until they change: %s",
            ", ".join(f"{ns}/{name}" for ns, name in blamed),
        )
        return True

    # -- status -------------------------------------------------------------------------------

    def desired_status(self, key: Key) -> str | None:
        """The annotation the ConfigMap should carry; None while its content is untried."""
        cm = self.configmaps.get(key)
        if cm is None:
            return None
        for verdicts in (self._held, self._failed):
            verdict = verdicts.get(key)
            if verdict is not None and verdict.data == cm.data:
                return verdict.status
        if self._good is not None and self._good.get(key) == cm.data:
            return OK
        return None

    def pending_writes(self) -> list[tuple[PolicyConfigMap, str]]:
        """(ConfigMap, value) for every annotation that differs from what it should be."""
        out = []
        for key, cm in sorted(self.configmaps.items()):
            wanted = self.desired_status(key)
            if wanted is not None and wanted != cm.status:
                out.append((cm, wanted))
        return out

    @property
    def held(self) -> tuple[Key, ...]:
        return tuple(sorted(self._held))


def _message(result: ReloadResult) -> str:
    """The engine's message without the ``<module>: `` prefix PolicyCompileError adds."""
    error = result.error or "the policy set does not compile"
    prefix = f"{result.module}: " if result.module else ""
    return error[len(prefix) :] if prefix and error.startswith(prefix) else error


def _key_of(module: str | None) -> Key | None:
    if module is None:
        return None
    parts = module.split("/", 2)  # namespaces, names and data keys hold no "/"
    return (parts[0], parts[1]) if len(parts) == 3 else None


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
