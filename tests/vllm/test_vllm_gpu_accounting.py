"""The scheduler half's accounting for CUDA workers: G2 rows handed out only once pinned, delayed
frees for asynchronous stores, G3 matches loaded outside the pass under async scheduling.

Pure Python (the control plane imports no torch); request objects shaped like vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.executor.jobs import WorkerReport
from kvtier.plan.slots import SlotIndex
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig

BS = 4


@dataclass
class Req:
    request_id: str
    tokens: list[int]
    cache_salt: str | None = None
    lora_request: None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.tokens

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def test_slots_below_the_usable_limit_only() -> None:
    idx = SlotIndex("G2", 8)
    idx.limit_usable(0)
    assert idx.reserve(1) is None  # nothing pinned yet: no slot at all
    idx.set_usable(3)
    slots = []
    for h in range(10, 16):
        got = idx.reserve(h)
        assert got is not None
        slots.append(got[0])
        idx.commit(h)
    assert max(slots) < 3, slots  # full at 3 rows: it evicts instead of taking row 3
    idx.set_usable(1)  # never shrinks
    assert idx.usable == 3
    idx.set_usable(100)  # clamped to the tier
    assert idx.usable == 8
    idx.check_invariants()


def _plan_step(s: KvTierScheduler, req: Req, blocks: list[int], new: bool) -> list[int]:
    rows = [(req.request_id, blocks, 0)] if new else []
    plan = s.build_step_plan(rows, [], {req.request_id: req.num_tokens})
    return plan.stores.host_slots


def test_g2_stores_wait_for_pinned_rows_reported_by_every_worker() -> None:
    s = KvTierScheduler(
        SchedulerConfig(
            block_size=BS, host_blocks=16, disk_blocks=0, pinned_host_rows=True, num_workers=2
        )
    )
    a = Req("a", list(range(8 * BS + 1)))
    s.get_num_new_matched_tokens(a, 0)
    assert _plan_step(s, a, list(range(9)), True) == []  # no pinned rows: nothing stored
    s.process_reports([WorkerReport(rank=0, host_pinned_rows=4)])
    b = Req("b", list(range(100, 100 + 8 * BS + 1)))
    s.get_num_new_matched_tokens(b, 0)
    assert _plan_step(s, b, list(range(20, 29)), True) == []  # rank 1 has not reported
    s.process_reports([WorkerReport(rank=1, host_pinned_rows=6)])
    c = Req("c", list(range(200, 200 + 8 * BS + 1)))
    s.get_num_new_matched_tokens(c, 0)
    slots = _plan_step(s, c, list(range(40, 49)), True)
    assert slots == [0, 1, 2, 3]  # min over the workers: rows 0..3


def test_async_stores_delay_the_free_until_the_workers_read_them() -> None:
    s = KvTierScheduler(
        SchedulerConfig(block_size=BS, host_blocks=16, disk_blocks=0, async_store_reads=True)
    )
    a = Req("a", list(range(2 * BS + 1)))
    s.get_num_new_matched_tokens(a, 0)
    slots = _plan_step(s, a, [5, 6, 7], True)
    assert slots == [0, 1]
    assert s.request_finished(a) is True  # step 0's stores may still read blocks 5, 6
    nxt = s.build_step_plan([], [], {})
    assert nxt.delayed_free == ["a"]
    assert s.has_pending_work()
    s.finished_sending(["a"])
    s.process_reports([WorkerReport(rank=0, host_stored=[], stores_read_step=1)])
    b = Req("b", list(range(50, 50 + 2 * BS + 1)))
    s.get_num_new_matched_tokens(b, 0)
    s.build_step_plan([("b", [1, 2, 3], 0)], [], {"b": b.num_tokens})
    s.process_reports([WorkerReport(rank=0, stores_read_step=2)])
    assert s.request_finished(b) is False  # its stores were read already: free at once


def test_g3_matches_load_asynchronously_when_vllm_schedules_ahead() -> None:
    cfg = dict(
        block_size=BS, host_blocks=0, disk_blocks=16, layerwise_onboard=True, disk_filter=False
    )
    for layerwise_disk, want_async in ((True, False), (False, True)):
        s = KvTierScheduler(SchedulerConfig(**cfg, layerwise_disk=layerwise_disk))  # type: ignore[arg-type]
        s.process_reports([WorkerReport(rank=0, restored=[])])
        a = Req("a", list(range(3 * BS + 1)))
        s.get_num_new_matched_tokens(a, 0)
        plan = s.build_step_plan([("a", [1, 2, 3, 4], 0)], [], {"a": a.num_tokens})
        hashes = [w.seq_hash for w in plan.disk_writes]
        s.process_reports([WorkerReport(rank=0, disk_stored=hashes)])
        s.request_finished(a)
        again = Req("a2", list(range(3 * BS + 1)))
        n, is_async = s.get_num_new_matched_tokens(again, 0)
        assert n == 3 * BS and is_async is want_async
