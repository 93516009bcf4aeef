"""The library composition: ``KvBlockManager`` over the G1/G2/G3 tiers, in one process.

Why a package: composition (pools paired with storages, the planner's choices turned into
copies) lives beside the facade, not in ``kvtier/storage/``, which imports no pools.
"""

from kvtier.manager.block_manager import KvBlockManager
from kvtier.manager.handles import KvHandle, KvTierStats, PathCounters, TierHits, TierMatch
from kvtier.transfer.handle import TransferError

__all__ = [
    "KvBlockManager",
    "KvHandle",
    "KvTierStats",
    "PathCounters",
    "TierHits",
    "TierMatch",
    "TransferError",
]
