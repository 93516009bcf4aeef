"""OffloadQueue: (priority, arrival) order, skips what the target holds, cancel."""

from __future__ import annotations

import pytest

from kvtier.core import BlockPool
from kvtier.core.offload import OffloadQueue


def _hold(pool: BlockPool, h: int) -> None:
    (b,) = pool.allocate(1) or []
    b.mark_complete()
    pool.register(b, h).release()


def test_order_is_priority_then_arrival() -> None:
    target = BlockPool(8, tier="G3")
    q: OffloadQueue[str] = OffloadQueue(target)
    for h, prio in [(1, 0), (2, 5), (3, 0), (4, 5), (5, 1)]:
        assert q.push(h, f"p{h}", priority=prio)
    batch = q.pop(10)
    assert [r.sequence_hash for r in batch.ready] == [2, 4, 5, 1, 3]
    assert [r.payload for r in batch.ready] == ["p2", "p4", "p5", "p1", "p3"]
    assert batch.skipped == []
    assert len(q) == 0


def test_skips_hashes_the_target_holds() -> None:
    target = BlockPool(8, tier="G3")
    _hold(target, 1)
    q: OffloadQueue[int] = OffloadQueue(target)
    assert q.push(1, 0) is False  # already there
    assert q.push(2, 0) and q.push(3, 0)
    assert q.push(2, 9) is False  # already queued
    _hold(target, 2)  # arrived in G3 while queued (e.g. from another path)
    batch = q.pop(1)
    assert [r.sequence_hash for r in batch.ready] == [3]
    assert [r.sequence_hash for r in batch.skipped] == [2]


def test_pop_limits_and_cancel() -> None:
    q: OffloadQueue[None] = OffloadQueue(BlockPool(1))
    for h in range(5):
        q.push(h, None)
    assert 2 in q
    cancelled = q.cancel(2)
    assert cancelled is not None and cancelled.sequence_hash == 2
    assert q.cancel(2) is None
    assert [r.sequence_hash for r in q.pop(2).ready] == [0, 1]
    assert [r.sequence_hash for r in q.pop(5).ready] == [3, 4]
    assert q.pop(5).ready == []
    assert q.pop(0).ready == []
    with pytest.raises(ValueError, match="max_items must be >= 0"):
        q.pop(-1)


def test_heavy_cancel_compacts_and_keeps_order() -> None:
    q: OffloadQueue[None] = OffloadQueue(BlockPool(1))
    for h in range(3000):
        q.push(h, None, priority=h % 3)
    for h in range(0, 3000, 2):
        q.cancel(h)
    got = [r.sequence_hash for r in q.pop(3000).ready]
    expected = sorted(range(1, 3000, 2), key=lambda h: (-(h % 3), h))
    assert got == expected
