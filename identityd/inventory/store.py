"""Slim pod records in memory, indexed by uid and by namespace/name.

``record_from_pod`` turns a Pod in Kubernetes JSON form (camelCase keys) into a
:class:`PodRecord` and drops the rest of the object: 100k pods must fit in a
small, bounded amount of memory. Strings many pods share (namespace, phase,
node, service account, label keys and values) are interned so each is held once.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime

from identityd.inventory.base import PodRecord

# Annotation keys kept on a record. An entry ending in "/" keeps every key under
# that prefix; any other entry keeps exactly that key.
DEFAULT_ANNOTATION_KEYS: tuple[str, ...] = ("identityd.io/",)

_intern = sys.intern


def record_from_pod(
    obj: Mapping[str, object], *, annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS
) -> PodRecord | None:
    """The slim record of a Pod object, or None when it has no uid, namespace or name.

    Tolerant of missing or mistyped fields (a hand-written static file, a
    partial object): those read as absent. Invalid IPs are dropped.
    """
    meta = _map(obj.get("metadata"))
    uid, namespace, name = (_str(meta.get(key)) for key in ("uid", "namespace", "name"))
    if not (uid and namespace and name):
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
        labels={_intern(k): _intern(v) for k, v in _string_items(meta.get("labels"))},
        annotations=_annotations(meta.get("annotations"), tuple(annotation_keys)),
        start_time=_time(status.get("startTime")),
        deletion_timestamp=_time(meta.get("deletionTimestamp")),
        resource_version=_str(meta.get("resourceVersion")),
    )


def _map(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _string_items(value: object) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and isinstance(item, str):
                yield key, item


def _annotations(value: object, keys: tuple[str, ...]) -> dict[str, str]:
    kept = {}
    for key, item in _string_items(value):
        if "\x00" in item:
            continue  # the embedded Rego engine cuts strings at NUL
        if any(key.startswith(k) if k.endswith("/") else key == k for k in keys):
            kept[_intern(key)] = item
    return kept


def _pod_ips(status: Mapping[str, object]) -> tuple[str, ...]:
    # podIP is the primary address and podIPs[0] repeats it; dual-stack adds one more.
    candidates = [status.get("podIP")]
    entries = status.get("podIPs")
    if isinstance(entries, list):
        candidates += [_map(entry).get("ip") for entry in entries]
    ips: dict[str, None] = {}  # ordered set
    for candidate in candidates:
        if isinstance(candidate, str):
            try:
                ips[ipaddress.ip_address(candidate).compressed] = None
            except ValueError:
                continue
    return tuple(ips)


def _time(value: object) -> str | None:
    # JSON gives RFC 3339 strings; a YAML loader or a client model may give datetimes.
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(timespec="seconds") + "Z"
    return value if isinstance(value, str) and value else None


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
        return self._by_name.get(namespace, {}).get(name)

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
