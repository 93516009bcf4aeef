"""The one G3-index restore routine: which blocks found on disk at start-up to adopt, and how.

Why one routine: the library (``KvBlockManager.start``) and the vLLM scheduler half both rebuild a
G3 index from the files a previous run left, and both must agree on the rules:

- keep the newest blocks that fit (the caller lists them newest first); the rest are deleted;
- adopt them oldest first, because adoption takes the release tick that orders eviction, so the
  oldest file is evicted first after a restart;
- a block's parent, when it is among them, comes before it (a pool counts a parent's children as
  they register, so leaves go first); otherwise the recency order is kept;
- parent links that name the block itself or close a cycle are dropped (``acyclic_parents``): a
  corrupt header must never pin a block forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvtier.storage.block_file import acyclic_parents

__all__ = ["RestorePlan", "parents_first", "plan_restore"]


@dataclass(frozen=True)
class RestorePlan:
    """What to adopt (``order``, with ``parents`` links safe to register) and what to delete."""

    order: list[int]
    """Oldest first, parents before their children."""
    parents: dict[int, int | None]
    """Each adopted block's parent link (None where the header's link was unsafe)."""
    dropped: list[int]
    """Blocks beyond the tier's capacity, newest first: their files are deleted."""


def plan_restore(
    newest_first: Sequence[int], parents: Mapping[int, int | None], capacity: int
) -> RestorePlan:
    """The restore of ``newest_first`` (hashes found on disk) into a tier of ``capacity``."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    keep = newest_first[:capacity]
    order = parents_first(reversed(keep), parents)
    links = acyclic_parents(order, {h: parents.get(h) for h in order})
    return RestorePlan(order, links, list(newest_first[capacity:]))


def parents_first(oldest_first: Iterable[int], parents: Mapping[int, int | None]) -> list[int]:
    """``oldest_first`` reordered so that a block's parent, when it is among them, comes before
    it; otherwise the order is kept, so recency carries over a restart as far as the links allow."""
    blocks = list(oldest_first)
    wanted = set(blocks)
    placed: set[int] = set()
    out: list[int] = []
    for h in blocks:
        chain: list[int] = []
        x: int | None = h
        while x is not None and x in wanted and x not in placed:
            placed.add(x)
            chain.append(x)
            x = parents.get(x)
        out.extend(reversed(chain))
    return out
