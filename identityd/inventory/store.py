"""Slim pod records in memory, indexed by uid and by namespace/name.

:class:`RecordBuilder` turns a Pod in Kubernetes JSON form (camelCase keys) into
a :class:`PodRecord` and drops the rest of the object: 100k pods must fit in a
small, bounded amount of memory. Strings many pods share (namespace, phase,
node, service account, label keys and values) are interned so each is held
once, and records of pods with equal labels (the pods of one ReplicaSet) share
one read-only labels mapping.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from itertools import chain
from socket import AF_INET, inet_ntop, inet_pton
from types import MappingProxyType

from identityd.inventory.base import EMPTY_MAPPING, PodRecord

# Annotation keys kept on a record. An entry ending in "/" keeps every key under
# that prefix; any other entry keeps exactly that key.
DEFAULT_ANNOTATION_KEYS: tuple[str, ...] = ("identityd.io/",)

# Distinct label sets a RecordBuilder remembers for sharing. A cluster has about one
# per ReplicaSet, plus one per StatefulSet or Job pod; past the limit the table
# starts over (records keep what they have; later ones share again). Bounds the
# sets of pods long gone that the table alone keeps alive (~0.5 KB each).
MAX_LABEL_SETS = 16384

_intern = sys.intern

LabelKey = tuple[object, ...]  # k1, v1, k2, v2, ... of a labels mapping, in its order


class RecordBuilder:
    """Pod objects in, :class:`PodRecord` out (None when it has no uid, namespace or name).

    Tolerant of missing or mistyped fields (a hand-written static file, a partial
    object): those read as absent. Invalid IPs are dropped. One builder per
    inventory, so that its records share label mappings; not thread-safe."""

    __slots__ = ("_exact", "_label_sets", "_limit", "_prefixes")

    def __init__(
        self,
        annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS,
        *,
        max_label_sets: int = MAX_LABEL_SETS,
    ) -> None:
        keys = tuple(annotation_keys)
        if isinstance(annotation_keys, str) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"annotation_keys: expected strings, got {annotation_keys!r}")
        if isinstance(max_label_sets, bool) or not isinstance(max_label_sets, int):
            raise TypeError("max_label_sets: expected an int")
        if max_label_sets < 0:
            raise ValueError(f"max_label_sets: expected >= 0, got {max_label_sets}")
        self._prefixes = tuple(k for k in keys if k.endswith("/"))
        self._exact = frozenset(k for k in keys if not k.endswith("/"))
        self._label_sets: dict[LabelKey, Mapping[str, str]] = {}
        self._limit = max_label_sets

    @property
    def label_sets(self) -> int:
        """Distinct label sets remembered now."""
        return len(self._label_sets)

    def __call__(self, obj: Mapping[str, object]) -> PodRecord | None:
        meta = _map(obj.get("metadata"))
        uid, namespace, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
        if not (
            isinstance(uid, str)
            and uid
            and isinstance(namespace, str)
            and namespace
            and isinstance(name, str)
            and name
        ):
            return None
        spec, status = _map(obj.get("spec")), _map(obj.get("status"))
        service_account = (
            _str(spec.get("serviceAccountName")) or _str(spec.get("serviceAccount")) or "default"
        )
        node = _str(spec.get("nodeName"))
        return PodRecord(
            uid=uid,
            namespace=_intern(namespace),
            name=name,
            service_account=_intern(service_account),
            phase=_intern(_str(status.get("phase"))),
            ips=_pod_ips(status),
            node_name=_intern(node) if node else None,
            labels=self.labels(meta.get("labels")),
            annotations=self._annotations(meta.get("annotations")),
            start_time=_time(status.get("startTime")),
            deletion_timestamp=_time(meta.get("deletionTimestamp")),
        )

    def labels(self, value: object) -> Mapping[str, str]:
        """The read-only, shared mapping of these labels (non-string items dropped)."""
        value = _map(value)
        if not value:
            return EMPTY_MAPPING
        table = self._label_sets
        try:
            # Hit: equal to a set built below, so every item is a string already.
            shared = table.get(tuple(chain.from_iterable(value.items())))
        except TypeError:  # an unhashable (mistyped) value: dropped below
            shared = None
        if shared is not None:
            return shared
        labels = {_intern(k): _intern(v) for k, v in _string_items(value)}
        if not labels:
            return EMPTY_MAPPING
        key: LabelKey = tuple(chain.from_iterable(labels.items()))
        shared = table.get(key)
        if shared is None:
            if len(table) >= self._limit:
                table.clear()
            shared = MappingProxyType(labels)
            if self._limit:
                table[key] = shared
        return shared

    def _annotations(self, value: object) -> Mapping[str, str]:
        value = _map(value)
        if not value or not (self._prefixes or self._exact):
            return EMPTY_MAPPING
        prefixes, exact = self._prefixes, self._exact
        kept = {
            _intern(key): item
            for key, item in value.items()
            if isinstance(key, str)
            and isinstance(item, str)
            and (key in exact or key.startswith(prefixes))
            and "\x00" not in item  # the embedded Rego engine cuts strings at NUL
        }
        return MappingProxyType(kept) if kept else EMPTY_MAPPING


def record_from_pod(
    obj: Mapping[str, object], *, annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS
) -> PodRecord | None:
    """The slim record of one Pod object (see :class:`RecordBuilder`, which shares
    label mappings between the records it builds; this shares none)."""
    return RecordBuilder(annotation_keys, max_label_sets=0)(obj)


def canonical_ip(text: str) -> str | None:
    """``ipaddress.ip_address(text).compressed``, or None when ``text`` is not an IP.

    A pod's IPv4 address is already in canonical form, which inet_pton/inet_ntop
    confirm ~10x faster than ipaddress (a third of a record's build time); any
    other text goes to ipaddress, so the answer is ipaddress's in every case."""
    if ":" not in text:
        try:
            if inet_ntop(AF_INET, inet_pton(AF_INET, text)) == text:
                return text
        except (OSError, ValueError):
            pass
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return None


def _map(value: object) -> Mapping[str, object]:
    # The type check first: isinstance against an ABC costs ~5x more, and JSON gives dicts.
    return value if type(value) is dict or isinstance(value, Mapping) else EMPTY_MAPPING


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _string_items(value: Mapping[str, object]) -> Iterator[tuple[str, str]]:
    for key, item in value.items():
        if isinstance(key, str) and isinstance(item, str):
            yield key, item


def _pod_ips(status: Mapping[str, object]) -> tuple[str, ...]:
    # podIP is the primary address and podIPs[0] repeats it; dual-stack adds one more.
    primary, entries = status.get("podIP"), status.get("podIPs")
    if isinstance(primary, str) and isinstance(entries, list) and len(entries) == 1:
        entry = entries[0]
        if _map(entry).get("ip") == primary:  # single-stack
            ip = canonical_ip(primary)
            return (ip,) if ip is not None else ()
    candidates = [primary]
    if isinstance(entries, list):
        candidates += [_map(entry).get("ip") for entry in entries]
    ips: list[str] = []
    for index, candidate in enumerate(candidates):
        if isinstance(candidate, str) and candidate not in candidates[:index]:
            ip = canonical_ip(candidate)
            if ip is not None and ip not in ips:
                ips.append(ip)
    return tuple(ips)


def _time(value: object) -> str | None:
    # JSON gives RFC 3339 strings; a YAML loader or a client model may give datetimes.
    if isinstance(value, str):
        return value or None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(timespec="seconds") + "Z"
    return None


class PodStore:
    """Records indexed by uid and by namespace/name; one record per name at a time.

    Kubernetes keeps a pod name unique within its namespace at any moment, so an
    upsert for a name under a new uid evicts the old uid's record (its delete
    event may have been missed). A late delete for the old uid then finds nothing
    and leaves the new record alone. Not thread-safe; used from one event loop.
    """

    __slots__ = ("_by_name", "_by_uid")

    def __init__(self, records: Iterable[PodRecord] = ()) -> None:
        self._by_uid: dict[str, PodRecord] = {}
        # namespace -> name -> record: nested dicts, no (ns, name) tuple per pod.
        self._by_name: dict[str, dict[str, PodRecord]] = {}
        for record in records:
            self.upsert(record)

    def __len__(self) -> int:
        return len(self._by_uid)

    def __iter__(self) -> Iterator[PodRecord]:
        return iter(list(self._by_uid.values()))

    def get_by_uid(self, uid: str) -> PodRecord | None:
        return self._by_uid.get(uid)

    def get(self, namespace: str, name: str) -> PodRecord | None:
        names = self._by_name.get(namespace)
        return names.get(name) if names is not None else None

    def upsert(self, record: PodRecord) -> None:
        if not isinstance(record, PodRecord):
            raise TypeError(f"record: expected PodRecord, got {type(record).__name__}")
        previous = self._by_uid.get(record.uid)
        if previous is not None:
            self._unlink_name(previous)  # defensive: a uid's name never changes in Kubernetes
        names = self._by_name.setdefault(record.namespace, {})
        holder = names.get(record.name)
        if holder is not None and holder.uid != record.uid:
            del self._by_uid[holder.uid]  # recreated under the same name
        names[record.name] = record
        self._by_uid[record.uid] = record

    def delete(self, target: str | PodRecord) -> PodRecord | None:
        """Remove by uid (or a record's uid); returns what was removed, if anything."""
        uid = target.uid if isinstance(target, PodRecord) else target
        if not isinstance(uid, str):
            raise TypeError(f"target: expected uid str or PodRecord, got {type(target).__name__}")
        record = self._by_uid.pop(uid, None)
        if record is not None:
            self._unlink_name(record)
        return record

    def replace_all(self, records: Iterable[PodRecord]) -> None:
        """Swap in the result of a relist: built aside, then both indexes at once."""
        fresh = PodStore(records)
        self._by_uid, self._by_name = fresh._by_uid, fresh._by_name

    def _unlink_name(self, record: PodRecord) -> None:
        names = self._by_name.get(record.namespace)
        if names is not None and names.get(record.name) is record:
            del names[record.name]
            if not names:
                del self._by_name[record.namespace]
