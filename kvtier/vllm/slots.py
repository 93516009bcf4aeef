"""The scheduler half's record of what G2 and G3 hold: sequence hash <-> slot, with LRU eviction.

Why this exists: in vLLM the scheduler and the workers may live in different processes, so the
scheduler half cannot ask the worker what a tier holds. It keeps this index itself and tells the
workers exactly which slot to fill or read; the workers only move bytes and report back. A slot is
a G2 host row, or a G3 capacity unit (G3 files are named by hash; the slot only counts capacity).

Slot life: free -> pending (reserved for a store in flight, pinned, not matchable) -> ready
(matchable) -> evicted (free again). ``pin``/``unpin`` protect a ready slot while a load or a G2->G3
copy reads it; only unpinned ready slots are evicted, least recently used first. Pure Python, no
torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["FrequencyFilter", "SlotIndex"]


@dataclass
class _Entry:
    slot: int
    ready: bool
    pins: int
    doomed: bool = False


class SlotIndex:
    """A fixed number of slots keyed by sequence hash (see the module docstring)."""

    def __init__(self, name: str, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"{name}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._by_hash: dict[int, _Entry] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # ready, unpinned; oldest first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, seq_hash: int) -> bool:
        """Held in any state (pending or ready): a store of it would be a duplicate."""
        return seq_hash in self._by_hash

    def lookup(self, seq_hash: int) -> int | None:
        """The slot of a ready (matchable) block, or None."""
        e = self._by_hash.get(seq_hash)
        return e.slot if e is not None and e.ready and not e.doomed else None

    def touch(self, seq_hash: int) -> None:
        """Mark a ready block as recently used."""
        if seq_hash in self._lru:
            self._lru.move_to_end(seq_hash)

    def reserve(self, seq_hash: int) -> tuple[int, list[int]] | None:
        """Take a slot for a new block (pending, pinned once); evicts LRU blocks if needed.

        Returns ``(slot, evicted_hashes)``, or None when every slot is pending or pinned.
        """
        if seq_hash in self._by_hash:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is already held")
        evicted: list[int] = []
        if not self._free:
            if not self._lru:
                return None
            victim, _ = self._lru.popitem(last=False)
            e = self._by_hash.pop(victim)
            self._free.append(e.slot)
            self.evictions += 1
            evicted.append(victim)
        slot = self._free.pop()
        self._by_hash[seq_hash] = _Entry(slot, ready=False, pins=1)
        return slot, evicted

    def commit(self, seq_hash: int) -> None:
        """A pending block's bytes landed: it becomes matchable (and drops its store pin)."""
        e = self._entry(seq_hash)
        if e.ready:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is already committed")
        e.ready = True
        self._unpin_entry(seq_hash, e)

    def abort(self, seq_hash: int) -> None:
        """A pending block's store failed: drop its store pin; the slot is freed once no other
        pin (a copy planned from it) remains."""
        e = self._entry(seq_hash)
        if e.ready:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is committed, not pending")
        e.doomed = True
        self._unpin_entry(seq_hash, e)

    def slot_of(self, seq_hash: int) -> int | None:
        """The slot of a held block in any state (pending included), unless it is being dropped."""
        e = self._by_hash.get(seq_hash)
        return e.slot if e is not None and not e.doomed else None

    def pin(self, seq_hash: int, *, pending_ok: bool = False) -> int:
        """Protect a block from eviction while it is read; returns its slot.

        ``pending_ok``: the block may still be pending (a copy ordered after its store).
        """
        e = self._entry(seq_hash)
        if e.doomed or not (e.ready or pending_ok):
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is not matchable")
        if e.pins == 0:
            self._lru.pop(seq_hash, None)
        e.pins += 1
        return e.slot

    def unpin(self, seq_hash: int) -> None:
        """Drop one pin taken by ``pin``."""
        self._unpin_entry(seq_hash, self._entry(seq_hash))

    def remove(self, seq_hash: int) -> bool:
        """Forget a block (e.g. its stored bytes are corrupt); deferred while it is pinned.

        Returns True if it was held.
        """
        e = self._by_hash.get(seq_hash)
        if e is None:
            return False
        if e.pins:
            e.doomed = True
            return True
        self._drop(seq_hash, e)
        return True

    def restore(self, hashes: Iterable[int]) -> list[int]:
        """Adopt blocks found on persistent storage at start (ready, unpinned, in the given order
        as oldest first). Returns the hashes that did not fit and were not adopted."""
        left: list[int] = []
        for h in hashes:
            if h in self._by_hash:
                continue
            if not self._free:
                left.append(h)
                continue
            self._by_hash[h] = _Entry(self._free.pop(), ready=True, pins=0)
            self._lru[h] = None
        return left

    def ready_hashes(self) -> list[int]:
        return [h for h, e in self._by_hash.items() if e.ready and not e.doomed]

    def check_invariants(self) -> None:
        """Every slot is free or held exactly once; the LRU is exactly the unpinned ready set."""
        held = [e.slot for e in self._by_hash.values()]
        assert len(held) == len(set(held)), f"{self.name}: a slot is held twice"
        assert not set(held) & set(self._free), f"{self.name}: a held slot is also free"
        assert len(held) + len(self._free) == self.num_slots, f"{self.name}: slots leaked"
        assert all(0 <= s < self.num_slots for s in held + self._free), f"{self.name}: bad slot"
        want = {h for h, e in self._by_hash.items() if e.ready and e.pins == 0 and not e.doomed}
        assert set(self._lru) == want, f"{self.name}: LRU set differs from unpinned ready blocks"
        assert all(e.pins >= 0 for e in self._by_hash.values()), f"{self.name}: negative pins"
        assert all(e.pins > 0 for e in self._by_hash.values() if not e.ready), (
            f"{self.name}: a pending block lost its pins"
        )

    def pin_counts(self) -> dict[int, int]:
        """Pins held per hash (pinned blocks only)."""
        return {h: e.pins for h, e in self._by_hash.items() if e.pins}

    @property
    def num_pinned(self) -> int:
        return sum(1 for e in self._by_hash.values() if e.pins)

    def _entry(self, seq_hash: int) -> _Entry:
        e = self._by_hash.get(seq_hash)
        if e is None:
            raise KeyError(f"{self.name}: hash {seq_hash:#x} is not held")
        return e

    def _unpin_entry(self, seq_hash: int, e: _Entry) -> None:
        if e.pins <= 0:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is not pinned")
        e.pins -= 1
        if e.pins == 0:
            if e.doomed:
                self._drop(seq_hash, e)
            elif e.ready:
                self._lru[seq_hash] = None

    def _drop(self, seq_hash: int, e: _Entry) -> None:
        del self._by_hash[seq_hash]
        self._lru.pop(seq_hash, None)
        self._free.append(e.slot)


class FrequencyFilter:
    """The G2->G3 admission filter of Dynamo KVBM: admit a block once it has been seen twice.

    A hash's count starts at 1 on its first sighting and doubles on each later one; it decays by 1
    every ``decay_s`` seconds. A block is admitted when its count reaches 2. ``enabled=False``
    admits everything. The clock is injected so tests control time.
    """

    def __init__(
        self, *, enabled: bool, clock: Callable[[], float], decay_s: float = 600.0
    ) -> None:
        self.enabled = enabled
        self._clock = clock
        self._decay_s = decay_s
        self._counts: dict[int, tuple[int, float]] = {}
        self.rejections = 0  # sightings that did not admit the block (read by metrics)

    def sighting(self, seq_hash: int) -> bool:
        """Record one sighting; return True when the block should go to G3."""
        if not self.enabled:
            return True
        now = self._clock()
        count, last = self._counts.get(seq_hash, (0, now))
        count = max(0, count - int((now - last) // self._decay_s))
        count = 1 if count == 0 else count * 2
        self._counts[seq_hash] = (count, now)
        if count < 2:
            self.rejections += 1
        return count >= 2

    def forget(self, seq_hash: int) -> None:
        self._counts.pop(seq_hash, None)
