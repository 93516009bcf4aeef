"""A pool's eviction order: inactive leaves in a heap, lowest ``(priority, release tick)`` first.

Why apart from the pool: the order is its own rule set. Candidates are inactive leaves:
registered, ref count 0, and no registered child in the pool (a child keeps its parent alive).
The heap deletes lazily (an entry is valid while its key still matches the slot) and is compacted
when it is more than half stale, so every operation is O(log n), never O(pool).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvtier.core import slot_table as st
from kvtier.core.slot_table import SlotTable


class EvictionHeap:
    """The candidates of one pool; ``children`` is the pool's own child-count dict, shared."""

    def __init__(self, slots: SlotTable, children: dict[int, int]) -> None:
        self._slots = slots
        self._children = children  # parent sequence hash -> LINKED children in the pool
        self.entries: list[tuple[int, int, int]] = []  # (priority, tick, block_id), lazy

    def push(self, block_id: int, num_inactive: int) -> None:
        slots = self._slots
        heapq.heappush(self.entries, (slots.prio[block_id], slots.tick[block_id], block_id))
        if len(self.entries) > 2 * num_inactive + 1024:
            self.entries = sorted({e for e in self.entries if self.is_candidate(e)})

    def is_candidate(self, entry: tuple[int, int, int]) -> bool:
        priority, tick, block_id = entry
        slots = self._slots
        return (
            slots.state[block_id] == st.LINKED
            and slots.refs[block_id] == 0
            and slots.tick[block_id] == tick
            and slots.prio[block_id] == priority
            and slots.seq[block_id] not in self._children
        )

    def pick(
        self, n: int, all_or_nothing: bool, child_gone: Callable[[int], None]
    ) -> list[int] | None:
        """Choose ``n`` victims in order, detaching each from its parent (``child_gone``) so the
        parent can follow; on shortfall with ``all_or_nothing``, reattach them all, return None."""
        victims: list[int] = []
        chosen: set[int] = set()
        slots = self._slots
        while len(victims) < n and self.entries:
            entry = heapq.heappop(self.entries)
            block_id = entry[2]
            if block_id in chosen or not self.is_candidate(entry):
                continue
            chosen.add(block_id)
            victims.append(block_id)
            parent = slots.parent_of(block_id)
            if parent is not None:
                child_gone(parent)
        if len(victims) == n or not all_or_nothing:
            return victims
        for block_id in reversed(victims):
            parent = slots.parent_of(block_id)
            if parent is not None:
                self._children[parent] = self._children.get(parent, 0) + 1
            heapq.heappush(self.entries, (slots.prio[block_id], slots.tick[block_id], block_id))
        return None
