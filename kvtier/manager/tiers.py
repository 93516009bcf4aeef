"""The three tiers as pairs of a control-plane ``BlockPool`` and the storage holding its bytes.

Why this exists: a pool says which slot holds which sequence hash (for G2 and G3 it is the
``TierPlanner``'s, which decides what lives there); a storage holds the slot's bytes. The pair
lets the facade hand out "the host pool" as one thing. The pairs are composition, so they live
here beside ``KvBlockManager`` and not in ``kvtier/storage/``, which imports nothing of the
control plane's pools.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.core.pool import BlockPool
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage

__all__ = ["DevicePool", "DiskPool", "HostPool"]


@dataclass
class DevicePool:
    """G1: slot i of ``pool`` is block i of the engine's (or kvtier's own) KV tensors."""

    pool: BlockPool
    storage: DeviceStorage


@dataclass
class HostPool:
    """G2: slot i of ``pool`` is row i of ``storage.rows``."""

    pool: BlockPool
    storage: HostStorage


@dataclass
class DiskPool:
    """G3: ``pool`` counts capacity; block files are named by sequence hash, so a slot's file
    is found by the hash the slot holds (the planner's evictions name the files to delete)."""

    pool: BlockPool
    storage: DiskStorage
