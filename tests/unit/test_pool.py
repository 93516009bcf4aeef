"""BlockPool: exact block ids, exact eviction order, dedup, leaf-first, ref counting, events."""

from __future__ import annotations

import pytest

from kvtier.core import (
    BlockPool,
    BlockState,
    BlockStateError,
    ImmutableBlock,
    MutableBlock,
    PoolError,
    RemoveEvent,
    StoreEvent,
    TierRegistry,
)


def _full(pool: BlockPool, n: int = 1) -> list[MutableBlock]:
    blocks = pool.allocate(n)
    assert blocks is not None
    for b in blocks:
        b.mark_complete()
    return blocks


def _reg(pool: BlockPool, h: int, parent: int | None = None, prio: int = 0) -> ImmutableBlock:
    (b,) = _full(pool)
    return pool.register(b, h, parent_sequence_hash=parent, priority=prio)


def _chain(pool: BlockPool, hashes: list[int], prio: int = 0) -> list[ImmutableBlock]:
    parents = [None, *hashes[:-1]]
    return [_reg(pool, h, p, prio) for h, p in zip(hashes, parents, strict=True)]


def test_allocate_lowest_ids_first_and_all_or_nothing() -> None:
    pool = BlockPool(4, block_size=2)
    a = pool.allocate(3)
    assert a is not None
    assert [b.block_id for b in a] == [0, 1, 2]
    assert [b.state for b in a] == [BlockState.RESET] * 3
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    assert pool.allocate(0) == []
    a[1].release()
    a[0].release()
    b = pool.allocate(3)
    assert b is not None
    assert [x.block_id for x in b] == [0, 1, 3]
    assert (pool.num_free, pool.num_active, pool.num_inactive) == (0, 4, 0)
    pool.check_invariants()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockPool(4, block_size=0)
    with pytest.raises(ValueError, match="tier must be"):
        BlockPool(4, tier="")
    with pytest.raises(ValueError, match="n must be >= 0"):
        BlockPool(4).allocate(-1)


def test_state_transitions() -> None:
    pool = BlockPool(2, block_size=4)
    (b,) = pool.allocate(1) or []
    with pytest.raises(BlockStateError, match="only a COMPLETE block"):
        pool.register(b, 1)
    b.append_tokens([1, 2])
    assert b.state is BlockState.PARTIAL
    with pytest.raises(BlockStateError, match="room for 2 more tokens, got 3"):
        b.append_tokens([3, 4, 5])
    assert b.tokens == (1, 2)
    b.append_tokens([3, 4])
    assert b.state.name == "COMPLETE"
    with pytest.raises(BlockStateError, match="cannot append tokens"):
        b.append_tokens([5])
    with pytest.raises(BlockStateError, match="cannot mark block 0 complete"):
        b.mark_complete()
    h = pool.register(b, 42)
    assert not b.alive
    assert (h.block_id, h.sequence_hash, h.tokens, h.state) == (
        0,
        42,
        (1, 2, 3, 4),
        BlockState.REGISTERED,
    )
    with pytest.raises(PoolError, match="already released"):
        b.append_tokens([1])
    with pytest.raises(PoolError, match="already released"):
        pool.register(b, 43)
    pool.check_invariants()


def test_reset_keeps_ownership() -> None:
    pool = BlockPool(1, block_size=2)
    (b,) = pool.allocate(1) or []
    b.append_tokens([5, 6])
    b.reset()
    assert (b.state, b.tokens, b.alive, pool.num_free) == (BlockState.RESET, (), True, 0)
    pool.check_invariants()


def test_double_release_raises_and_changes_nothing() -> None:
    pool = BlockPool(2)
    h = _reg(pool, 7)
    h2 = pool.match([7])[0]
    h.release()
    with pytest.raises(PoolError, match="already released"):
        h.release()
    assert pool.num_inactive == 0
    h2.release()
    assert pool.num_inactive == 1
    (m,) = pool.allocate(1) or []
    m.release()
    with pytest.raises(PoolError, match="already released"):
        pool.release(m)
    pool.check_invariants()


def test_foreign_handle_rejected() -> None:
    a, b = BlockPool(2), BlockPool(2)
    (blk,) = _full(a)
    with pytest.raises(PoolError, match="another pool"):
        b.register(blk, 1)
    with pytest.raises(PoolError, match="another pool"):
        b.release(blk)
    assert blk.alive


