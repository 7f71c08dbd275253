"""The PodInventory edge: slim pod records looked up by uid or namespace/name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

# One empty mapping for every record without labels or kept annotations.
EMPTY_MAPPING: Mapping[str, str] = MappingProxyType({})


def _empty() -> Mapping[str, str]:
    return EMPTY_MAPPING


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What identityd keeps of a pod: enough to decide, nothing more.

    ``labels`` and ``annotations`` are read-only mappings, and records of pods
    with equal labels may share one (see ``store.RecordBuilder``): copy with
    ``dict(record.labels)`` to change them. A plain dict given here is copied
    into a read-only view."""

    uid: str
    namespace: str
    name: str
    service_account: str
    phase: str
    ips: tuple[str, ...]
    node_name: str | None
    labels: Mapping[str, str] = field(default_factory=_empty)
    annotations: Mapping[str, str] = field(default_factory=_empty)  # selected ones only
    start_time: str | None = None
    deletion_timestamp: str | None = None

    def __post_init__(self) -> None:
        for name in ("labels", "annotations"):
            value = getattr(self, name)
            if type(value) is not MappingProxyType:
                if not isinstance(value, Mapping):
                    raise TypeError(f"{name}: expected a mapping, got {type(value).__name__}")
                object.__setattr__(
                    self, name, MappingProxyType(dict(value)) if value else EMPTY_MAPPING
                )

    @property
    def terminating(self) -> bool:
        return self.deletion_timestamp is not None


class PodInventory(Protocol):
    @property
    def ready(self) -> bool:
        """True once the first full list is in and the data is not stale."""
        ...

    def size(self) -> int: ...

    async def get_by_uid(self, uid: str) -> PodRecord | None:
        """The pod with this uid; may read through to the source on a miss.

        Raises InventoryUnavailable when it cannot answer (not synced, stale)."""
        ...

    async def get(self, namespace: str, name: str, *, uid: str | None = None) -> PodRecord | None:
        """The pod of this name, whatever its uid; None when there is none.

        ``uid`` is the uid the caller expects (the token's). When the cache holds
        another uid under that name, or nothing, the implementation may read
        through to the source to find the pod with this uid: a StatefulSet pod
        recreated under its old name before the watch has caught up. The answer
        can still carry another uid (the caller must compare) or be None.
        Implementations without a source to read ignore it.

        Raises InventoryUnavailable when it cannot answer (not synced, stale,
        the read-through failed)."""
        ...

    async def aclose(self) -> None: ...
