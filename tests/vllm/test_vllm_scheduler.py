"""The connector's scheduler half, driven with request objects shaped like vLLM's ``Request``.

The fakes carry exactly the attributes the scheduler half reads from vLLM (request_id,
cache_salt, lora_request, all_token_ids, num_tokens); everything else is the real kvtier code.
Block size 4 keeps the arithmetic visible.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from kvtier.executor.jobs import DiskWrite, StepPlan, WorkerReport
from kvtier.hashing import salt_hash, sequence_hashes
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig

BS = 4


@dataclass
class FakeLora:
    lora_name: str


@dataclass
class FakeRequest:
    request_id: str
    tokens: list[int]
    cache_salt: str | None = None
    lora_request: FakeLora | None = None
    extra: list[int] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.tokens + self.extra

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + len(self.extra)


def sched(host: int = 8, disk: int = 0, **kw: object) -> KvTierScheduler:
    s = KvTierScheduler(SchedulerConfig(block_size=BS, host_blocks=host, disk_blocks=disk, **kw))  # type: ignore[arg-type]
    if disk:
        s.process_reports([WorkerReport(rank=0, restored=[])])
    return s


def prefill(
    s: KvTierScheduler,
    req: FakeRequest,
    block_ids: list[int],
    computed: int = 0,
    tokens: dict[int, tuple[int, ...]] | None = None,
) -> StepPlan:
    """Schedule the whole prompt of ``req`` in one step as a new request."""
    return s.build_step_plan(
        [(req.request_id, block_ids, computed)],
        [],
        {req.request_id: req.num_tokens - computed},
        block_tokens=tokens,
    )


def ack(s: KvTierScheduler, plan: StepPlan, **extra: list[int]) -> None:
    """The worker's report for ``plan`` when everything succeeded."""
    s.process_reports(
        [
            WorkerReport(
                rank=0,
                host_stored=list(plan.stores.hashes),
                disk_stored=[w.seq_hash for w in plan.disk_writes],
                loads_done=[j.job_id for j in plan.loads],
                stores_read_step=plan.step,
                **extra,  # type: ignore[arg-type]
            )
        ]
    )


def stored(s: KvTierScheduler, req: FakeRequest, blocks: list[int]) -> None:
    s.get_num_new_matched_tokens(req, 0)
    ack(s, prefill(s, req, blocks))
    assert s.request_finished(req) is False


def test_stores_every_full_prompt_block_once() -> None:
    s = sched()
    req = FakeRequest("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    tokens: dict[int, tuple[int, ...]] = {}
    plan = prefill(s, req, [7, 3, 9], tokens=tokens)
    assert plan.stores.gpu_blocks == [7, 3]
    assert plan.stores.host_slots == [0, 1]
    h = sequence_hashes(req.tokens, BS, salt_hash())
    assert plan.stores.hashes == h
    # Parents ride along for the telemetry's BlockStored events; tokens stay on this side.
    assert plan.stores.parents == [None, h[0]]
    assert tokens == {h[0]: (0, 1, 2, 3), h[1]: (4, 5, 6, 7)}
    assert plan.disk_writes == [] and plan.loads == []
    ack(s, plan)
    assert [s.host.lookup(h) for h in plan.stores.hashes] == [0, 1]
    s.check_invariants()


def test_decode_blocks_are_stored_when_completed() -> None:
    s = sched()
    req = FakeRequest("a", list(range(6)))
    s.get_num_new_matched_tokens(req, 0)
    ack(s, prefill(s, req, [1, 2]))
    req.extra = [100, 101]  # two sampled tokens: the second block is now full once computed
    plan = s.build_step_plan([], [("a", None, 6, False)], {"a": 1})  # computes token 7 of 8
    assert plan.stores.gpu_blocks == []
    tokens: dict[int, tuple[int, ...]] = {}
    plan = s.build_step_plan([], [("a", None, 7, False)], {"a": 1}, block_tokens=tokens)
    assert plan.stores.gpu_blocks == [2]
    h = sequence_hashes(req.all_token_ids, BS, salt_hash())
    assert plan.stores.hashes == [h[1]]
    assert plan.stores.parents == [h[0]]
    assert tokens == {h[1]: (4, 5, 100, 101)}


def test_match_g2_then_g3_full_blocks_never_whole_prompt() -> None:
    s = sched(host=8, disk=8, disk_filter=False)
    req = FakeRequest("w", list(range(16)))  # 4 full blocks
    stored(s, req, [1, 2, 3, 4])
    h = sequence_hashes(req.tokens, BS, salt_hash())
    s.host.remove(h[1])  # G2 holds blocks 0, 2, 3; G3 holds all four
    r2 = FakeRequest("r", list(range(16)))
    # G2 block 0, then G3 from block 1; block 3 would complete the prompt: dropped
    assert s.get_num_new_matched_tokens(r2, 0) == (3 * BS, True)
    assert s.external_hit_split("r") == (0, 0)
    s.update_state_after_alloc(r2, [11, 12, 13, 14], 3 * BS)
    assert s.external_hit_split("r") == (1 * BS, 2 * BS)
    # after vLLM's own G1 hit of 2 blocks, only block 2 remains (from G2 this time)
    r3 = FakeRequest("q", [*list(range(16)), 99])
    assert s.get_num_new_matched_tokens(r3, 2 * BS) == (2 * BS, True)
    plan = s.build_step_plan([], [], {})
    (job,) = plan.loads
    assert (job.req_id, job.is_async) == ("r", True)
    assert (job.host_slots, job.host_gpu_blocks) == ([s.host.lookup(h[0])], [11])
    assert (job.disk_hashes, job.disk_gpu_blocks) == (h[1:3], [12, 13])
    assert s.host.pin_counts() == {h[0]: 1} and s.disk.pin_counts() == {h[1]: 1, h[2]: 1}
    s.check_invariants()
    ack(s, plan)
    assert s.host.num_pinned == 0 and s.disk.num_pinned == 0
    s.check_invariants()


def test_layerwise_loads_are_synchronous() -> None:
    s = sched(layerwise_onboard=True)
    stored(s, FakeRequest("a", list(range(9))), [1, 2, 3])
    r = FakeRequest("b", list(range(9)))
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BS, False)
    s.update_state_after_alloc(r, [5, 6, 7], 2 * BS)
    (job,) = s.build_step_plan([("b", [5, 6, 7], 2 * BS)], [], {"b": 1}).loads
    assert job.is_async is False and job.host_gpu_blocks == [5, 6]


