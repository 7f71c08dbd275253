"""Pod inventory: slim records indexed by uid and namespace/name (static or watched)."""

from identityd.inventory.base import PodInventory, PodRecord

__all__ = ["PodInventory", "PodRecord"]
