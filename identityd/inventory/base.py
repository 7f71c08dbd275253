"""The PodInventory edge: slim pod records looked up by uid or namespace/name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What identityd keeps of a pod: enough to decide, nothing more."""

    uid: str
    namespace: str
    name: str
    service_account: str
    phase: str
    ips: tuple[str, ...]
    node_name: str | None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)  # selected ones only
    start_time: str | None = None
    deletion_timestamp: str | None = None
    resource_version: str = ""

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

    async def get(self, namespace: str, name: str) -> PodRecord | None: ...

    async def aclose(self) -> None: ...
