"""TierPlanner on plain data: exact outcomes of match, two-phase copies, cascade, restore, reset."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvtier.core.registry import RemoveEvent, StoreEvent
from kvtier.plan.planner import G2, G3, PlannerConfig, StoreChoice, TierPlanner
from kvtier.plan.restore import parents_first, plan_restore
from kvtier.storage.block_file import block_file_name


def planner(host: int = 4, disk: int = 4, **kw: object) -> TierPlanner:
    p = TierPlanner(PlannerConfig(host_blocks=host, disk_blocks=disk, **kw))  # type: ignore[arg-type]
    if disk:
        for rank in range(p.config.num_workers):
            p.restored(rank, [], [], None)
    return p


def land(p: TierPlanner, *hashes: int, tier: str = G2) -> None:
    for h in hashes:
        for _ in range(p.config.num_workers):
            p.store_reported(tier, h, ok=True)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        PlannerConfig(host_blocks=1, disk_blocks=0, num_workers=0)
    with pytest.raises(ValueError, match="host_blocks"):
        PlannerConfig(host_blocks=-1, disk_blocks=0)


def test_store_is_two_phase_and_matches_only_once_landed() -> None:
    p = planner(disk=0)
    assert p.store(10, None) == StoreChoice(0, True, False)
    assert p.store(11, 10) == StoreChoice(1, True, False)
    assert p.match([10, 11], 0, 2) == (0, 0)  # pending: held, not matchable
    assert p.store(10, None) == StoreChoice(None, True, False)  # a duplicate: no second copy
    land(p, 10, 11)
    assert p.match([10, 11, 12], 0, 3) == (2, 2)
    assert p.match([10, 11], 1, 2) == (2, 2)
    assert (p.counters.offload_d2h, p.has_pending()) == (2, False)
    p.check_invariants()


def test_failed_store_aborts_and_frees_the_slot() -> None:
    p = planner(host=1, disk=0)
    assert p.store(10, None).host_slot == 0
    p.store_reported(G2, 10, ok=False)
    assert 10 not in p.host and p.counters.store_failures == 1
    assert p.store(11, None).host_slot == 0
    p.check_invariants()


def test_a_failure_on_any_worker_aborts() -> None:
    p = planner(disk=0, num_workers=2)
    p.store(10, None)
    p.store_reported(G2, 10, ok=False)
    assert 10 in p.host  # waits for the second rank
    p.store_reported(G2, 10, ok=True)
    assert 10 not in p.host and p.counters.store_failures == 1


def test_cascade_through_the_filter_from_the_g2_slot() -> None:
    p = planner()
    first = p.store(10, None)
    assert first == StoreChoice(0, True, False)  # seen once: not written to G3
    assert p.filter.rejections == 1
    land(p, 10)
    second = p.store(10, None)  # seen twice: written to G3 from its G2 slot, which is pinned
    assert second == StoreChoice(None, True, True, 0)
    assert p.host.pin_counts() == {10: 1} and p.counters.offload_h2d == 1
    assert p.take_deletes() == []
    land(p, 10, tier=G3)
    assert p.host.pin_counts() == {} and p.disk.lookup(10) == 0
    assert p.match([10], 0, 1) == (1, 1)
    p.check_invariants()


def test_cascade_from_the_gpu_when_g2_is_absent() -> None:
    p = planner(host=0, disk_filter=False)
    assert p.store(10, None) == StoreChoice(None, False, True, -1)
    assert p.counters.offload_d2d == 1
    p.store_reported(G3, 10, ok=False)  # a failed write: aborted, its file deleted
    assert 10 not in p.disk and p.take_deletes() == [10]


def test_g3_eviction_deletes_the_file() -> None:
    p = planner(host=0, disk=1, disk_filter=False)
    p.store(10, None)
    land(p, 10, tier=G3)
    assert p.store(11, None).disk_write
    assert p.take_deletes() == [10] and p.counters.disk_evictions == 1


def test_load_pins_until_every_worker_reported() -> None:
    p = planner(disk_filter=False, num_workers=2)
    p.store(10, None)
    p.store(11, 10)
    land(p, 10, 11)
    land(p, 10, 11, tier=G3)
    p.host.remove(11)
    assert p.match([10, 11], 0, 2) == (1, 2)
    job, slots = p.begin_load("r", [10], [11])
    assert slots == [0]
    assert p.host.pin_counts() == {10: 1} and p.disk.pin_counts() == {11: 1}
    p.check_invariants()
    assert p.load_reported(job) is None
    assert p.load_reported(job) == "r"
    assert p.load_reported(job) is None  # unknown once done
    assert p.host.num_pinned == 0 and p.disk.num_pinned == 0
    assert (p.counters.host_hit_blocks, p.counters.disk_hit_blocks) == (1, 1)


def test_reserve_copy_for_a_lower_tier() -> None:
    p = planner(host=1, disk=0)
    assert p.reserve_copy(10, None) == 0
    assert p.reserve_copy(10, None) == -1  # held already
    assert p.reserve_copy(11, None) == -1  # the only slot is pending
    land(p, 10)
    assert p.match([10], 0, 1) == (1, 1)


def test_corrupt_block_is_forgotten_and_deleted_on_other_ranks() -> None:
    p = planner(host=0, disk_filter=False, num_workers=2)
    p.store(10, None)
    land(p, 10, tier=G3)
    p.disk_bad(10)
    assert 10 not in p.disk and p.take_deletes() == [10] and p.counters.disk_corrupt == 1


def test_restore_keeps_blocks_every_rank_found_newest_that_fit() -> None:
    p = TierPlanner(PlannerConfig(host_blocks=0, disk_blocks=2, num_workers=2))
    assert not p.disk_ready and p.has_pending()
    p.restored(0, [3, 2, 1, 9], [2, 1, None, None], None)
    assert not p.disk_ready
    p.restored(1, [3, 2, 1], [], None)
    assert p.disk_ready
    # 9 only on rank 0: deleted; 1 beyond capacity: deleted; 2 then 3 adopted (parent first)
    assert sorted(p.take_deletes()) == [1, 9]
    assert p.match([2, 3], 0, 2) == (0, 2)
    assert p.disk.lookup(2) == 0 and p.disk.lookup(3) == 1
    p.check_invariants()


def test_restore_plan_orders_parents_first_and_drops_unsafe_links() -> None:
    got = plan_restore([5, 4, 3, 2, 1], {4: 5, 3: 3, 2: 1, 1: 2}, 4)
    # keep the newest four (5, 4, 3, 2), oldest first, parents before children: 5 before 4
    assert got.order == [2, 3, 5, 4]
    assert got.parents == {2: 1, 3: None, 5: None, 4: 5}  # a self link dropped; 1 not kept
    assert got.dropped == [1]
    assert parents_first([1, 2, 3], {1: 3}) == [3, 1, 2]
    with pytest.raises(ValueError):
        plan_restore([], {}, -1)


def test_shared_g3_adoption_by_file_name(tmp_path: Path) -> None:
    p = TierPlanner(PlannerConfig(host_blocks=0, disk_blocks=2))
    p.restored(0, [], [], str(tmp_path))
    assert p.match([7, 8], 0, 2) == (0, 0)
    (tmp_path / block_file_name(7)).write_bytes(b"x")
    assert p.match([7, 8], 0, 2) == (0, 1)  # adopted: another engine wrote it
    assert p.disk.lookup(7) == 0


def test_pinned_rows_gate_g2_slots() -> None:
    p = planner(host=4, disk=0, pinned_host_rows=True, num_workers=2)
    assert p.store(10, None).host_slot is None
    p.pinned_rows(0, 2)
    assert p.store(10, None).host_slot is None  # the other worker has not reported
    p.pinned_rows(1, 1)
    assert p.store(10, None).host_slot == 0
    assert p.store(11, None).host_slot is None  # only row 0 is pinned everywhere


def test_reset_refused_while_in_flight_then_clears() -> None:
    p = planner(disk_filter=False)
    p.store(10, None)
    assert p.reset() is False
    land(p, 10)
    land(p, 10, tier=G3)
    assert p.reset() is True
    assert len(p.host) == 0 and len(p.disk) == 0 and p.take_deletes() == [10]


def test_registry_records_arrivals_and_departures() -> None:
    p = TierPlanner(PlannerConfig(host_blocks=1, disk_blocks=0, record_events=True))
    p.store(10, None)
    assert p.registry.drain_events() == []  # pending is not held yet
    land(p, 10)
    p.store(11, 10)  # evicts 10
    land(p, 11)
    events = p.registry.drain_events()
    assert [(type(e), e.tier, e.sequence_hash) for e in events] == [
        (StoreEvent, G2, 10),
        (RemoveEvent, G2, 10),
        (StoreEvent, G2, 11),
    ]
    assert isinstance(events[2], StoreEvent) and events[2].parent_sequence_hash == 10
    assert p.registry.holds(G2, 11) and not p.registry.holds(G2, 10)


def test_landed_copies_are_timed_from_planning_to_the_last_report() -> None:
    now = [10.0]
    p = TierPlanner(
        PlannerConfig(host_blocks=2, disk_blocks=4, disk_filter=False, num_workers=2),
        clock=lambda: now[0],
    )
    for rank in range(2):
        p.restored(rank, [], [], None)
    p.store(10, None)  # G2 slot 0, and G3 from it
    p.store(11, 10)  # G2 slot 1, and G3 from it
    p.store(12, 11)  # G2 full: G3 straight from the GPU
    now[0] = 10.5
    land(p, 10, 11)
    for h in (10, 11, 12):
        p.store_reported(G3, h, ok=True)  # one worker of two: nothing landed yet
    assert p.take_transfers() == [("device_to_host", 1, 0.5), ("device_to_host", 1, 0.5)]
    now[0] = 11.0
    p.store_reported(G3, 10, ok=True)
    p.store_reported(G3, 11, ok=False)  # failed on one worker: aborted, not timed
    p.store_reported(G3, 12, ok=True)
    assert p.take_transfers() == [("host_to_disk", 1, 1.0), ("device_to_disk", 1, 1.0)]
    job, _ = p.begin_load("r", [10, 11], [10])
    now[0] = 11.25
    p.load_reported(job)
    assert p.take_transfers() == []  # one worker of two
    p.load_reported(job)
    assert p.take_transfers() == [("host_to_device", 2, 0.25), ("disk_to_device", 1, 0.25)]
    assert p.reserve_copy(13, 12) >= 0  # a G4 block kept in G2: not a copy the metrics time
    land(p, 13)
    assert p.take_transfers() == []
    p.check_invariants()


@pytest.mark.parametrize("seed", range(8))
def test_random_copies_keep_the_invariants(seed: int) -> None:
    """Random stores, loads and (partial, failing) reports from two workers: after every step
    the pins equal the copies in flight, and once everything is reported nothing stays pinned."""
    rng = random.Random(seed)
    p = planner(host=6, disk=5, num_workers=2, disk_filter=bool(seed % 2))
    waiting: list[tuple[str, int]] = []
    loads: list[int] = []
    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            h = rng.randrange(1, 20)
            got = p.store(h, h - 1 if h > 1 else None)
            if got.host_slot is not None:
                waiting.extend([(G2, h), (G2, h)])
            if got.disk_write:
                waiting.extend([(G3, h), (G3, h)])
        elif op < 0.55:
            start = rng.randrange(1, 20)
            hashes = list(range(start, start + 4))
            host_end, disk_end = p.match(hashes, 0, len(hashes))
            if disk_end:
                job, _ = p.begin_load("r", hashes[:host_end], hashes[host_end:disk_end])
                loads.extend([job, job])
        elif op < 0.9 and waiting:
            tier, h = waiting.pop(rng.randrange(len(waiting)))
            p.store_reported(tier, h, ok=rng.random() < 0.85)
        elif loads:
            p.load_reported(loads.pop(rng.randrange(len(loads))))
        if rng.random() < 0.05:
            p.disk_bad(rng.randrange(1, 20))
        p.check_invariants()
    for tier, h in waiting:
        p.store_reported(tier, h, ok=True)
    for job in loads:
        p.load_reported(job)
    p.check_invariants()
    assert p.host.pin_counts() == {} and p.disk.pin_counts() == {}
    assert p.host.in_flight == 0 and p.disk.in_flight == 0
    assert len(p.host) <= 6 and len(p.disk) <= 5


def _priority(p: TierPlanner, tier: str, h: int) -> int:
    index = p.host if tier == G2 else p.disk
    return index.describe(h)[1]


def test_store_carries_priority_into_both_tiers_and_eviction_order() -> None:
    p = planner(host=2, disk=4, disk_filter=False)
    assert p.store(10, None, priority=5) == StoreChoice(0, True, True, 0)
    assert p.host.describe(10) == (None, 5)  # pending: what the G3 write carries
    land(p, 10)
    land(p, 10, tier=G3)
    assert _priority(p, G2, 10) == 5 and _priority(p, G3, 10) == 5
    p.store(11, None, priority=1)
    land(p, 11)
    land(p, 11, tier=G3)
    p.store(12, None)  # G2 is full: the lowest priority goes first, though 10 is older
    assert p.host.lookup(11) is None and p.host.lookup(10) == 0
    p.check_invariants()


def test_host_read_is_a_sighting_and_pins_the_g2_source() -> None:
    p = planner(host=2, disk=2)
    p.store(10, None, priority=3)  # first sighting: G2 only
    land(p, 10)
    assert 10 not in p.disk and p.filter.rejections == 1
    assert p.host_read(10) == (0, None, 3)  # second sighting: a G3 write from slot 0
    assert p.host.pin_counts() == {10: 1} and 10 in p.disk
    assert p.host_read(10) is None  # G3 holds it (pending) already
    assert p.host_read(99) is None  # not in G2
    p.check_invariants()
    land(p, 10, tier=G3)
    assert p.host.pin_counts() == {} and _priority(p, G3, 10) == 3
    assert planner(host=2, disk=0).host_read(10) is None  # no G3
    p.check_invariants()


def test_trim_load_keeps_the_first_blocks_and_zero_cancels() -> None:
    p = planner(host=2, disk=2, disk_filter=False)
    for h, parent in ((10, None), (11, 10)):
        p.store(h, parent)
        land(p, h)
        land(p, h, tier=G3)
    p.host.remove(11)
    job, slots = p.begin_load("r", [10], [11])
    assert slots == [0]
    p.trim_load(job, 1)
    assert p.host.pin_counts() == {10: 1} and p.disk.pin_counts() == {}
    p.check_invariants()
    assert p.load_reported(job) == "r" and p.host.pin_counts() == {}
    job, _ = p.begin_load("r", [10], [11])
    p.trim_load(job, 0)
    assert p.host.pin_counts() == {} and p.disk.pin_counts() == {}
    assert p.load_reported(job) is None and not p.has_pending()
    p.check_invariants()


def test_restore_keeps_priorities_and_disk_has_replaces_the_folder_lookup() -> None:
    on_disk = {7}
    p = TierPlanner(PlannerConfig(host_blocks=0, disk_blocks=3), disk_has=on_disk.__contains__)
    p.restored(0, [2, 1], [1, None], None, priorities=[4, -1])
    assert _priority(p, G3, 2) == 4 and _priority(p, G3, 1) == -1
    assert p.match([7, 8], 0, 2) == (0, 1)  # adopted through disk_has: no folder was given
    assert p.disk.lookup(7) is not None
    p.check_invariants()


def test_an_adoption_that_evicts_a_block_of_the_same_match_ends_the_match_there() -> None:
    # G3 holds one block (1); 2 is adoptable from a shared file, and its reservation evicts 1.
    p = TierPlanner(PlannerConfig(host_blocks=0, disk_blocks=1), disk_has={2}.__contains__)
    p.restored(0, [1], [None], None)
    assert p.match([1, 2], 0, 2) == (0, 0)  # 1 is gone: nothing of the prefix is held
    assert p.disk.lookup(1) is None and p.disk.lookup(2) is not None
    job, _ = p.begin_load("r", [], [])  # what the match named can be pinned (nothing here)
    assert p.load_reported(job) == "r"
    p.check_invariants()