def test_dedup_returns_existing_and_frees_duplicate() -> None:
    reg = TierRegistry()
    pool = BlockPool(4, tier="G2", registry=reg)
    first = _reg(pool, 100)
    dup_blocks = _full(pool)
    assert dup_blocks[0].block_id == 1
    second = pool.register(dup_blocks[0], 100)
    assert second.block_id == first.block_id == 0
    assert not dup_blocks[0].alive
    assert pool.num_free == 3
    assert pool.num_registered == 1
    assert [type(e) for e in reg.drain_events()] == [StoreEvent]
    first.release()
    assert pool.num_inactive == 0  # `second` still holds it
    second.release()
    assert pool.num_inactive == 1
    pool.check_invariants()


def test_dedup_with_conflicting_parent_raises_and_keeps_block() -> None:
    pool = BlockPool(4)
    _reg(pool, 1)
    _reg(pool, 2, parent=1)
    (b,) = _full(pool)
    with pytest.raises(PoolError, match="registered with parent 1, not 9"):
        pool.register(b, 2, parent_sequence_hash=9)
    assert b.alive and b.state is BlockState.COMPLETE
    pool.check_invariants()


def test_match_is_a_prefix_walk_and_takes_refs() -> None:
    pool = BlockPool(8)
    for h in _chain(pool, [10, 11, 12]):
        h.release()
    assert pool.num_inactive == 3
    got = pool.match([10, 11, 99, 12])
    assert [(g.block_id, g.sequence_hash) for g in got] == [(0, 10), (1, 11)]
    assert pool.num_inactive == 1
    assert pool.match([99, 10]) == []
    assert pool.contains(12) and not pool.contains(99)
    assert pool.lookup(11) == 1 and pool.lookup(99) is None
    for g in got:
        g.release()
    assert pool.num_inactive == 3
    pool.check_invariants()


def test_eviction_lowest_priority_then_least_recently_released() -> None:
    pool = BlockPool(4)
    hs = [_reg(pool, h, prio=p) for h, p in [(1, 5), (2, 0), (3, 0), (4, 5)]]
    for i in [2, 0, 3, 1]:  # release order: 3, 1, 4, 2
        hs[i].release()
    assert pool.evict(4) == [3, 2, 1, 4]
    pool.check_invariants()


def test_allocate_evicts_in_order_and_reuses_those_slots() -> None:
    pool = BlockPool(3)
    hs = [_reg(pool, h) for h in (1, 2, 3)]
    for i in [1, 2, 0]:
        hs[i].release()
    blocks = pool.allocate(2)
    assert blocks is not None
    assert [b.block_id for b in blocks] == [1, 2]  # slots of hashes 2 and 3
    assert not pool.contains(2) and not pool.contains(3) and pool.contains(1)
    pool.check_invariants()


def test_match_refreshes_recency() -> None:
    pool = BlockPool(3)
    hs = [_reg(pool, h) for h in (1, 2, 3)]
    for h in hs:
        h.release()
    for g in pool.match([1]):
        g.release()
    assert pool.contains(1)  # contains does not refresh
    assert pool.evict(3) == [2, 3, 1]


def test_children_keep_parents_alive_leaves_first() -> None:
    pool = BlockPool(6)
    a = _chain(pool, [1, 2, 3])
    b = [_reg(pool, 4, parent=2)]  # a branch off block 2
    other = _reg(pool, 9)
    for h in [*a, *b]:  # parents released before their children
        h.release()
    other.release()
    # leaves by release time: 3 (tick 3), 4 (tick 4), 9 (tick 5); then 2 after both children
    # are gone (released at tick 2, older than 9), then 1.
    assert pool.evict(6) == [3, 4, 2, 1, 9]
    pool.check_invariants()


def test_active_child_pins_inactive_parent_and_allocate_is_all_or_nothing() -> None:
    reg = TierRegistry()
    pool = BlockPool(3, registry=reg)
    parent, child = _chain(pool, [1, 2])
    parent.release()  # inactive, but pinned by the active child
    lone = _reg(pool, 5)
    lone.release()
    reg.drain_events()
    assert pool.num_free == 0 and pool.num_inactive == 2
    assert pool.allocate(2) is None  # only block 5 is reclaimable
    assert pool.contains(5) and pool.contains(1)
    assert reg.drain_events() == []
    pool.check_invariants()
    got = pool.allocate(1)
    assert got is not None and [b.block_id for b in got] == [2]
    child.release()
    assert pool.evict(5) == [2, 1]
    assert [(type(e).__name__, e.sequence_hash) for e in reg.drain_events()] == [
        ("RemoveEvent", 5),
        ("RemoveEvent", 2),
        ("RemoveEvent", 1),
    ]
    pool.check_invariants()


