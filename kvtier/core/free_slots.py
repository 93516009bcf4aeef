"""The free slots of a pool: hands out the lowest free id first, in O(log n), built in O(1).

Why this shape: a pool of a million slots must construct instantly (no per-slot objects up front)
and ``restore`` must be able to claim one specific free slot. Ids never handed out are implicit
(``>= next_fresh``); ids given back live in a heap plus a set, and the set decides whether a heap
entry is still valid (lazy deletion), so claiming a specific id is O(1).
"""

from __future__ import annotations

import heapq

from kvtier.core.errors import InvariantError, PoolError

__all__ = ["FreeSlots"]


class FreeSlots:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._next_fresh = 0  # every id >= this was never handed out, so is free
        self._heap: list[int] = []  # given-back ids, possibly with stale copies
        self._free: set[int] = set()  # the given-back ids that are free now

    @property
    def num_free(self) -> int:
        return self._capacity - self._next_fresh + len(self._free)

    def is_free(self, block_id: int) -> bool:
        return 0 <= block_id < self._capacity and (
            block_id >= self._next_fresh or block_id in self._free
        )

    def pop(self) -> int:
        """Take the lowest free id."""
        heap, free = self._heap, self._free
        while heap:
            block_id = heapq.heappop(heap)
            if block_id in free:
                free.remove(block_id)
                return block_id
        if self._next_fresh >= self._capacity:
            raise PoolError("no free slot")
        self._next_fresh += 1
        return self._next_fresh - 1

    def put(self, block_id: int) -> None:
        """Give an id back."""
        if self.is_free(block_id):
            raise PoolError(f"slot {block_id} is already free")
        self._free.add(block_id)
        heapq.heappush(self._heap, block_id)

    def take(self, block_id: int) -> None:
        """Claim one specific free id (its heap copy, if any, goes stale)."""
        if not self.is_free(block_id):
            raise PoolError(
                f"slot {block_id} is not free (or out of range 0..{self._capacity - 1})"
            )
        if block_id in self._free:
            self._free.remove(block_id)
            return
        for gap in range(self._next_fresh, block_id):
            self._free.add(gap)
            heapq.heappush(self._heap, gap)
        self._next_fresh = block_id + 1

    def check(self) -> None:
        if not 0 <= self._next_fresh <= self._capacity:
            raise InvariantError(f"next_fresh {self._next_fresh} outside 0..{self._capacity}")
        if any(not 0 <= i < self._next_fresh for i in self._free):
            raise InvariantError("a given-back free id is outside the handed-out range")
        if not self._free.issubset(self._heap):
            raise InvariantError("a given-back free id has no heap entry")
