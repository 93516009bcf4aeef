"""A tier's pool of block slots: allocation, registration (dedup), prefix match, eviction.

Why: every tier (G1 device, G2 host, G3 disk) needs the same bookkeeping over a fixed number of
slots; only the bytes differ, and those live in the data plane. This is pure Python, no torch.

Eviction candidates are inactive leaves: registered, ref count 0, and no registered child in this
pool (a child keeps its parent alive). The victim is the candidate with the lowest
``(priority, release tick)``: lowest priority first, then least recently released. Candidates sit in
a heap with lazy deletion (an entry is valid while its key still matches the slot), compacted when
it is more than half stale, so every operation is O(log n) in the blocks it touches, never O(pool).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvtier.core.block import BlockState, ImmutableBlock, MutableBlock, Slot
from kvtier.core.errors import BlockStateError, InvariantError, PoolError
from kvtier.core.free_slots import FreeSlots
from kvtier.core.registry import TierRegistry

__all__ = ["BlockPool"]

_U64_MAX = 2**64 - 1


def _check_hash(name: str, value: int | None, *, optional: bool = False) -> None:
    if type(value) is int and 0 <= value <= _U64_MAX:  # the common case, checked cheaply
        return
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name} must be an int in the u64 range [0, 2**64), got {value!r}")


def _check_int(name: str, value: int, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class BlockPool:
    """Slots ``0..num_blocks-1`` of one tier. Constructing it has no side effects."""

    def __init__(
        self,
        num_blocks: int,
        *,
        block_size: int = 16,
        tier: str = "G1",
        registry: TierRegistry | None = None,
    ) -> None:
        _check_int("num_blocks", num_blocks, 1)
        _check_int("block_size", block_size, 1)
        if not isinstance(tier, str) or not tier:
            raise ValueError(f"tier must be a non-empty str, got {tier!r}")
        self._capacity = num_blocks
        self._block_size = block_size
        self._tier = tier
        self._registry = registry
        self._free = FreeSlots(num_blocks)
        self._slots: dict[int, Slot] = {}  # every slot that is not free
        self._by_hash: dict[int, Slot] = {}  # registered and linked slots
        self._children: dict[int, int] = {}  # parent sequence hash -> linked children here
        self._evictable: list[tuple[int, int, int]] = []  # (priority, tick, block_id), lazy
        self._num_inactive = 0
        self._tick = 0

    # -- sizes --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def tier(self) -> str:
        return self._tier

    @property
    def registry(self) -> TierRegistry | None:
        return self._registry

    @property
    def num_free(self) -> int:
        """Slots in RESET state, owned by nobody."""
        return self._free.num_free

    @property
    def num_inactive(self) -> int:
        """Registered blocks with ref count 0: matchable; reclaimable unless a child pins them."""
        return self._num_inactive

    @property
    def num_active(self) -> int:
        """Slots held through a handle (mutable blocks, and registered blocks with refs)."""
        return len(self._slots) - self._num_inactive

    @property
    def num_registered(self) -> int:
        return len(self._by_hash)

    # -- verbs --------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[MutableBlock] | None:
        """``n`` RESET blocks, lowest free ids first, evicting if needed; None if impossible.

        All or nothing: when it returns None, nothing was evicted.
        """
        _check_int("n", n, 0)
        short = n - self._free.num_free
        if short > 0:
            if short > self._num_inactive:
                return None
            victims = self._pick_victims(short, all_or_nothing=True)
            if victims is None:
                return None
            for slot in victims:
                self._drop(slot)
        blocks = []
        for _ in range(n):
            slot = Slot(self._free.pop())
            self._slots[slot.block_id] = slot
            blocks.append(MutableBlock(self, slot))
        return blocks

    def evict(self, n: int) -> list[int]:
        """Evict up to ``n`` blocks in eviction order; returns their sequence hashes."""
        _check_int("n", n, 0)
        victims = self._pick_victims(n, all_or_nothing=False) or []
        for slot in victims:
            self._drop(slot)
        return [slot.sequence_hash for slot in victims]

    def register(
        self,
        block: MutableBlock,
        sequence_hash: int,
        *,
        parent_sequence_hash: int | None = None,
        block_hash: int | None = None,
        priority: int = 0,
    ) -> ImmutableBlock:
        """Make a COMPLETE block immutable and matchable; consumes ``block``.

        If ``sequence_hash`` is already registered, returns a new handle on that block and frees
        ``block`` (dedup). A parent that disagrees with the registered one raises, changing nothing.
        """
        slot = self._own(block, MutableBlock)
        _check_hash("sequence_hash", sequence_hash)
        _check_hash("parent_sequence_hash", parent_sequence_hash, optional=True)
        _check_hash("block_hash", block_hash, optional=True)
        _check_int("priority", priority)
        if slot.state is not BlockState.COMPLETE:
            raise BlockStateError(
                f"only a COMPLETE block can be registered; block {slot.block_id} is "
                f"{slot.state.name}"
            )
        if parent_sequence_hash == sequence_hash:
            raise ValueError(f"block {sequence_hash} cannot be its own parent")
        existing = self._by_hash.get(sequence_hash)
        if existing is not None:
            known = existing.parent_sequence_hash
            if None not in (known, parent_sequence_hash) and known != parent_sequence_hash:
                raise PoolError(
                    f"sequence hash {sequence_hash} is registered with parent {known}, "
                    f"not {parent_sequence_hash}"
                )
            self._dispose(block, slot)
            self._acquire(existing)
            return ImmutableBlock(self, existing)
        if self._registry is not None:
            self._registry.record_store(self._tier, sequence_hash, parent_sequence_hash, block_hash)
        block._alive = False
        slot.state = BlockState.REGISTERED
        slot.sequence_hash = sequence_hash
        slot.parent_sequence_hash = parent_sequence_hash
        slot.block_hash = block_hash
        slot.priority = priority
        slot.ref_count = 1
        self._link(slot)
        return ImmutableBlock(self, slot)

    def match(self, sequence_hashes: Sequence[int]) -> list[ImmutableBlock]:
        """Handles on the longest registered prefix of ``sequence_hashes`` (stops at first miss)."""
        get = self._by_hash.get
        handles: list[ImmutableBlock] = []
        append = handles.append
        woken = 0  # blocks that go from inactive to active (inlined _acquire: this is the hot loop)
        for h in sequence_hashes:
            slot = get(h)
            if slot is None:
                break
            if not slot.ref_count:
                woken += 1
            slot.ref_count += 1
            append(ImmutableBlock(self, slot))
        self._num_inactive -= woken
        return handles

    def contains(self, sequence_hash: int) -> bool:
        """Whether the hash is registered here (takes no reference, refreshes nothing)."""
        return sequence_hash in self._by_hash

    def lookup(self, sequence_hash: int) -> int | None:
        """Block id holding ``sequence_hash``, or None (takes no reference)."""
        slot = self._by_hash.get(sequence_hash)
        return None if slot is None else slot.block_id

    def remove(self, sequence_hash: int) -> bool:
        """Unregister a block (e.g. found corrupt). Its slot is freed now if inactive, else when
        the last handle is released; from now on it is not matchable. False if not registered."""
        slot = self._by_hash.get(sequence_hash)
        if slot is None:
            return False
        if slot.ref_count == 0:
            self._num_inactive -= 1
        self._unlink(slot)
        if slot.parent_sequence_hash is not None:
            self._child_gone(slot.parent_sequence_hash)
        if slot.ref_count == 0:
            self._free_slot(slot)
        return True

    def restore(
        self,
        block_id: int,
        sequence_hash: int,
        *,
        parent_sequence_hash: int | None = None,
        priority: int = 0,
        block_hash: int | None = None,
    ) -> None:
        """Adopt free slot ``block_id`` as an inactive registered block (rebuilding an index)."""
        _check_int("block_id", block_id)
        _check_hash("sequence_hash", sequence_hash)
        _check_hash("parent_sequence_hash", parent_sequence_hash, optional=True)
        _check_hash("block_hash", block_hash, optional=True)
        _check_int("priority", priority)
        if parent_sequence_hash == sequence_hash:
            raise ValueError(f"block {sequence_hash} cannot be its own parent")
        if sequence_hash in self._by_hash:
            raise PoolError(f"sequence hash {sequence_hash} is already registered in {self._tier}")
        if not self._free.is_free(block_id):
            raise PoolError(f"slot {block_id} of {self._tier} is not free")
        if self._registry is not None:
            self._registry.record_store(self._tier, sequence_hash, parent_sequence_hash, block_hash)
        self._free.take(block_id)
        slot = Slot(
            block_id,
            BlockState.REGISTERED,
            sequence_hash=sequence_hash,
            parent_sequence_hash=parent_sequence_hash,
            block_hash=block_hash,
            priority=priority,
        )
        self._slots[block_id] = slot
        self._link(slot)
        self._became_inactive(slot)

    def release(self, handle: MutableBlock | ImmutableBlock) -> None:
        """Give a handle back. Releasing a handle twice raises."""
        if isinstance(handle, MutableBlock):
            slot = self._own(handle, MutableBlock)
            self._dispose(handle, slot)
            return
        slot = self._own(handle, ImmutableBlock)
        handle._alive = False
        slot.ref_count -= 1
        if slot.ref_count > 0:
            return
        if slot.linked:
            self._became_inactive(slot)
        else:  # removed while held
            self._free_slot(slot)

    # -- internals ----------------------------------------------------------------------------
    def _own(self, handle: MutableBlock | ImmutableBlock, kind: type) -> Slot:
        if not isinstance(handle, kind):
            raise TypeError(f"expected a {kind.__name__}, got {type(handle).__name__}")
        if handle._pool is not self:
            raise PoolError(f"block {handle.block_id} belongs to another pool than {self._tier}")
        return handle._check_alive()

    def _dispose(self, block: MutableBlock, slot: Slot) -> None:
        block._alive = False
        self._free_slot(slot)

    def _free_slot(self, slot: Slot) -> None:
        slot.state = BlockState.RESET
        slot.tokens = ()
        del self._slots[slot.block_id]
        self._free.put(slot.block_id)

    def _acquire(self, slot: Slot) -> None:
        if slot.ref_count == 0:
            self._num_inactive -= 1
        slot.ref_count += 1

    def _link(self, slot: Slot) -> None:
        slot.linked = True
        self._by_hash[slot.sequence_hash] = slot
        parent = slot.parent_sequence_hash
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1

    def _unlink(self, slot: Slot) -> None:
        """Forget the hash (the caller fixes the parent's child count and frees the slot)."""
        if self._registry is not None:
            self._registry.record_remove(self._tier, slot.sequence_hash)
        slot.linked = False
        del self._by_hash[slot.sequence_hash]

    def _became_inactive(self, slot: Slot) -> None:
        self._num_inactive += 1
        self._tick += 1
        slot.release_tick = self._tick
        if slot.sequence_hash not in self._children:
            self._push_candidate(slot)

    def _push_candidate(self, slot: Slot) -> None:
        heapq.heappush(self._evictable, (slot.priority, slot.release_tick, slot.block_id))
        if len(self._evictable) > 2 * self._num_inactive + 1024:
            live = {e for e in self._evictable if self._is_candidate(e)}
            self._evictable = sorted(live)

    def _is_candidate(self, entry: tuple[int, int, int]) -> bool:
        priority, tick, block_id = entry
        slot = self._slots.get(block_id)
        return (
            slot is not None
            and slot.linked
            and slot.ref_count == 0
            and slot.release_tick == tick
            and slot.priority == priority
            and slot.sequence_hash not in self._children
        )

    def _child_gone(self, parent: int) -> None:
        left = self._children[parent] - 1
        if left:
            self._children[parent] = left
            return
        del self._children[parent]
        slot = self._by_hash.get(parent)
        if slot is not None and slot.ref_count == 0:
            self._push_candidate(slot)

    def _pick_victims(self, n: int, *, all_or_nothing: bool) -> list[Slot] | None:
        """Choose ``n`` victims in eviction order, detaching each from its parent so the parent
        can follow; on shortfall with ``all_or_nothing``, reattach them all and return None."""
        victims: list[Slot] = []
        chosen: set[int] = set()
        heap = self._evictable
        while len(victims) < n and heap:
            entry = heapq.heappop(heap)
            if entry[2] in chosen or not self._is_candidate(entry):
                continue
            slot = self._slots[entry[2]]
            chosen.add(slot.block_id)
            victims.append(slot)
            if slot.parent_sequence_hash is not None:
                self._child_gone(slot.parent_sequence_hash)
            heap = self._evictable  # _child_gone may have compacted it
        if len(victims) == n or not all_or_nothing:
            return victims
        for slot in reversed(victims):
            parent = slot.parent_sequence_hash
            if parent is not None:
                self._children[parent] = self._children.get(parent, 0) + 1
            heapq.heappush(self._evictable, (slot.priority, slot.release_tick, slot.block_id))
        return None

    def _drop(self, victim: Slot) -> None:
        """Evict a victim chosen by ``_pick_victims`` (its parent link is already undone)."""
        self._num_inactive -= 1
        self._unlink(victim)
        self._free_slot(victim)

    # -- verification -------------------------------------------------------------------------
    def _tokens_fit(self, slot: Slot) -> bool:
        n = len(slot.tokens)
        if slot.state is BlockState.RESET:
            return n == 0
        if slot.state is BlockState.PARTIAL:
            return 0 < n < self._block_size
        return n in (0, self._block_size)  # COMPLETE: by tokens, or marked (bytes only)

    def check_invariants(self) -> None:
        """Verify every structure against the others; raises InvariantError naming the break."""

        def fail(msg: str) -> None:
            raise InvariantError(f"pool {self._tier}: {msg}")

        self._free.check()
        if self._free.num_free + len(self._slots) != self._capacity:
            fail(f"{self._free.num_free} free + {len(self._slots)} used != {self._capacity}")
        inactive = 0
        children: dict[int, int] = {}
        for block_id, slot in self._slots.items():
            if slot.block_id != block_id or self._free.is_free(block_id):
                fail(f"slot {block_id} is both used and free, or filed under the wrong id")
            if slot.state is BlockState.REGISTERED:
                if slot.linked != (self._by_hash.get(slot.sequence_hash) is slot):
                    fail(f"slot {block_id}: linked flag disagrees with the hash index")
                if not slot.linked and slot.ref_count <= 0:
                    fail(f"slot {block_id}: unlinked with no reference (leaked)")
                if slot.ref_count < 0:
                    fail(f"slot {block_id}: negative ref count {slot.ref_count}")
                if slot.linked and slot.ref_count == 0:
                    inactive += 1
                if slot.linked and slot.parent_sequence_hash is not None:
                    p = slot.parent_sequence_hash
                    children[p] = children.get(p, 0) + 1
            elif slot.ref_count or slot.linked or not self._tokens_fit(slot):
                fail(f"slot {block_id}: mutable block in an impossible state {slot}")
        for h, slot in self._by_hash.items():
            if slot.sequence_hash != h or self._slots.get(slot.block_id) is not slot:
                fail(f"hash index entry {h} points at a slot that is not in use under it")
        if inactive != self._num_inactive:
            fail(f"num_inactive is {self._num_inactive}, counted {inactive}")
        if children != self._children:
            fail("child counts disagree with the registered blocks' parents")
        entries = {e for e in self._evictable if self._is_candidate(e)}
        for slot in self._by_hash.values():
            leaf = slot.ref_count == 0 and slot.sequence_hash not in children
            if leaf and (slot.priority, slot.release_tick, slot.block_id) not in entries:
                fail(f"evictable block {slot.block_id} is missing from the eviction heap")
        if self._registry is not None:
            if self._registry.count(self._tier) != len(self._by_hash):
                fail("registry count disagrees with the hash index")
            for h in self._by_hash:
                if not self._registry.holds(self._tier, h):
                    fail(f"registry does not know that {self._tier} holds {h}")
