"""Pod inventory: slim records indexed by uid and namespace/name (static or watched)."""

from identityd.inventory.base import PodInventory, PodRecord
from identityd.inventory.static import StaticInventory, load_pod_file
from identityd.inventory.store import (
    DEFAULT_ANNOTATION_KEYS,
    PodStore,
    RecordBuilder,
    record_from_pod,
)

__all__ = [
    "DEFAULT_ANNOTATION_KEYS",
    "PodInventory",
    "PodRecord",
    "PodStore",
    "RecordBuilder",
    "StaticInventory",
    "load_pod_file",
    "record_from_pod",
]
