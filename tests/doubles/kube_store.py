"""The state behind the API-server double: objects, one resourceVersion counter, an event log.

Objects of every resource live in one store keyed by (resource, namespace, name),
as etcd keeps them under ``/registry/<resource>/<namespace>/<name>``. Every
write takes the next value of one global resourceVersion and appends an event
to a bounded log (the watch-cache window). A watch or a paged list from a
resourceVersion older than the window is answered ``410 Gone``/``Expired``, as
the real API server does after compaction. A paged list is a consistent
snapshot at its first page's resourceVersion: later pages undo the events
written since (that is why the log keeps each event's previous object).

Each object is kept as its dict and its serialised bytes, so a 100k-object
list costs a join, not a ``json.dumps`` per object per request.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import heapq
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Predicate = Callable[[JSON], bool]


class Expired(Exception):
    """A resourceVersion (watch start, or a continue token's) is older than the log."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested, self.oldest = requested, oldest


@dataclass(frozen=True)
class Resource:
    """One REST resource: where it is served and what it is called."""

    plural: str
    kind: str
    group_version: str = "v1"
    namespaced: bool = True

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


@dataclass(frozen=True, slots=True)
class Stored:
    obj: JSON
    raw: bytes

    @staticmethod
    def of(obj: JSON) -> Stored:
        return Stored(obj, json.dumps(obj, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    resource: str
    key: Key
    new: Stored  # for DELETED: the object as it was deleted (with the delete's RV)
    prev: Stored | None  # the object before this event; None for ADDED


@dataclass(eq=False)
class Watcher:
    """One open watch: what it selects, and where its lines go."""

    resource: str
    namespace: str | None
    predicate: Predicate
    # Event lines (bytes), and whatever control items the HTTP layer puts in.
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    def offer(self, event: Event) -> None:
        line = event_line(event, self)
        if line is not None:
            self.queue.put_nowait(line)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_line(event: Event, watcher: Watcher) -> bytes | None:
    """The watch line this watcher sees for the event, or None.

    With a selector, an object that starts matching arrives as ADDED and one that
    stops matching as DELETED, as the API server's watch cache does it."""
    if event.resource != watcher.resource:
        return None
    if watcher.namespace is not None and event.key[0] != watcher.namespace:
        return None
    now_in = watcher.predicate(event.new.obj)
    if event.type == "MODIFIED":
        was_in = event.prev is not None and watcher.predicate(event.prev.obj)
        kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}.get(
            (was_in, now_in)
        )
        if kind is None:
            return None
        return watch_line(kind, event.new.raw)
    return watch_line(event.type, event.new.raw) if now_in else None


def watch_line(kind: str, raw: bytes) -> bytes:
    return b'{"type":"' + kind.encode() + b'","object":' + raw + b"}\n"


class ObjectStore:
    """Objects of all resources, the shared resourceVersion, the event log, the watchers."""

    def __init__(self, *, history: int = 10_000, first_rv: int = 1000) -> None:
        if history < 0:
            raise ValueError(f"history: expected >= 0, got {history}")
        self._history = history
        self._rv = first_rv
        self._compacted = first_rv  # watches from below this are 410; == rv: nothing kept
        self._objects: dict[str, dict[Key, Stored]] = {}
        self._keys: dict[str, list[Key]] = {}  # sorted, for paging in etcd key order
        self._log: deque[Event] = deque()
        self.watchers: set[Watcher] = set()
        # Writes while muted are logged but not sent to open watches: events "lost" in
        # flight, the drift a periodic relist must repair. A new watch still sees them.
        self.muted = False

    @property
    def rv(self) -> int:
        return self._rv

    @property
    def oldest_rv(self) -> int:
        """The oldest resourceVersion a watch or continue token may still start from."""
        return self._compacted

    # -- writes -------------------------------------------------------------------------------

    def put(self, resource: str, obj: Mapping[str, Any], *, owned: bool = False) -> JSON:
        """Create or replace; fills uid, creationTimestamp, resourceVersion. Returns a copy.

        ``owned=True`` (bulk loads, benchmarks): the store keeps ``obj`` itself, fills
        it in place and returns it; the caller must not change it afterwards."""
        new = dict(obj) if owned else copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        objects = self._objects.setdefault(resource, {})
        prev = objects.get(key)
        if prev is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            keys = self._keys.setdefault(resource, [])
            bisect.insort(keys, key)
        else:
            meta["uid"] = prev.obj["metadata"]["uid"]  # a uid never changes
            meta.setdefault("creationTimestamp", prev.obj["metadata"].get("creationTimestamp"))
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        stored = Stored.of(new)
        objects[key] = stored
        self._append(Event(self._rv, "ADDED" if prev is None else "MODIFIED", resource, key,
                           stored, prev))
        return new if owned else copy.deepcopy(new)

    def remove(self, resource: str, namespace: str, name: str) -> JSON | None:
        key = (namespace, name)
        prev = self._objects.get(resource, {}).pop(key, None)
        if prev is None:
            return None
        keys = self._keys[resource]
        del keys[bisect.bisect_left(keys, key)]
        self._rv += 1
        gone = copy.deepcopy(prev.obj)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._append(Event(self._rv, "DELETED", resource, key, Stored.of(gone), prev))
        return gone

    def compact(self, keep: int = 0) -> None:
        """Forget all but the last ``keep`` events: older resourceVersions answer 410."""
        while len(self._log) > keep:
            self._compacted = self._log.popleft().rv
        if not self._log:
            self._compacted = self._rv

    def _append(self, event: Event) -> None:
        self._log.append(event)
        self.compact(self._history)
        if not self.muted:
            for watcher in list(self.watchers):
                watcher.offer(event)

    # -- reads --------------------------------------------------------------------------------

    def get(self, resource: str, namespace: str, name: str) -> JSON | None:
        stored = self._objects.get(resource, {}).get((namespace, name))
        return copy.deepcopy(stored.obj) if stored is not None else None

    def count(self, resource: str) -> int:
        return len(self._objects.get(resource, {}))

    def events_after(self, rv: int) -> list[Event]:
        """Events with a resourceVersion above ``rv``; Expired when some were compacted."""
        if rv < self._compacted:
            raise Expired(rv, self._compacted)
        # The log is in RV order; count back from the end (watches start near it).
        start = len(self._log)
        while start > 0 and self._log[start - 1].rv > rv:
            start -= 1
        return [self._log[index] for index in range(start, len(self._log))]

    def page(
        self,
        resource: str,
        namespace: str | None,
        predicate: Predicate,
        *,
        at_rv: int,
        after: Key | None,
        limit: int,
    ) -> tuple[list[bytes], Key | None]:
        """Up to ``limit`` (0 = all) matching objects after key ``after`` as of ``at_rv``.

        Returns their bytes and the last key examined when more may follow."""
        current = self._objects.get(resource, {})
        # State at at_rv = current state with the later events undone (earliest wins).
        undo: dict[Key, Stored | None] = {}
        for event in reversed(self.events_after(at_rv)):
            if event.resource == resource:
                undo[event.key] = event.prev
        keys = self._keys.get(resource, [])
        if after is not None:
            index = bisect.bisect_right(keys, after)
        elif namespace is not None:
            index = bisect.bisect_left(keys, (namespace, ""))
        else:
            index = 0
        extra = sorted(k for k in undo if k not in current and (after is None or k > after))
        merged = heapq.merge((keys[i] for i in range(index, len(keys))), extra)
        items: list[bytes] = []
        last: Key | None = None
        for key in merged:
            if namespace is not None and key[0] != namespace:
                if key[0] > namespace:
                    break
                continue
            stored = undo[key] if key in undo else current.get(key)
            if stored is None or not predicate(stored.obj):
                continue
            if limit and len(items) == limit:
                return items, last  # one more matches: the list continues
            items.append(stored.raw)
            last = key
        return items, None


# -- selectors ---------------------------------------------------------------------------------

_TERM_SPLIT = re.compile(r",(?![^()]*\))")
_SET_TERM = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^()]*)\)\s*$")
_OP_TERM = re.compile(r"^\s*([^\s!=()]+)\s*(==|!=|=)\s*([^\s!=()]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)([^\s!=()]+)\s*$")


