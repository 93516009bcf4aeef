"""SlotIndex (the planner's G2/G3 index over core's BlockPool)"""

from __future__ import annotations

import pytest

from kvtier.plan.slots import SlotIndex


def _ready(idx: SlotIndex, *hashes: int) -> list[int]:
    slots = []
    for h in hashes:
        got = idx.reserve(h)
        assert got is not None
        slots.append(got[0])
        idx.commit(h)
    return slots


def test_slots_in_order_and_lru_eviction() -> None:
    idx = SlotIndex("G2", 3)
    assert _ready(idx, 10, 11, 12) == [0, 1, 2]
    idx.touch(10)  # 11 is now the least recently used
    assert idx.reserve(13) == (1, [11])
    assert idx.lookup(11) is None and 11 not in idx
    assert idx.lookup(13) is None and 13 in idx  # pending: held, not matchable
    idx.commit(13)
    assert idx.lookup(13) == 1
    assert idx.evictions == 1
    idx.check_invariants()


def test_pinned_and_pending_blocks_are_never_evicted() -> None:
    idx = SlotIndex("G2", 2)
    _ready(idx, 1)
    assert idx.reserve(2) == (1, [])  # pending
    idx.pin(1)
    assert idx.reserve(3) is None  # everything pinned or pending
    idx.unpin(1)
    assert idx.reserve(3) == (0, [1])
    idx.check_invariants()


def test_abort_frees_slot_after_last_pin() -> None:
    idx = SlotIndex("G2", 1)
    assert idx.reserve(5) == (0, [])
    idx.pin(5, pending_ok=True)  # a G3 write planned from the pending slot
    idx.abort(5)
    assert 5 in idx and idx.lookup(5) is None and idx.slot_of(5) is None
    idx.unpin(5)
    assert 5 not in idx and idx.reserve(6) == (0, [])
    idx.check_invariants()


def test_remove_is_deferred_while_pinned() -> None:
    idx = SlotIndex("G3", 2)
    _ready(idx, 7, 8)
    idx.pin(7)
    assert idx.remove(7) is True
    assert idx.lookup(7) is None
    with pytest.raises(ValueError, match="not matchable"):
        idx.pin(7)
    idx.unpin(7)
    assert 7 not in idx
    assert idx.remove(99) is False
    idx.check_invariants()


def test_restore_oldest_first_and_overflow() -> None:
    idx = SlotIndex("G3", 2)
    assert idx.restore([1, 2, 3]) == [3]
    assert idx.reserve(4) == (0, [1])  # 1 was restored first: the oldest
    idx.check_invariants()


def test_misuse_raises() -> None:
    idx = SlotIndex("G2", 1)
    _ready(idx, 1)
    with pytest.raises(ValueError, match="already held"):
        idx.reserve(1)
    with pytest.raises(ValueError, match="not pending"):
        idx.commit(1)
    with pytest.raises(ValueError, match="not pinned"):
        idx.unpin(1)
    with pytest.raises(ValueError, match="not matchable"):
        idx.pin(2)
    with pytest.raises(ValueError, match="num_slots"):
        SlotIndex("G2", -1)


def test_children_keep_parents_so_leaves_go_first() -> None:
    idx = SlotIndex("G2", 2)
    for h, parent in ((1, None), (2, 1)):
        assert idx.reserve(h, parent) is not None
        idx.commit(h)
    idx.touch(1)  # the parent is more recent, yet the child (a leaf) is evicted first
    assert idx.reserve(3) == (1, [2])
    idx.check_invariants()


def test_pins_taken_on_a_pending_block_survive_its_commit() -> None:
    idx = SlotIndex("G2", 1)
    idx.reserve(4)
    idx.pin(4, pending_ok=True)
    idx.pin(4, pending_ok=True)
    assert idx.pin_counts() == {4: 3}
    idx.commit(4)
    assert idx.pin_counts() == {4: 2}
    assert idx.reserve(5) is None  # in use: not evictable
    idx.unpin(4)
    idx.unpin(4)
    assert idx.pin_counts() == {} and idx.lookup(4) == 0
    assert idx.reserve(6) is not None
    with pytest.raises(ValueError, match="store pin"):
        idx.unpin(6)
    idx.check_invariants()
