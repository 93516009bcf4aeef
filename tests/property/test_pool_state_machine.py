"""A Hypothesis state machine drives BlockPool and a deliberately naive reference model.

The model recomputes everything by brute force (O(pool) scans), so it is easy to trust; after every
step the pool must agree with it on ids, hashes, counts and registry contents, and pass
``check_invariants()``. Sequence hashes form a fixed binary tree (parent of h is (h - 1) // 2), so
random steps build shared prefixes, branches and chains.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.core import (
    BlockPool,
    ImmutableBlock,
    ImmutableBlockGroup,
    MutableBlock,
    PoolError,
    TierRegistry,
)

CAPACITY = 4
HASHES = 7


def parent_of(h: int) -> int | None:
    return None if h == 0 else (h - 1) // 2


@dataclass
class RefBlock:
    block_id: int
    sequence_hash: int
    priority: int
    refs: int
    tick: int
    linked: bool = True


class Model:
    """Brute-force reference: lists and scans, no cleverness."""

    def __init__(self) -> None:
        self.free = set(range(CAPACITY))
        self.mutable: set[int] = set()
        self.blocks: dict[int, RefBlock] = {}  # block id -> registered block
        self.tick = 0

    def linked(self, h: int) -> RefBlock | None:
        return next((b for b in self.blocks.values() if b.linked and b.sequence_hash == h), None)

    def inactive(self) -> int:
        return sum(1 for b in self.blocks.values() if b.linked and b.refs == 0)

    def became_inactive(self, b: RefBlock) -> None:
        self.tick += 1
        b.tick = self.tick

    def victim(self, gone: set[int]) -> RefBlock | None:
        live = [b for b in self.blocks.values() if b.linked and b.block_id not in gone]
        held_parents = {parent_of(b.sequence_hash) for b in live}
        cands = [b for b in live if b.refs == 0 and b.sequence_hash not in held_parents]
        return min(cands, key=lambda b: (b.priority, b.tick), default=None)

    def victims(self, n: int) -> list[RefBlock] | None:
        out: list[RefBlock] = []
        while len(out) < n:
            v = self.victim({b.block_id for b in out})
            if v is None:
                return None
            out.append(v)
        return out

    def drop(self, b: RefBlock) -> None:
        del self.blocks[b.block_id]
        self.free.add(b.block_id)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.registry = TierRegistry()
        self.pool = BlockPool(CAPACITY, block_size=2, tier="G2", registry=self.registry)
        self.model = Model()
        self.mutables: list[MutableBlock] = []
        self.handles: list[ImmutableBlock] = []
        self.groups: list[ImmutableBlockGroup] = []
        self.dead: list[ImmutableBlock | MutableBlock] = []

    @rule(n=st.integers(0, CAPACITY))
    def allocate(self, n: int) -> None:
        m = self.model
        short = n - len(m.free)
        victims = m.victims(short) if short > 0 else []
        got = self.pool.allocate(n)
        if victims is None:
            assert got is None
            return
        for v in victims:
            m.drop(v)
        ids = sorted(m.free)[:n]
        assert got is not None
        assert [b.block_id for b in got] == ids
        m.free -= set(ids)
        m.mutable |= set(ids)
        self.mutables.extend(got)

    @precondition(lambda self: self.mutables)
    @rule(i=st.integers(0, 100), h=st.integers(0, HASHES - 1), prio=st.integers(0, 2))
    def register(self, i: int, h: int, prio: int) -> None:
        blk = self.mutables.pop(i % len(self.mutables))
        blk.mark_complete()
        handle = self.pool.register(blk, h, parent_sequence_hash=parent_of(h), priority=prio)
        m = self.model
        m.mutable.remove(blk.block_id)
        existing = m.linked(h)
        if existing is not None:
            m.free.add(blk.block_id)
            existing.refs += 1
            assert handle.block_id == existing.block_id
        else:
            m.blocks[blk.block_id] = RefBlock(blk.block_id, h, prio, refs=1, tick=0)
            assert handle.block_id == blk.block_id
        self.handles.append(handle)

    @rule(h=st.integers(0, HASHES - 1), miss=st.booleans(), grouped=st.booleans())
    def match(self, h: int, miss: bool, grouped: bool) -> None:
        path = [h]
        while (p := parent_of(path[0])) is not None:
            path.insert(0, p)
        if miss:
            path.insert(len(path) // 2, 10_000)
        group = self.pool.match_group(path) if grouped else None
        got = [] if group is not None else self.pool.match(path)
        got_ids = list(group.block_ids) if group is not None else [g.block_id for g in got]
        expected = []
        for x in path:
            b = self.model.linked(x)
            if b is None:
                break
            b.refs += 1
            expected.append(b.block_id)
        assert got_ids == expected
        self.handles.extend(got)
        if group is not None:
            self.groups.append(group)

    @precondition(lambda self: self.groups)
    @rule(i=st.integers(0, 100))
    def release_group(self, i: int) -> None:
        group = self.groups.pop(i % len(self.groups))
        group.release()
        for block_id in group.block_ids:
            self._model_release(block_id)

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        handle = self.handles.pop(i % len(self.handles))
        self.pool.release(handle)
        self.dead.append(handle)
        self._model_release(handle.block_id)

    def _model_release(self, block_id: int) -> None:
        b = self.model.blocks[block_id]
        b.refs -= 1
        if b.refs == 0:
            if b.linked:
                self.model.became_inactive(b)
            else:
                self.model.drop(b)

    @precondition(lambda self: self.mutables)
    @rule(i=st.integers(0, 100))
    def release_mutable(self, i: int) -> None:
        blk = self.mutables.pop(i % len(self.mutables))
        blk.release()
        self.dead.append(blk)
        self.model.mutable.remove(blk.block_id)
        self.model.free.add(blk.block_id)

    @precondition(lambda self: self.dead)
    @rule(i=st.integers(0, 100))
    def release_twice_raises(self, i: int) -> None:
        with pytest.raises(PoolError, match="already released"):
            self.dead[i % len(self.dead)].release()

    @rule(n=st.integers(0, 3))
    def evict(self, n: int) -> None:
        m = self.model
        expected: list[int] = []
        for _ in range(n):
            v = m.victim(set())
            if v is None:
                break
            m.drop(v)
            expected.append(v.sequence_hash)
        assert self.pool.evict(n) == expected

    @rule(h=st.integers(0, HASHES - 1))
    def remove(self, h: int) -> None:
        b = self.model.linked(h)
        assert self.pool.remove(h) == (b is not None)
        if b is not None:
            b.linked = False
            if b.refs == 0:
                self.model.drop(b)

    @rule(slot=st.integers(0, CAPACITY - 1), h=st.integers(0, HASHES - 1), prio=st.integers(0, 2))
    def restore(self, slot: int, h: int, prio: int) -> None:
        m = self.model
        if slot not in m.free or m.linked(h) is not None:
            with pytest.raises(PoolError):
                self.pool.restore(slot, h, parent_sequence_hash=parent_of(h), priority=prio)
            return
        self.pool.restore(slot, h, parent_sequence_hash=parent_of(h), priority=prio)
        m.free.remove(slot)
        b = RefBlock(slot, h, prio, refs=0, tick=0)
        m.blocks[slot] = b
        m.became_inactive(b)

    @invariant()
    def agrees_with_model(self) -> None:
        pool, m = self.pool, self.model
        pool.check_invariants()
        assert pool.num_free == len(m.free)
        assert pool.num_inactive == m.inactive()
        assert pool.num_active == CAPACITY - len(m.free) - m.inactive()
        for h in range(HASHES):
            b = m.linked(h)
            assert pool.lookup(h) == (None if b is None else b.block_id)
            assert self.registry.tiers_of(h) == (() if b is None else ("G2",))


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
