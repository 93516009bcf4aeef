"""The planner's record of what G2 and G3 hold, on the control plane's ``BlockPool``.

Why: the scheduler half cannot ask a worker (maybe in another process) what a tier holds, so it
keeps this index and tells the workers which slot to fill or read; they move bytes and report. A
slot is a G2 host row, or a G3 capacity unit (G3 files are named by hash; the slot counts room).

``SlotIndex`` adds the connector's asynchrony to a ``kvtier.core.BlockPool``: a slot reserved for
a store in flight is a pool ``MutableBlock`` (pending: held, not matchable); when the worker
reports the bytes landed it is registered (ready, matchable, deduplicated, evicted leaf-first by
the pool's policy); a pin is a pool reference (``match``), so a block being read by a load or a
G2->G3 copy is never evicted. The pool reports each arrival and departure to the ``TierRegistry``
given: the one record of tier contents that telemetry reads. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvtier.core.block import ImmutableBlock, MutableBlock
from kvtier.core.pool import BlockPool
from kvtier.core.registry import TierRegistry

__all__ = ["SlotIndex"]


@dataclass(slots=True)
class _Pending:
    block: MutableBlock
    parent: int | None
    pins: int = 1  # the store itself, plus copies planned from the slot before it lands
    failed: bool = False  # aborted (kept only while copies planned from it still hold pins)
    reports: int = 0  # workers that reported the store (``report``)
    any_failed: bool = False  # a worker reported it failed
    since: float | None = None  # when the copy was planned (None: not timed)
    priority: int = 0  # eviction priority once registered (lowest evicted first)


class SlotIndex:
    """A tier's slots keyed by sequence hash (see the module docstring)."""

    def __init__(self, name: str, num_slots: int, *, registry: TierRegistry | None = None) -> None:
        if num_slots < 0:
            raise ValueError(f"{name}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self.pool: BlockPool | None = (
            BlockPool(num_slots, tier=name, registry=registry) if num_slots else None
        )
        self._pending: dict[int, _Pending] = {}
        self._pins: dict[int, list[ImmutableBlock]] = {}
        self._ready: set[int] = set()  # registered hashes, for clear()
        self.in_flight = 0
        """Pending blocks whose store is not yet committed or aborted."""
        self.evictions = 0
        self.usable = num_slots
        """Slots ``[0, usable)`` may be handed out (G2 rows not yet page-locked are not)."""

    def set_usable(self, n: int) -> None:
        """Allow slots ``[0, n)`` (never fewer than before; clamped to the tier's size). The pool
        hands out the lowest free slot first, so while at most ``usable`` slots are in use every
        slot handed out lies below ``usable``: ``reserve`` keeps it so by evicting instead of
        taking a new slot once ``usable`` slots are in use."""
        self.usable = max(self.usable, min(n, self.num_slots))

    def limit_usable(self, n: int) -> None:
        """Start with only slots ``[0, n)`` usable (before anything is reserved)."""
        if len(self):
            raise ValueError(f"{self.name}: limit_usable after slots were taken")
        self.usable = max(0, min(n, self.num_slots))

    def __len__(self) -> int:
        return len(self._pending) + (self.pool.num_registered if self.pool else 0)

    def __contains__(self, seq_hash: int) -> bool:
        """Held in any state (pending or ready): a store of it would be a duplicate."""
        return seq_hash in self._pending or (self.pool is not None and self.pool.contains(seq_hash))

    def lookup(self, seq_hash: int) -> int | None:
        """The slot of a ready (matchable) block, or None."""
        return self.pool.lookup(seq_hash) if self.pool is not None else None

    def slot_of(self, seq_hash: int) -> int | None:
        """The slot of a held block in any state (pending included), unless its store failed."""
        p = self._pending.get(seq_hash)
        if p is not None:
            return None if p.failed else p.block.block_id
        return self.lookup(seq_hash)

    def describe(self, seq_hash: int) -> tuple[int | None, int]:
        """``(parent, priority)`` of a held block (what a copy of it to another tier carries);
        a ready block is touched, like ``touch``."""
        p = self._pending.get(seq_hash)
        if p is not None:
            return p.parent, p.priority
        assert self.pool is not None
        with self.pool.match([seq_hash])[0] as handle:
            return handle.parent_sequence_hash, handle.priority

    def touch(self, seq_hash: int) -> None:
        """Mark a ready block as recently used (a reference taken and given back)."""
        if self.pool is not None and self.pool.contains(seq_hash):
            for handle in self.pool.match([seq_hash]):
                self.pool.release(handle)

    def reserve(
        self,
        seq_hash: int,
        parent: int | None = None,
        since: float | None = None,
        priority: int = 0,
    ) -> tuple[int, list[int]] | None:
        """Take a slot for a new block (pending, pinned once by its store); evicts if needed.
        ``since``: when its copy was planned (read back by ``planned_at``, for copy timings);
        ``priority``: the block's eviction priority once it lands. Returns ``(slot,
        evicted_hashes)``, or None when every slot is pending or in use."""
        pool = self.pool
        if seq_hash in self._pending or (pool is not None and pool.contains(seq_hash)):
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is already held")
        if pool is None or self.usable == 0:
            return None
        evicted: list[int] = []
        free = pool.num_free
        if free == 0 or self.num_slots - free >= self.usable:
            evicted = pool.evict(1)
            if not evicted:
                return None
            self.evictions += len(evicted)
            self._ready.difference_update(evicted)
        blocks = pool.allocate(1)
        if blocks is None:  # cannot happen after a successful evict; kept as a guard
            return None
        block = blocks[0]
        self._pending[seq_hash] = _Pending(block, parent, 1, False, 0, False, since, priority)
        self.in_flight += 1
        return block.block_id, evicted

    def planned_at(self, seq_hash: int) -> float | None:
        """The ``since`` a pending block was reserved with (None if not pending or untimed)."""
        p = self._pending.get(seq_hash)
        return p.since if p is not None else None

    def report(self, seq_hash: int, *, ok: bool, needed: int) -> bool | None:
        """Count one worker's outcome of a pending store; once ``needed`` workers reported,
        commit it (True) or, if any failed, abort it (False). None until then, and for a hash
        with no store in flight (a late or repeated report)."""
        p = self._pending.get(seq_hash)
        if p is None or p.failed:
            return None
        p.reports += 1
        p.any_failed = p.any_failed or not ok
        if p.reports < needed:
            return None
        if p.any_failed:
            self.abort(seq_hash)
            return False
        self.commit(seq_hash)
        return True

    def commit(self, seq_hash: int) -> None:
        """A pending block's bytes landed: it becomes matchable (and drops its store pin)."""
        p = self._pending.get(seq_hash)
        if p is None or p.failed:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is not pending")
        assert self.pool is not None
        del self._pending[seq_hash]
        self.in_flight -= 1
        p.block.mark_complete()
        handle = self.pool.register(
            p.block, seq_hash, parent_sequence_hash=p.parent, priority=p.priority
        )
        self._ready.add(seq_hash)
        extra = p.pins - 1
        if extra:
            held = self._pins.setdefault(seq_hash, [handle])
            held.extend(self.pool.match([seq_hash])[0] for _ in range(extra - 1))
        else:
            self.pool.release(handle)

    def abort(self, seq_hash: int) -> None:
        """A pending block's store failed: drop its store pin; the slot is freed once no other
        pin (a copy planned from it) remains."""
        p = self._pending.get(seq_hash)
        if p is None:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is not pending")
        if p.failed:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} was aborted already")
        p.failed = True
        self.in_flight -= 1
        self._unpin_pending(seq_hash, p)

    def pin(self, seq_hash: int, *, pending_ok: bool = False) -> int:
        """Protect a block from eviction while it is read; returns its slot. ``pending_ok``: the
        block may still be pending (a copy ordered after its store)."""
        p = self._pending.get(seq_hash)
        if p is not None and pending_ok and not p.failed:
            p.pins += 1
            return p.block.block_id
        if self.pool is None or not self.pool.contains(seq_hash):
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is not matchable")
        (handle,) = self.pool.match([seq_hash])
        self._pins.setdefault(seq_hash, []).append(handle)
        return handle.block_id

    def pin_all(self, hashes: list[int]) -> list[int]:
        """``pin`` each of ``hashes`` (all ready), with one pool call; returns their slots."""
        handles = self.pool.match(hashes) if self.pool is not None and hashes else []
        if len(handles) != len(hashes):
            for handle in handles:
                handle.release()
            raise ValueError(f"{self.name}: hash {hashes[len(handles)]:#x} is not matchable")
        for h, handle in zip(hashes, handles, strict=True):
            self._pins.setdefault(h, []).append(handle)
        return [handle.block_id for handle in handles]

    def unpin(self, seq_hash: int) -> None:
        """Drop one pin taken by ``pin``."""
        p = self._pending.get(seq_hash)
        if p is not None:
            if p.pins <= 1 and not p.failed:
                raise ValueError(f"{self.name}: hash {seq_hash:#x} holds only its store pin")
            self._unpin_pending(seq_hash, p)
            return
        held = self._pins.get(seq_hash)
        if not held:
            raise ValueError(f"{self.name}: hash {seq_hash:#x} is not pinned")
        assert self.pool is not None
        self.pool.release(held.pop())
        if not held:
            del self._pins[seq_hash]

    def remove(self, seq_hash: int) -> bool:
        """Forget a ready block (e.g. its stored bytes are corrupt); its slot is freed when the
        last pin goes. Returns True if it was registered."""
        self._ready.discard(seq_hash)
        return self.pool is not None and self.pool.remove(seq_hash)

    def clear(self) -> list[int]:
        """Forget every ready block (a cache reset); returns their hashes. Pending blocks are
        left alone (the caller makes sure none are in flight)."""
        gone = list(self._ready)
        for h in gone:
            self.remove(h)
        return gone

    def restore(
        self,
        hashes: Iterable[int],
        parents: Mapping[int, int | None] | None = None,
        priorities: Mapping[int, int] | None = None,
    ) -> list[int]:
        """Adopt blocks found on persistent storage at start (ready, unpinned; among eviction
        candidates, the first given is the first evicted), linked to their parent in ``parents``
        (parents first, as ``plan_restore`` orders them), with their eviction priority in
        ``priorities`` (default 0). Returns the hashes that did not fit and were not adopted."""
        left: list[int] = []
        for h in hashes:
            if h in self:
                continue
            if self.pool is None or self.pool.num_free == 0:
                left.append(h)
                continue
            blocks = self.pool.allocate(1)
            assert blocks is not None
            slot = blocks[0].block_id
            self.pool.release(blocks[0])
            parent = parents.get(h) if parents is not None else None
            priority = priorities.get(h, 0) if priorities is not None else 0
            self.pool.restore(slot, h, parent_sequence_hash=parent, priority=priority)
            self._ready.add(h)
        return left

    def check_invariants(self) -> None:
        """The pool's own invariants, and every pin held is a live reference of the pool."""
        if self.pool is not None:
            self.pool.check_invariants()
        live = sum(1 for p in self._pending.values() if not p.failed)
        assert live == self.in_flight, f"{self.name}: {self.in_flight} in flight, {live} pending"
        for h, p in self._pending.items():
            assert p.block.alive and p.pins >= 1, f"{self.name}: pending {h:#x} lost its block"
            assert self.pool is not None and not self.pool.contains(h), (
                f"{self.name}: {h:#x} is both pending and registered"
            )
        for h, held in self._pins.items():
            assert held and all(x.alive for x in held), f"{self.name}: dead pin on {h:#x}"
        if self.pool is not None:
            pinned = len(self._pending) + len(self._pins)
            assert pinned <= self.pool.num_active, f"{self.name}: pins without pool references"

    def pin_counts(self) -> dict[int, int]:
        """Pins held per hash (pinned blocks only; a pending block's store counts as one)."""
        out = {h: p.pins for h, p in self._pending.items()}
        for h, held in self._pins.items():
            out[h] = out.get(h, 0) + len(held)
        return out

    def stores_in_flight(self) -> list[int]:
        """Hashes of the pending blocks whose store is neither committed nor aborted."""
        return [h for h, p in self._pending.items() if not p.failed]

    @property
    def num_pinned(self) -> int:
        return len(self.pin_counts())

    def _unpin_pending(self, seq_hash: int, p: _Pending) -> None:
        p.pins -= 1
        if p.pins == 0:
            del self._pending[seq_hash]
            assert self.pool is not None
            self.pool.release(p.block)