def test_remove_inactive_and_active() -> None:
    reg = TierRegistry()
    pool = BlockPool(4, tier="G3", registry=reg)
    a, b = _chain(pool, [1, 2])
    a.release()
    assert pool.remove(1)  # inactive: freed now, even though it has a child
    assert pool.num_free == 3
    assert not pool.remove(1)
    assert pool.match([1, 2]) == []
    assert pool.remove(2)  # active: unlinked now, freed on release
    assert not pool.contains(2) and pool.num_free == 3
    b.release()
    assert pool.num_free == 4
    ev = reg.drain_events()
    assert [(type(e).__name__, e.tier, e.sequence_hash) for e in ev] == [
        ("StoreEvent", "G3", 1),
        ("StoreEvent", "G3", 2),
        ("RemoveEvent", "G3", 1),
        ("RemoveEvent", "G3", 2),
    ]
    assert [e.event_id for e in ev] == [1, 2, 3, 4]
    assert isinstance(ev[1], StoreEvent) and ev[1].parent_sequence_hash == 1
    assert isinstance(ev[3], RemoveEvent)
    pool.check_invariants()


def test_restore_adopts_free_slots() -> None:
    reg = TierRegistry()
    pool = BlockPool(6, tier="G3", registry=reg)
    pool.restore(4, 40)
    pool.restore(1, 41, parent_sequence_hash=40, priority=2)
    assert pool.lookup(40) == 4 and pool.lookup(41) == 1
    assert (pool.num_free, pool.num_inactive) == (4, 2)
    with pytest.raises(PoolError, match="slot 4 of G3 is not free"):
        pool.restore(4, 50)
    with pytest.raises(PoolError, match="already registered"):
        pool.restore(0, 40)
    with pytest.raises(PoolError, match="slot 6 of G3 is not free"):
        pool.restore(6, 50)
    blocks = pool.allocate(4)
    assert blocks is not None and [b.block_id for b in blocks] == [0, 2, 3, 5]
    assert [m.block_id for m in pool.match([40, 41])] == [4, 1]
    assert reg.tiers_of(41) == ("G3",)
    pool.check_invariants()


def test_registry_tracks_tiers_and_rejects_double_store() -> None:
    reg = TierRegistry()
    g2 = BlockPool(2, tier="G2", registry=reg)
    g3 = BlockPool(2, tier="G3", registry=reg)
    _reg(g3, 5).release()
    _reg(g2, 5).release()
    assert reg.tiers_of(5) == ("G2", "G3")
    assert reg.tiers_of(6) == ()
    g2_again = BlockPool(2, tier="G2", registry=reg)
    (b,) = _full(g2_again)
    with pytest.raises(Exception, match="already holds sequence hash 5"):
        g2_again.register(b, 5)
    assert b.alive and not g2_again.contains(5)
    g2.evict(1)
    assert reg.tiers_of(5) == ("G3",)


def test_context_managers_release() -> None:
    pool = BlockPool(2)
    with pool.allocate(1)[0] as m:  # type: ignore[index]
        m.mark_complete()
        h = pool.register(m, 3)
    with h:
        assert pool.num_active == 1
    assert pool.num_inactive == 1 and pool.num_active == 0
    with pool.allocate(1)[0] as m2:  # type: ignore[index]
        assert m2.block_id == 1
    assert pool.num_free == 1


def test_register_validates_hashes() -> None:
    pool = BlockPool(2)
    (b,) = _full(pool)
    with pytest.raises(ValueError, match="sequence_hash must be an int in the u64 range"):
        pool.register(b, -1)
    with pytest.raises(ValueError, match="cannot be its own parent"):
        pool.register(b, 3, parent_sequence_hash=3)
    with pytest.raises(TypeError, match="priority must be an int"):
        pool.register(b, 3, priority=1.5)  # type: ignore[arg-type]
    assert b.alive


def test_match_group_holds_one_reference_per_block() -> None:
    pool = BlockPool(4)
    for h in _chain(pool, [1, 2, 3]):
        h.release()
    with pool.match_group([1, 2, 9, 3]) as group:
        assert group.block_ids == (0, 1)
        assert list(group) == [0, 1]
        assert len(group) == 2
        assert group.sequence_hashes == [1, 2]
        assert pool.num_inactive == 1
        assert pool.evict(3) == [3]  # 1 and 2 are held
    assert not group.alive
    assert pool.num_inactive == 2
    with pytest.raises(PoolError, match="already released"):
        group.release()
    with pytest.raises(PoolError, match="already released"):
        _ = group.sequence_hashes
    assert BlockPool(1).match_group([5]).block_ids == ()
    other = pool.match_group([1])
    with pytest.raises(PoolError, match="another pool"):
        BlockPool(1).release(other)
    other.release()
    pool.check_invariants()
