"""A PodInventory read from a file, for local runs, demos and tests.

Accepted file contents (JSON or YAML):

- a list of Pod objects;
- a ``v1/PodList`` (``{"kind": "PodList", "items": [...]}``) or the ``kind: List``
  that ``kubectl get pods -o yaml`` prints;
- a YAML stream of Pod documents separated by ``---`` (each may also be a list).

Items without ``kind`` are taken as Pods (PodList items usually omit it); any
other kind, a pod without ``metadata.uid``/``namespace``/``name``, or a uid or
namespace/name given twice is a ConfigError naming the item.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import yaml

from identityd.errors import ConfigError
from identityd.inventory.base import PodRecord
from identityd.inventory.store import DEFAULT_ANNOTATION_KEYS, PodStore, RecordBuilder

_CODE = "POD_FILE_INVALID"
_LIST_KINDS = ("PodList", "List")


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as the strings they are in Kubernetes JSON."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class StaticInventory:
    """Pods fixed at start-up (or at :meth:`reload`); always ready, never reads through."""

    def __init__(
        self,
        records: Iterable[PodRecord] = (),
        *,
        path: str | Path | None = None,
        annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS,
    ) -> None:
        self._store = PodStore(records)
        self._path = Path(path) if path is not None else None
        self._annotation_keys = tuple(annotation_keys)

    @classmethod
    def from_file(
        cls, path: str | Path, *, annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS
    ) -> StaticInventory:
        keys = tuple(annotation_keys)
        return cls(load_pod_file(path, annotation_keys=keys), path=path, annotation_keys=keys)

    def reload(self) -> int:
        """Re-read the file; on any error the current pods stay. Returns the pod count."""
        if self._path is None:
            raise ConfigError(_CODE, "this static inventory was not read from a file")
        self._store.replace_all(load_pod_file(self._path, annotation_keys=self._annotation_keys))
        return len(self._store)

    @property
    def ready(self) -> bool:
        return True

    def size(self) -> int:
        return len(self._store)

    async def get_by_uid(self, uid: str) -> PodRecord | None:
        return self._store.get_by_uid(uid)

    async def get(self, namespace: str, name: str, *, uid: str | None = None) -> PodRecord | None:
        # ``uid`` is ignored: a file has nothing newer to read through to.
        return self._store.get(namespace, name)

    async def aclose(self) -> None:
        return None


def load_pod_file(
    path: str | Path, *, annotation_keys: Iterable[str] = DEFAULT_ANNOTATION_KEYS
) -> list[PodRecord]:
    """Read and validate a pod file into records; ConfigError says what and where."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(_CODE, f"{path}: cannot read pod file: {reason}") from exc
    build = RecordBuilder(annotation_keys)
    records: list[PodRecord] = []
    uids: set[str] = set()
    names: set[tuple[str, str]] = set()
    for index, item in enumerate(_items(_documents(text, path), path)):
        record = _record(item, build, f"{path}: item {index}")
        if record.uid in uids:
            raise ConfigError(_CODE, f"{path}: item {index}: uid {record.uid} given twice")
        if (record.namespace, record.name) in names:
            raise ConfigError(
                _CODE, f"{path}: item {index}: pod {record.namespace}/{record.name} given twice"
            )
        uids.add(record.uid)
        names.add((record.namespace, record.name))
        records.append(record)
    return records


def _documents(text: str, path: str | Path) -> list[object]:
    if Path(path).suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            if Path(path).suffix.lower() == ".json":
                raise ConfigError(_CODE, f"{path}: invalid JSON: {exc}") from exc
            # A YAML flow collection can start with "{" or "[" too: try YAML below.
    try:
        return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(_CODE, f"{path}: invalid YAML: {exc}") from exc


def _items(documents: list[object], path: str | Path) -> Iterator[object]:
    for number, doc in enumerate(documents):
        if isinstance(doc, list):
            yield from doc
        elif isinstance(doc, Mapping) and doc.get("kind") in _LIST_KINDS:
            items = doc.get("items")
            if not isinstance(items, list):
                raise ConfigError(_CODE, f"{path}: document {number}: {doc['kind']} without items")
            yield from items
        elif isinstance(doc, Mapping):
            yield doc
        else:
            raise ConfigError(
                _CODE,
                f"{path}: document {number}: expected a Pod, a list of Pods or a PodList, "
                f"got {type(doc).__name__}",
            )


def _record(item: object, build: RecordBuilder, where: str) -> PodRecord:
    if not isinstance(item, Mapping):
        raise ConfigError(_CODE, f"{where}: expected a Pod object, got {type(item).__name__}")
    kind = item.get("kind", "Pod")
    if kind != "Pod":
        raise ConfigError(_CODE, f"{where}: kind {kind!r} is not a Pod")
    record = build(item)
    if record is None:
        raise ConfigError(_CODE, f"{where}: a Pod needs metadata.uid, namespace and name")
    return record