def test_salt_and_lora_isolate_requests() -> None:
    s = sched()
    stored(s, FakeRequest("a", list(range(9)), cache_salt="x"), [1, 2, 3])
    assert s.get_num_new_matched_tokens(FakeRequest("b", list(range(9)), cache_salt="y"), 0) == (
        0,
        False,
    )
    assert s.get_num_new_matched_tokens(FakeRequest("c", list(range(9))), 0) == (0, False)
    lora = FakeRequest("d", list(range(9)), cache_salt="x", lora_request=FakeLora("l1"))
    assert s.get_num_new_matched_tokens(lora, 0) == (0, False)
    assert s.get_num_new_matched_tokens(FakeRequest("e", list(range(9)), cache_salt="x"), 0) == (
        2 * BS,
        True,
    )


def test_frequency_filter_sends_second_sighting_to_g3_from_the_g2_slot() -> None:
    s = sched(host=8, disk=8)
    stored(s, FakeRequest("a", list(range(5))), [1, 2])
    h0 = sequence_hashes(list(range(4)), BS, salt_hash())[0]
    assert s.disk.lookup(h0) is None
    r = FakeRequest("b", list(range(5)))
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, [3, 4], 1 * BS)
    tokens: dict[int, tuple[int, ...]] = {}
    plan = s.build_step_plan([("b", [3, 4], BS)], [], {"b": 1}, block_tokens=tokens)
    assert plan.stores.gpu_blocks == []  # already in G2
    assert plan.disk_writes == [DiskWrite(h0, None, host_slot=0)]
    assert tokens == {h0: (0, 1, 2, 3)}  # stored to G3 only
    assert s.host.lookup(h0) == 0
    assert s.host.pin_counts() == {h0: 2}  # the load and the G3 write
    s.check_invariants()
    ack(s, plan)
    assert s.disk.lookup(h0) == 0 and s.host.num_pinned == 0
    s.check_invariants()


def test_g3_write_straight_from_gpu_when_g2_is_full() -> None:
    s = sched(host=1, disk=8, disk_filter=False)
    req = FakeRequest("a", list(range(8)))
    s.get_num_new_matched_tokens(req, 0)
    tokens: dict[int, tuple[int, ...]] = {}
    plan = prefill(s, req, [5, 6], tokens=tokens)
    h = sequence_hashes(req.tokens, BS, salt_hash())
    assert plan.stores.gpu_blocks == [5]
    assert plan.disk_writes == [
        DiskWrite(h[0], None, host_slot=0),
        DiskWrite(h[1], h[0], gpu_block=6),
    ]
    assert tokens == {h[0]: (0, 1, 2, 3), h[1]: (4, 5, 6, 7)}
    s.check_invariants()
    ack(s, plan)
    assert s.disk.lookup(h[1]) is not None
    s.check_invariants()


