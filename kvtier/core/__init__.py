"""The control plane: block pools, eviction, the tier registry and offload policy. No torch."""

from __future__ import annotations

from kvtier.core.block import BlockState, ImmutableBlock, ImmutableBlockGroup, MutableBlock
from kvtier.core.errors import BlockStateError, InvariantError, PoolError, RegistryError
from kvtier.core.pool import BlockPool
from kvtier.core.registry import RemoveEvent, StoreEvent, TierEvent, TierRegistry

__all__ = [
    "BlockPool",
    "BlockState",
    "BlockStateError",
    "ImmutableBlock",
    "ImmutableBlockGroup",
    "InvariantError",
    "MutableBlock",
    "PoolError",
    "RegistryError",
    "RemoveEvent",
    "StoreEvent",
    "TierEvent",
    "TierRegistry",
]
