"""A tier's pool of block slots: allocation, registration (dedup), prefix match, eviction.

Why: every tier (G1 device, G2 host, G3 disk) needs the same bookkeeping over a fixed number of
slots; only the bytes differ, and those live in the data plane. Elsewhere: the eviction order
(``kvtier.core.eviction``), the O(pool) verification and the invariants (``pool_invariants``), a
slot's states and how a ``MutableBlock`` fills it (``kvtier.core.block``). ``register`` and its
pre-check ``check_registration`` (``KvBlockManager.offload`` calls it) share the ``check_*``.

Eviction and the verbs: only inactive leaves are evicted (ref count 0, no registered child here), so
a chain is eaten from its tail and a shared prefix outlives its branches; among them the lowest
``priority`` first, then the least recently released or restored. ``match`` takes references, so the
next release refreshes recency; ``contains`` and ``lookup`` refresh nothing. A verb costs O(1) or
O(log n) per block it touches; only ``check_invariants()`` scans the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.core import slot_table as st
from kvtier.core.block import ImmutableBlock, ImmutableBlockGroup, MutableBlock
from kvtier.core.errors import BlockStateError, PoolError
from kvtier.core.eviction import EvictionHeap
from kvtier.core.free_slots import FreeSlots
from kvtier.core.pool_invariants import check_invariants as _check_invariants
from kvtier.core.registry import TierRegistry
from kvtier.core.slot_table import SlotTable

__all__ = ["BlockPool"]

U64_MAX = 2**64 - 1


def check_hash(name: str, value: int | None, *, optional: bool = False) -> None:
    if (type(value) is int and 0 <= value <= U64_MAX) or (value is None and optional):
        return  # the common case first, checked cheaply
    raise ValueError(f"{name} must be an int in the u64 range [0, 2**64), got {value!r}")


def check_int(name: str, value: int, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_priority(priority: int) -> None:
    check_int("priority", priority)
    if not st.INT64_MIN <= priority <= st.INT64_MAX:
        raise ValueError(f"priority must fit in 64 bits, got {priority}")


def check_registration(
    sequence_hash: int,
    *,
    parent_sequence_hash: int | None = None,
    block_hash: int | None = None,
    priority: int = 0,
) -> None:
    """Raise (ValueError/TypeError naming it) for any argument ``register`` would refuse. Why: a
    caller that registers only later (when a copy lands) checks first, so bad input fails before
    anything is allocated or moved, not inside ``poll``."""
    check_hash("sequence_hash", sequence_hash)
    check_hash("parent_sequence_hash", parent_sequence_hash, optional=True)
    check_hash("block_hash", block_hash, optional=True)
    check_priority(priority)
    if parent_sequence_hash == sequence_hash:
        raise ValueError(f"block {sequence_hash} cannot be its own parent")


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
        check_int("num_blocks", num_blocks, 1)
        check_int("block_size", block_size, 1)
        if not isinstance(tier, str) or not tier:
            raise ValueError(f"tier must be a non-empty str, got {tier!r}")
        self._capacity = num_blocks
        self._block_size = block_size
        self._tier = tier
        self._registry = registry
        self._free = FreeSlots(num_blocks)
        self._slots = SlotTable(num_blocks)
        self._by_hash: dict[int, int] = {}  # sequence hash -> block id, LINKED slots only
        self._children: dict[int, int] = {}  # parent sequence hash -> LINKED children here
        self._eviction = EvictionHeap(self._slots, self._children)
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
        """Slots owned by nobody."""
        return self._free.num_free

    @property
    def num_inactive(self) -> int:
        """Registered blocks with ref count 0: matchable; reclaimable unless a child pins them."""
        return self._num_inactive

    @property
    def num_active(self) -> int:
        """Slots held through a handle (mutable blocks, and registered blocks with refs)."""
        return self._capacity - self._free.num_free - self._num_inactive

    @property
    def num_registered(self) -> int:
        return len(self._by_hash)

    # -- verbs --------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[MutableBlock] | None:
        """``n`` RESET blocks, lowest free ids first, evicting only what the free slots lack; None
        if impossible, and then nothing was evicted (all or nothing)."""
        check_int("n", n, 0)
        short = n - self._free.num_free
        if short > 0:
            if short > self._num_inactive:
                return None
            victims = self._eviction.pick(short, True, self._child_gone)
            if victims is None:
                return None
            for block_id in victims:
                self._drop(block_id)
        pop, ensure, state = self._free.pop, self._slots.ensure, self._slots.state
        blocks = []
        for _ in range(n):
            block_id = pop()
            ensure(block_id)
            state[block_id] = st.RESET
            blocks.append(MutableBlock(self, block_id))
        return blocks

    def evict(self, n: int) -> list[int]:
        """Evict up to ``n`` blocks in eviction order; returns their sequence hashes."""
        check_int("n", n, 0)
        victims = self._eviction.pick(n, False, self._child_gone) or []
        hashes = [self._slots.seq[block_id] for block_id in victims]
        for block_id in victims:
            self._drop(block_id)
        return hashes

    def register(
        self,
        block: MutableBlock,
        sequence_hash: int,
        *,
        parent_sequence_hash: int | None = None,
        block_hash: int | None = None,
        priority: int = 0,
    ) -> ImmutableBlock:
        """Make a COMPLETE block immutable and matchable; consumes ``block``. If ``sequence_hash``
        is already registered, returns a new handle on that block and frees ``block`` (dedup). A
        parent that disagrees with the registered one raises, changing nothing."""
        if type(block) is MutableBlock and block._pool is self and block._alive:
            block_id = block._block_id  # the common case, checked cheaply (a hot path)
        else:
            block_id = self._own(block, MutableBlock)
        if not (type(sequence_hash) is int and 0 <= sequence_hash <= U64_MAX):
            check_hash("sequence_hash", sequence_hash)
        if parent_sequence_hash is not None or block_hash is not None:
            check_hash("parent_sequence_hash", parent_sequence_hash, optional=True)
            check_hash("block_hash", block_hash, optional=True)
        if not (type(priority) is int and st.INT64_MIN <= priority <= st.INT64_MAX):
            check_priority(priority)
        slots = self._slots
        if slots.state[block_id] != st.COMPLETE:
            raise BlockStateError(
                f"only a COMPLETE block can be registered; block {block_id} is {block.state.name}"
            )
        if parent_sequence_hash == sequence_hash:
            raise ValueError(f"block {sequence_hash} cannot be its own parent")
        existing = self._by_hash.get(sequence_hash)
        if existing is not None:
            known = slots.parent_of(existing)
            if None not in (known, parent_sequence_hash) and known != parent_sequence_hash:
                raise PoolError(
                    f"sequence hash {sequence_hash} is registered with parent {known}, "
                    f"not {parent_sequence_hash}"
                )
            block._alive = False
            self._free_slot(block_id)
            if not slots.refs[existing]:
                self._num_inactive -= 1
            slots.refs[existing] += 1
            return ImmutableBlock(self, existing)
        self._link(block_id, sequence_hash, parent_sequence_hash, block_hash, priority, refs=1)
        block._alive = False
        return ImmutableBlock(self, block_id)

    check_registration = staticmethod(check_registration)

    def match(self, sequence_hashes: Sequence[int]) -> list[ImmutableBlock]:
        """Handles on the longest registered prefix of ``sequence_hashes`` (stops at first miss)."""
        return [ImmutableBlock(self, block_id) for block_id in self._ref_prefix(sequence_hashes)]

    def match_group(self, sequence_hashes: Sequence[int]) -> ImmutableBlockGroup:
        """Like ``match``, but one handle for the whole matched prefix: about 3x cheaper for long
        prefixes, use it on hot paths."""
        return ImmutableBlockGroup(self, self._ref_prefix(sequence_hashes))

    def _ref_prefix(self, sequence_hashes: Sequence[int]) -> list[int]:
        """Take one reference on each block of the longest registered prefix; their ids."""
        get, refs = self._by_hash.get, self._slots.refs
        block_ids: list[int] = []
        append = block_ids.append
        woken = 0  # blocks going from inactive to active; this is the hot loop, kept flat
        for h in sequence_hashes:
            block_id = get(h)
            if block_id is None:
                break
            r = refs[block_id]
            if not r:
                woken += 1
            refs[block_id] = r + 1
            append(block_id)
        self._num_inactive -= woken
        return block_ids

    def contains(self, sequence_hash: int) -> bool:
        """Whether the hash is registered here (takes no reference, refreshes nothing)."""
        return sequence_hash in self._by_hash

    def lookup(self, sequence_hash: int) -> int | None:
        """Block id holding ``sequence_hash``, or None (takes no reference)."""
        return self._by_hash.get(sequence_hash)

    def remove(self, sequence_hash: int) -> bool:
        """Unregister a block (e.g. found corrupt) at once (its ``RemoveEvent`` now); its slot is
        freed now if inactive, else on the last release. False if not registered."""
        block_id = self._by_hash.get(sequence_hash)
        if block_id is None:
            return False
        self._unlink(block_id)
        parent = self._slots.parent_of(block_id)
        if parent is not None:
            self._child_gone(parent)
        if self._slots.refs[block_id] == 0:
            self._num_inactive -= 1
            self._free_slot(block_id)
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
        check_int("block_id", block_id)
        check_registration(
            sequence_hash,
            parent_sequence_hash=parent_sequence_hash,
            block_hash=block_hash,
            priority=priority,
        )
        if sequence_hash in self._by_hash:
            raise PoolError(f"sequence hash {sequence_hash} is already registered in {self._tier}")
        if not self._free.is_free(block_id):
            raise PoolError(f"slot {block_id} of {self._tier} is not free")
        self._slots.ensure(block_id)  # only grows the columns: harmless if the registry refuses
        self._link(block_id, sequence_hash, parent_sequence_hash, block_hash, priority, refs=0)
        self._free.take(block_id)
        self._became_inactive(block_id)

    def release(self, handle: MutableBlock | ImmutableBlock | ImmutableBlockGroup) -> None:
        """Give a handle back. Releasing a handle twice raises."""
        if type(handle) is ImmutableBlock and handle._pool is self and handle._alive:
            handle._alive = False  # the common case first, checked cheaply (a hot path)
            self._drop_ref(handle._block_id)
            return
        if isinstance(handle, ImmutableBlockGroup):
            if handle._pool is not self:
                raise PoolError(f"block group belongs to another pool than {self._tier}")
            block_ids = handle._live_ids()
            handle._alive = False
            for block_id in block_ids:
                self._drop_ref(block_id)
            return
        mutable = isinstance(handle, MutableBlock)
        block_id = self._own(handle, MutableBlock if mutable else ImmutableBlock)
        handle._alive = False
        if mutable:
            self._free_slot(block_id)
        else:
            self._drop_ref(block_id)

    def _drop_ref(self, block_id: int) -> None:
        refs = self._slots.refs
        left = refs[block_id] - 1
        refs[block_id] = left
        if left:
            return
        if self._slots.state[block_id] == st.LINKED:
            self._became_inactive(block_id)
        else:  # removed while held
            self._free_slot(block_id)

    # -- internals ----------------------------------------------------------------------------
    def _own(self, handle: MutableBlock | ImmutableBlock, kind: type) -> int:
        if not isinstance(handle, kind):
            raise TypeError(f"expected a {kind.__name__}, got {type(handle).__name__}")
        if handle._pool is not self:
            raise PoolError(f"block {handle.block_id} belongs to another pool than {self._tier}")
        return handle._live_id()

    def _free_slot(self, block_id: int) -> None:
        self._slots.clear(block_id)
        self._free.put(block_id)

    def _link(
        self,
        block_id: int,
        sequence_hash: int,
        parent: int | None,
        block_hash: int | None,
        priority: int,
        refs: int,
    ) -> None:
        """Register the slot under its hash; the registry records it first (and may refuse)."""
        if self._registry is not None:
            self._registry.record_store(self._tier, sequence_hash, parent, block_hash)
        self._slots.set_registered(block_id, sequence_hash, parent, block_hash, priority, refs)
        self._by_hash[sequence_hash] = block_id
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1

    def _unlink(self, block_id: int) -> None:
        """Forget the hash (the caller fixes the parent's child count and frees the slot)."""
        sequence_hash = self._slots.seq[block_id]
        if self._registry is not None:
            self._registry.record_remove(self._tier, sequence_hash)
        self._slots.state[block_id] = st.UNLINKED
        del self._by_hash[sequence_hash]

    def _became_inactive(self, block_id: int) -> None:
        self._num_inactive += 1
        self._tick += 1
        self._slots.tick[block_id] = self._tick
        if self._slots.seq[block_id] not in self._children:
            self._eviction.push(block_id, self._num_inactive)

    def _child_gone(self, parent: int) -> None:
        left = self._children[parent] - 1
        if left:
            self._children[parent] = left
            return
        del self._children[parent]
        block_id = self._by_hash.get(parent)
        if block_id is not None and self._slots.refs[block_id] == 0:
            self._eviction.push(block_id, self._num_inactive)

    def _drop(self, block_id: int) -> None:
        """Evict a victim chosen by ``EvictionHeap.pick`` (its parent link is already undone)."""
        self._num_inactive -= 1
        self._unlink(block_id)
        self._free_slot(block_id)

    # -- verification -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise InvariantError naming the first broken invariant (O(pool): ``pool_invariants``)."""
        _check_invariants(self)