def test_failed_stores_free_their_slots() -> None:
    s = sched(host=2, disk=2, disk_filter=False)
    req = FakeRequest("a", [*list(range(4)), 9])
    s.get_num_new_matched_tokens(req, 0)
    plan = prefill(s, req, [5, 6])
    (h,) = plan.stores.hashes
    s.process_reports(
        [WorkerReport(rank=0, host_store_failed=[h], disk_store_failed=[h], stores_read_step=0)]
    )
    assert h not in s.host and h not in s.disk
    assert s.counters.store_failures == 2
    assert s.build_step_plan([], [], {}).disk_deletes == [h]  # a half-written file never stays
    s.check_invariants()
    assert len(s.host) == 0 and len(s.disk) == 0


def test_corrupt_g3_block_is_forgotten_and_stored_again_when_recomputed() -> None:
    s = sched(host=1, disk=4, disk_filter=False, layerwise_onboard=True)
    stored(s, FakeRequest("a", list(range(9))), [1, 2, 3])
    h = sequence_hashes(list(range(8)), BS, salt_hash())
    s.host.remove(h[0])
    r = FakeRequest("b", list(range(9)))
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BS, False)
    s.update_state_after_alloc(r, [4, 5, 6], 2 * BS)
    plan = s.build_step_plan([("b", [4, 5, 6], 2 * BS)], [], {"b": 1})
    s.process_reports(
        [
            WorkerReport(
                rank=0, loads_done=[plan.loads[0].job_id], disk_bad=[h[1]], disk_load_failed=1
            )
        ]
    )
    assert s.disk.lookup(h[1]) is None and h[1] not in s.disk
    assert (s.counters.disk_corrupt, s.counters.load_failures) == (1, 1)
    assert (s.counters.host_load_failures, s.counters.disk_load_failures) == (0, 1)
    # vLLM rewinds the request to the failed block and recomputes it: it is stored again
    plan = s.build_step_plan([], [("b", None, BS, False)], {"b": 5})
    assert [w.seq_hash for w in plan.disk_writes] == [h[1]]
    s.check_invariants()


def test_g3_index_comes_from_the_worker_first_report() -> None:
    s = KvTierScheduler(SchedulerConfig(block_size=BS, host_blocks=0, disk_blocks=2))
    req = FakeRequest("a", list(range(9)))
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # ask again next step
    assert s.has_pending_work()
    h = sequence_hashes(req.tokens, BS, salt_hash())
    s.process_reports([WorkerReport(rank=0, restored=[h[1], h[0], 777])])  # newest first
    assert s.get_num_new_matched_tokens(req, 0) == (2 * BS, True)
    assert s.build_step_plan([], [], {}).disk_deletes == [777]  # over capacity: deleted
    s.check_invariants()


@pytest.mark.parametrize("parent_newer", [False, True])
def test_g3_index_restored_with_parent_links_evicts_leaves_first(parent_newer: bool) -> None:
    """The block files' parent hashes come back with the index: after a restart a chain is
    still eaten from its tail, even when its parent's file is the oldest (plain recency would
    evict the parent first) or the newest (then it is restored before its child anyway)."""
    s = KvTierScheduler(SchedulerConfig(block_size=BS, host_blocks=0, disk_blocks=2))
    h = sequence_hashes(list(range(8)), BS, salt_hash())
    newest_first = [h[0], h[1]] if parent_newer else [h[1], h[0]]
    parents = {h[0]: None, h[1]: h[0]}
    s.process_reports(
        [
            WorkerReport(
                rank=0, restored=newest_first, restored_parents=[parents[x] for x in newest_first]
            )
        ]
    )
    s.check_invariants()
    got = s.disk.reserve(777)
    assert got is not None and got[1] == [h[1]]  # the leaf, not its parent
    s.disk.check_invariants()


