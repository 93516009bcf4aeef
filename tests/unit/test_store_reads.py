"""``StoreReads``: which GPU blocks unconfirmed stores may still read (pure Python)."""

from __future__ import annotations

import pytest

from kvtier.vllm.store_reads import StoreReads


def test_a_block_is_read_until_its_latest_store_is_confirmed() -> None:
    r = StoreReads()
    assert not r.any_read([1, 2, 3])
    r.add(0, [1, 2])
    r.add(1, [])  # a step without stores records nothing
    r.add(3, [2, 9])  # block 2 stored again (recomputed after a preemption)
    assert r.any_read([7, 2]) and r.any_read([1]) and not r.any_read([3, 4])
    assert len(r) == 3
    r.confirm(0)
    assert not r.any_read([1]) and r.any_read([2]), "2 is still read by step 3's stores"
    r.confirm(2)
    assert r.any_read([9])
    r.confirm(3)
    assert not r.any_read([1, 2, 9]) and len(r) == 0


def test_steps_must_increase() -> None:
    r = StoreReads()
    r.add(4, [1])
    with pytest.raises(ValueError, match="steps must increase: 4 after 4"):
        r.add(4, [2])
