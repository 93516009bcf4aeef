"""The three tiers as pairs of a control-plane ``BlockPool`` and the storage holding its bytes.

Why: a pool says which slot holds which sequence hash (for G2 and G3 it is the manager's
``TierPlanner``'s); a storage holds the slot's bytes. The pair is composition, so it lives here
beside ``KvBlockManager``, not in ``kvtier/storage/``, which imports nothing of the pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from kvtier.core.pool import BlockPool
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage

__all__ = ["DevicePool", "DiskPool", "HostPool", "Tier"]

S = TypeVar("S", DeviceStorage, HostStorage, DiskStorage)


@dataclass
class Tier(Generic[S]):
    """Slot i of ``pool`` is G1 block i of the engine's (or kvtier's own) tensors, G2 row i of
    ``storage.rows``, or a G3 capacity unit (G3 files are named by the hash the slot holds)."""

    pool: BlockPool
    storage: S


DevicePool = Tier[DeviceStorage]
HostPool = Tier[HostStorage]
DiskPool = Tier[DiskStorage]