def label_predicate(selector: str) -> Predicate:
    """A labelSelector (equality, ``!=``, ``in``/``notin``, exists, ``!``) as a predicate."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _TERM_SPLIT.split(selector) if selector.strip() else []:
        checks.append(_label_check(term))

    def matches(obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return matches


def _label_check(term: str) -> Callable[[Mapping[str, str]], bool]:
    if m := _SET_TERM.match(term):
        key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _OP_TERM.match(term):
        key, op, value = m[1], m[2], m[3]
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _EXISTS_TERM.match(term):
        negate, key = m[1] == "!", m[2]
        return lambda labels: (key in labels) != negate
    raise ValueError(f"unable to parse requirement: {term!r}")


_FIELDS = {"metadata.name", "metadata.namespace"}


def field_predicate(selector: str) -> Predicate:
    """A fieldSelector over metadata.name / metadata.namespace (``=``, ``==``, ``!=``)."""
    checks: list[tuple[list[str], bool, str]] = []
    for term in selector.split(",") if selector.strip() else []:
        m = _OP_TERM.match(term)
        if m is None or m[1] not in _FIELDS:
            raise ValueError(f"field label not supported: {term!r}")
        checks.append((m[1].split("."), m[2] != "!=", m[3]))

    def matches(obj: JSON) -> bool:
        for path, equal, value in checks:
            node: Any = obj
            for part in path:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if (node == value) != equal:
                return False
        return True

    return matches
