"""``BlockPool.check_invariants``: every structure of a pool checked against the others.

Why apart: it is O(pool size), for the property tests and the ``check`` tooling, never the
serving path; the pool's own file keeps to the verbs. It reads the pool's private structures.

The rules, checked after every step of the property test:

1. Every slot is exactly one of: free (in the free list), mutable (RESET/PARTIAL/COMPLETE, owned
   by one ``MutableBlock``, ref count 0), registered-linked (in the hash index under its own
   hash), registered-unlinked (removed while held: ref count > 0, freed on last release);
   ``num_free + used == capacity``.
2. The hash index maps each sequence hash to the one linked slot holding it (dedup: never two).
3. ``num_inactive`` = linked slots with ref count 0; ``num_active = capacity - num_free -
   num_inactive``.
4. The child count of a hash = linked slots whose parent is that hash.
5. Every eviction candidate (linked, ref count 0, child count 0) has a heap entry whose key
   ``(priority, release tick, block id)`` matches the slot; stale entries are skipped on pop and
   compacted away when they outnumber the live ones.
6. With a registry: the registry holds ``(tier, h)`` exactly for the hashes in the index. One
   pool per tier per registry (a second ``Store`` of a hash in a tier raises ``RegistryError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.core import slot_table as st
from kvtier.core.errors import InvariantError

if TYPE_CHECKING:
    from kvtier.core.pool import BlockPool


def check_invariants(pool: BlockPool) -> None:
    """Raise ``InvariantError`` naming the first break (the rules: the module docstring)."""

    def fail(msg: str) -> None:
        raise InvariantError(f"pool {pool._tier}: {msg}")

    pool._free.check()
    slots = pool._slots
    used = inactive = 0
    children: dict[int, int] = {}
    for block_id in slots.used_rows():
        state = slots.state[block_id]
        if (state == st.FREE) != pool._free.is_free(block_id):
            fail(f"slot {block_id}: state {state} disagrees with the free list")
        if state == st.FREE:
            continue
        used += 1
        refs, n_tokens = slots.refs[block_id], len(slots.tokens.get(block_id, ()))
        if state in (st.LINKED, st.UNLINKED):
            h = slots.seq[block_id]
            if (state == st.LINKED) != (pool._by_hash.get(h) == block_id):
                fail(f"slot {block_id}: linked state disagrees with the hash index")
            if refs < 0 or (state == st.UNLINKED and refs == 0):
                fail(f"slot {block_id}: ref count {refs} impossible in state {state}")
            if state == st.LINKED:
                inactive += refs == 0
                parent = slots.parent_of(block_id)
                if parent is not None:
                    children[parent] = children.get(parent, 0) + 1
        elif refs or not {
            st.RESET: n_tokens == 0,
            st.PARTIAL: 0 < n_tokens < pool._block_size,
            st.COMPLETE: n_tokens in (0, pool._block_size),
        }.get(state, False):
            fail(f"slot {block_id}: mutable state {state} with {n_tokens} tokens, {refs} refs")
    if used + pool._free.num_free != pool._capacity:
        fail(f"{pool._free.num_free} free + {used} used != {pool._capacity}")
    for h, block_id in pool._by_hash.items():
        if slots.state[block_id] != st.LINKED or slots.seq[block_id] != h:
            fail(f"hash index entry {h} points at slot {block_id}, which does not hold it")
    if inactive != pool._num_inactive:
        fail(f"num_inactive is {pool._num_inactive}, counted {inactive}")
    if children != pool._children:
        fail("child counts disagree with the registered blocks' parents")
    entries = {e for e in pool._eviction.entries if pool._eviction.is_candidate(e)}
    for h, block_id in pool._by_hash.items():
        key = (slots.prio[block_id], slots.tick[block_id], block_id)
        leaf = slots.refs[block_id] == 0 and h not in children
        if leaf and key not in entries:
            fail(f"evictable block {block_id} is missing from the eviction heap")
    if pool._registry is not None:
        if pool._registry.count(pool._tier) != len(pool._by_hash):
            fail("registry count disagrees with the hash index")
        for h in pool._by_hash:
            if not pool._registry.holds(pool._tier, h):
                fail(f"registry does not know that {pool._tier} holds {h}")