def test_reset_drops_g2_and_g3_unless_copies_are_in_flight() -> None:
    s = sched(host=8, disk=8, disk_filter=False)
    req = FakeRequest("a", list(range(9)))
    h = sequence_hashes(req.tokens, BS, salt_hash())
    s.get_num_new_matched_tokens(req, 0)
    plan = prefill(s, req, [1, 2, 3])
    assert s.reset() is False  # stores in flight: nothing dropped
    ack(s, plan)
    assert [s.host.lookup(x) is not None for x in h] == [True, True]
    assert [s.disk.lookup(x) is not None for x in h] == [True, True]
    assert s.reset() is True
    assert (len(s.host), len(s.disk)) == (0, 0)
    assert s.get_num_new_matched_tokens(FakeRequest("b", list(range(9))), 0) == (0, False)
    assert sorted(s.build_step_plan([], [], {}).disk_deletes) == sorted(h)  # files go too
    s.check_invariants()
    # the freed slots are used again
    stored(s, FakeRequest("c", list(range(100, 109))), [4, 5, 6])
    assert len(s.host) == 2
    s.check_invariants()


def test_preempted_request_resumes_without_new_copies() -> None:
    s = sched()
    req = FakeRequest("a", list(range(9)))
    s.get_num_new_matched_tokens(req, 0)
    ack(s, prefill(s, req, [1, 2, 3]))
    plan = s.build_step_plan([], [("a", [7, 8, 9], 0, True)], {"a": 9})  # resumed from scratch
    assert plan.stores.gpu_blocks == []  # both blocks are already in G2
    assert s.request_finished(req) is False
    assert s.num_tracked_requests == 0
    s.check_invariants()


def test_request_finished_waits_for_async_store_reads() -> None:
    s = sched(async_store_reads=True)
    req = FakeRequest("a", list(range(5)))
    s.get_num_new_matched_tokens(req, 0)
    plan = prefill(s, req, [1, 2])
    assert s.request_finished(req) is True
    assert s.build_step_plan([], [], {}).delayed_free == ["a"]
    assert s.has_pending_work()
    ack(s, plan)
    s.finished_sending({"a"})
    assert not s.has_pending_work()


def test_abort_before_scheduling_leaks_nothing() -> None:
    s = sched()
    stored(s, FakeRequest("a", list(range(9))), [1, 2, 3])
    r = FakeRequest("b", list(range(9)))
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, [4, 5, 6], 2 * BS)
    plan = s.build_step_plan([], [], {})
    assert s.request_finished(r) is False  # vLLM itself keeps the blocks of a pending load
    ack(s, plan)  # the worker still reports the load; its pins go
    assert s.host.num_pinned == 0 and s.num_tracked_requests == 0
    s.check_invariants()


def test_tensor_parallel_waits_for_every_worker() -> None:
    s = sched(num_workers=2)
    req = FakeRequest("a", list(range(5)))
    s.get_num_new_matched_tokens(req, 0)
    (h,) = prefill(s, req, [1, 2]).stores.hashes
    s.process_reports([WorkerReport(rank=0, host_stored=[h])])
    assert s.host.lookup(h) is None
    s.process_reports([WorkerReport(rank=1, host_stored=[h])])
    assert s.host.lookup(h) == 0


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        SchedulerConfig(block_size=0, host_blocks=1, disk_blocks=0)
    with pytest.raises(ValueError, match="host_blocks"):
        SchedulerConfig(block_size=4, host_blocks=-1, disk_blocks=0)


def test_scheduler_half_imports_no_torch() -> None:
    code = (
        "import sys; import kvtier.vllm.scheduler, kvtier.executor.jobs, kvtier.settings, "
        "kvtier.vllm; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'vllm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_filter_rejections_are_counted() -> None:
    s = sched(host=8, disk=8)
    stored(s, FakeRequest("a", list(range(9))), [1, 2, 3])
    assert s.filter.rejections == 2  # two blocks seen once: kept out of G3


def test_plans_and_reports_are_plain_data() -> None:
    import dataclasses
    import json

    s = sched(host=1, disk=4, disk_filter=False)
    req = FakeRequest("a", list(range(9)))
    s.get_num_new_matched_tokens(req, 0)
    plan = prefill(s, req, [5, 6, 7])
    text = json.dumps(dataclasses.asdict(plan))  # ints, strs, lists, bools and None only
    assert json.loads(text)["stores"]["gpu_blocks"] == [5]
    assert json.loads(text)["disk_writes"][1]["gpu_block"] == 6
    report = WorkerReport(rank=0, host_stored=[1], restored=[2])
    assert json.loads(json.dumps(dataclasses.asdict(report)))["restored"] == [2]
