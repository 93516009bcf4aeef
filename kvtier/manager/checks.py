"""Argument checks of ``KvBlockManager.offload`` and ``onboard``: refuse bad input up front.

Why: a copy is registered only when it lands, inside ``poll``; what ``register`` (or a G3 block
file header) would refuse then must be refused here, before anything is planned or moved.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.core.pool import BlockPool
from kvtier.manager.handles import TierMatch
from kvtier.storage.block_file import PRIORITY_MAX, PRIORITY_MIN

__all__ = ["check_device_ids", "check_onboard", "offload_parents"]


def check_device_ids(device_block_ids: Sequence[int], num_blocks: int) -> None:
    for d in device_block_ids:
        if not 0 <= d < num_blocks:
            raise ValueError(f"device block id {d} out of range 0..{num_blocks - 1}")


def offload_parents(
    device_block_ids: Sequence[int],
    sequence_hashes: Sequence[int],
    parent_sequence_hashes: Sequence[int | None] | None,
    priority: int,
    *,
    num_blocks: int,
    with_disk: bool,
) -> list[int | None]:
    """Check an offload's arguments; returns each block's parent (by default the chain within
    the call: block i's parent is block i-1's hash, the first has none)."""
    n = len(sequence_hashes)
    if len(device_block_ids) != n:
        raise ValueError(f"{len(device_block_ids)} device block ids for {n} sequence hashes")
    if parent_sequence_hashes is None:
        parents: list[int | None] = [None, *sequence_hashes[:-1]] if n else []
    else:
        parents = list(parent_sequence_hashes)
        if len(parents) != n:
            raise ValueError(f"{len(parents)} parent hashes for {n} sequence hashes")
    check_device_ids(device_block_ids, num_blocks)
    if len(set(sequence_hashes)) != n:
        raise ValueError("sequence_hashes of one offload must be distinct")
    for h, parent in zip(sequence_hashes, parents, strict=True):
        BlockPool.check_registration(h, parent_sequence_hash=parent, priority=priority)
    if with_disk and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(
            f"priority must fit in 32 bits with a disk tier (block file header), got {priority}"
        )
    return parents


def check_onboard(match: TierMatch, device_block_ids: Sequence[int], num_blocks: int) -> int:
    """Check an onboard's arguments; returns how many blocks of the match it copies."""
    if match.released:
        raise ValueError("this match was already released or onboarded")
    n = len(device_block_ids)
    if n > len(match):
        raise ValueError(f"{n} device blocks for a match of {len(match)} blocks")
    check_device_ids(device_block_ids, num_blocks)
    if len(set(device_block_ids)) != n:
        raise ValueError("device_block_ids of one onboard must be distinct")
    return n
