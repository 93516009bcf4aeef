"""Per-slot metadata of a pool, stored as flat arrays indexed by block id.

Why arrays and not one object per slot: a pool may have millions of slots, and a million small
Python objects make every full garbage collection walk them all (we measured the fill of a 1M-block
pool at about half its time in the GC). ``array``/``bytearray`` hold plain machine numbers that
the GC never looks at, use about 40 bytes per slot, and grow on demand, so a large pool that is
mostly unused costs little.
"""

from __future__ import annotations

from array import array

__all__ = ["SlotTable"]

# Slot state codes (one byte per slot).
FREE = 0  # owned by nobody (RESET, in the free list)
RESET = 1  # allocated, empty
PARTIAL = 2
COMPLETE = 3
LINKED = 4  # registered and findable by its sequence hash
UNLINKED = 5  # registered, removed from the index, still held by handles

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SlotTable:
    """Columns: state, ref count, sequence hash, parent hash (+ flag), priority, release tick."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.state = bytearray()
        self.refs = array("q")
        self.seq = array("Q")
        self.parent = array("Q")
        self.has_parent = bytearray()
        self.prio = array("q")
        self.tick = array("Q")
        self.block_hash: dict[int, int] = {}  # sparse: only where given
        self.tokens: dict[int, tuple[int, ...]] = {}  # sparse: only blocks filled by tokens

    def ensure(self, block_id: int) -> None:
        """Grow the columns (geometrically, up to capacity) so ``block_id`` has a row."""
        size = len(self.state)
        if block_id < size:
            return
        new = min(self.capacity, max(block_id + 1, 2 * size, 1024))
        extra = new - size
        self.state.extend(bytes(extra))
        self.has_parent.extend(bytes(extra))
        zeros = bytes(8 * extra)
        for column in (self.refs, self.seq, self.parent, self.prio, self.tick):
            column.frombytes(zeros)

    def parent_of(self, block_id: int) -> int | None:
        return self.parent[block_id] if self.has_parent[block_id] else None

    def set_registered(
        self,
        block_id: int,
        sequence_hash: int,
        parent_sequence_hash: int | None,
        block_hash: int | None,
        priority: int,
        refs: int,
    ) -> None:
        self.state[block_id] = LINKED
        self.seq[block_id] = sequence_hash
        self.has_parent[block_id] = parent_sequence_hash is not None
        self.parent[block_id] = parent_sequence_hash or 0
        if block_hash is not None:
            self.block_hash[block_id] = block_hash
        self.prio[block_id] = priority
        self.refs[block_id] = refs

    def clear(self, block_id: int) -> None:
        """Back to FREE (the numeric columns are overwritten on next use)."""
        self.state[block_id] = FREE
        self.refs[block_id] = 0
        self.has_parent[block_id] = 0
        self.block_hash.pop(block_id, None)
        self.tokens.pop(block_id, None)

    def used_rows(self) -> range:
        return range(len(self.state))
