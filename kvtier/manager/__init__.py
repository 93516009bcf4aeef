"""The library composition: ``KvBlockManager`` over the G1/G2/G3 tiers, in one process.

Why a package: the tiers (a control-plane ``BlockPool`` paired with its storage, ``tiers.py``)
are composition, not storage, so they live beside the facade that composes them rather than in
``kvtier/storage/``, which then imports nothing of the control plane's pools.
"""

from kvtier.manager.block_manager import KvBlockManager
from kvtier.manager.handles import KvHandle, TierMatch
from kvtier.manager.stats import KvTierStats, PathCounters, TierHits
from kvtier.transfer.manager import TransferError

__all__ = [
    "KvBlockManager",
    "KvHandle",
    "KvTierStats",
    "PathCounters",
    "TierHits",
    "TierMatch",
    "TransferError",
]
