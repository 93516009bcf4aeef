"""Connector telemetry, driven through a real ``KvTierScheduler`` as the connector drives it.

Each step is what the connector does: ``build_step_plan`` then ``on_plan`` (its
``build_connector_meta``), the workers' reports through ``process_reports`` then ``on_reports``
(its ``update_connector_output``). The requests are fakes with the attributes vLLM's ``Request``
has; everything else is the real scheduler half, planner and registry. Block size 4.
"""

from __future__ import annotations

import dataclasses
import pickle
import urllib.request
from dataclasses import dataclass

import pytest

from kvtier.executor.jobs import DiskWrite, StepPlan, StoreBatch, WorkerReport
from kvtier.hashing import salt_hash, sequence_hashes
from kvtier.ops.event_stream import KvEventSubscriber
from kvtier.ops.event_wire import (
    MEDIUM_DISK,
    MEDIUM_HOST,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)
from kvtier.settings import load_settings
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig
from kvtier.vllm.telemetry import ConnectorTelemetry

BS = 4


@dataclass
class _Request:
    """The attributes of vLLM's ``Request`` that the scheduler half reads."""

    request_id: str
    all_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def make(
    workers: int = 1, host: int = 2, disk: int = 4, disk_filter: bool = True, **env: str
) -> tuple[ConnectorTelemetry, KvTierScheduler, Clock]:
    """A scheduler half and its telemetry, configured as the connector does (one clock)."""
    clock = Clock()
    settings = load_settings({}, {"KVTIER_METRICS_PORT": "0", **env})
    config = SchedulerConfig(
        block_size=BS,
        host_blocks=host,
        disk_blocks=disk,
        disk_filter=disk_filter,
        num_workers=workers,
        record_events=settings.events,
    )
    sched = KvTierScheduler(config, clock=clock)
    tel = ConnectorTelemetry(settings, sched, block_bytes=1000, clock=clock)
    return tel, sched, clock


def hashes(tokens: list[int]) -> list[int]:
    return sequence_hashes(tokens, BS, salt_hash())


def lookup(sched: KvTierScheduler, req: _Request, gpu_blocks: list[int], computed: int = 0) -> int:
    """vLLM's lookup and allocation of a waiting request (``computed``: its G1 hit); returns the
    tokens kvtier loads."""
    got, _ = sched.get_num_new_matched_tokens(req, computed)
    assert got is not None
    sched.update_state_after_alloc(req, gpu_blocks, got)
    return got


def step(
    tel: ConnectorTelemetry,
    sched: KvTierScheduler,
    new: list[tuple[str, list[int], int]],
    scheduled: dict[str, int],
    cached: list[tuple[str, list[int] | None, int, bool]] | None = None,
) -> StepPlan:
    """The connector's ``build_connector_meta``: plan the step, hand the plan to telemetry."""
    tokens: dict[int, tuple[int, ...]] | None = {} if tel.wants_tokens else None
    plan = sched.build_step_plan(new, cached or [], scheduled, block_tokens=tokens)
    tel.on_plan(plan, tokens)
    return plan


def report(tel: ConnectorTelemetry, sched: KvTierScheduler, *reports: WorkerReport) -> None:
    """The connector's ``update_connector_output``: apply the reports, then telemetry reads."""
    sched.process_reports(reports)
    tel.on_reports(list(reports))


def sample(tel: ConnectorTelemetry, name: str, **labels: str) -> float | None:
    return tel.metrics.registry.get_sample_value(name, labels)


def test_transfers_count_once_all_workers_report_with_plan_to_report_latency() -> None:
    tel, sched, clock = make(workers=2, host=4, disk=8, disk_filter=False)
    s_tokens = list(range(100, 109))  # 2 full blocks + 1
    loaded = _Request("L", [*s_tokens[:8], 200, 201, 202, 203, 204])  # S's 2 blocks + 1 + 1
    s = hashes(s_tokens)
    l_hashes = hashes(loaded.all_token_ids)
    restored = [l_hashes[2]]
    sched.process_reports(
        [WorkerReport(r, restored=restored, restored_parents=[s[1]]) for r in range(2)]
    )
    # Setup (not measured): S's blocks land in G2 and G3.
    setup = _Request("S", s_tokens)
    lookup(sched, setup, [0, 1, 2])
    plan = sched.build_step_plan([("S", [0, 1, 2], 0)], [], {"S": 9})
    done = [w.seq_hash for w in plan.disk_writes]
    sched.process_reports([WorkerReport(r, host_stored=s, disk_stored=done) for r in range(2)])
    sched.planner.take_transfers()
    sched.request_finished(setup)
    # The measured step: L loads 2 blocks from G2 and 1 from G3; A stores 2 blocks in G2 (and
    # from there in G3) and, G2 being full, its third block straight to G3.
    assert lookup(sched, loaded, [10, 11, 12, 13]) == 12
    fresh = _Request("A", list(range(300, 313)))
    lookup(sched, fresh, [20, 21, 22, 23])
    a = hashes(fresh.all_token_ids)
    plan = step(tel, sched, [("A", [20, 21, 22, 23], 0)], {"A": 13})
    (job,) = plan.loads
    assert (len(job.host_slots), job.disk_hashes) == (2, [l_hashes[2]])
    assert plan.stores.hashes == a[:2]
    assert plan.disk_writes == [
        DiskWrite(a[0], None, host_slot=plan.stores.host_slots[0]),
        DiskWrite(a[1], a[0], host_slot=plan.stores.host_slots[1]),
        DiskWrite(a[2], a[1], gpu_block=22),
    ]
    clock.now += 0.125
    report(tel, sched, WorkerReport(0, host_stored=a[:2], loads_done=[job.job_id]))
    assert sample(tel, "kvtier_blocks_total", path="device_to_host") == 0  # one of two workers
    clock.now += 0.125
    report(
        tel,
        sched,
        WorkerReport(
            1,
            host_stored=a[:2],
            loads_done=[job.job_id],
            disk_stored=[a[0], a[2]],
            disk_store_failed=[a[1]],
        ),
        WorkerReport(0, disk_stored=[a[0], a[1]], disk_store_failed=[a[2]]),
    )
    assert sample(tel, "kvtier_blocks_total", path="device_to_host") == 2
    assert sample(tel, "kvtier_bytes_total", path="device_to_host") == 2 * 1000 * 2
    assert sample(tel, "kvtier_blocks_total", path="host_to_device") == 2
    assert sample(tel, "kvtier_blocks_total", path="disk_to_device") == 1
    assert sample(tel, "kvtier_blocks_total", path="host_to_disk") == 1  # a[1] failed on one
    assert sample(tel, "kvtier_blocks_total", path="device_to_disk") == 0  # one worker failed
    assert sample(tel, "kvtier_transfer_seconds_sum", path="host_to_device") == 0.25
    assert sample(tel, "kvtier_transfer_seconds_bucket", path="device_to_host", le="0.1") == 0
    assert sample(tel, "kvtier_transfer_seconds_bucket", path="device_to_host", le="0.25") == 2
    sched.check_invariants()


def test_lookups_filter_errors_and_occupancy_come_from_the_scheduler() -> None:
    tel, sched, _ = make(host=3, disk=5)  # the G2 -> G3 filter is on
    p_tokens = list(range(500, 511))  # 2 full blocks + 3
    first = _Request("Q1", p_tokens[:8] + list(range(600, 608)))  # P's 2 blocks + 2 more
    q1 = hashes(first.all_token_ids)
    report(tel, sched, WorkerReport(0, restored=[q1[2]], restored_parents=[q1[1]]))
    # P is computed and stored in G2; the filter rejects both blocks (first sightings).
    lookup(sched, _Request("P", p_tokens), [0, 1, 2])
    plan = step(tel, sched, [("P", [0, 1, 2], 0)], {"P": 11})
    assert plan.disk_writes == []
    report(tel, sched, WorkerReport(0, host_stored=plan.stores.hashes))
    # Three lookups hit: Q1 8 tokens in G2 and 4 in G3, Q2 and Q3 4 in G2 each.
    assert lookup(sched, first, [3, 4, 5, 6]) == 12
    assert lookup(sched, _Request("Q2", [*p_tokens[:4], 9]), [7, 8]) == 4
    assert lookup(sched, _Request("Q3", [*p_tokens[:4], 9, 9, 9, 9]), [9, 10]) == 4
    plan = step(tel, sched, [], {})
    j1, j2, _ = (j.job_id for j in plan.loads)
    # Q1's and Q2's loads are done (with failed blocks); Q3's still pins its G2 block.
    report(tel, sched, WorkerReport(0, loads_done=[j1, j2], host_load_failed=2, disk_load_failed=3))
    assert sample(tel, "kvtier_lookup_tokens_total") == 11 + 16 + 5 + 8 == 40
    assert sample(tel, "kvtier_matched_tokens_total", tier="host") == 16
    assert sample(tel, "kvtier_matched_tokens_total", tier="disk") == 4
    assert tel.metrics.hit_rate("host") == 0.4
    # Labelled with the tier whose load failed, as the worker reported it.
    assert sample(tel, "kvtier_load_errors_total", tier="host") == 2
    assert sample(tel, "kvtier_load_errors_total", tier="disk") == 3
    assert sample(tel, "kvtier_load_errors_total", tier="unknown") == 0
    assert sample(tel, "kvtier_disk_filter_rejections_total") == 2
    assert sample(tel, "kvtier_pool_blocks", tier="host", state="in_use") == 1
    assert sample(tel, "kvtier_pool_blocks", tier="host", state="free") == 1
    assert sample(tel, "kvtier_pool_blocks", tier="disk", state="free") == 4
    report(tel, sched)  # no change: nothing counted twice
    assert sample(tel, "kvtier_lookup_tokens_total") == 40
    assert sched.has_pending_work()  # Q3's load is still in flight
    sched.check_invariants()


def _warm_up(tel: ConnectorTelemetry, sched: KvTierScheduler, sub: KvEventSubscriber) -> None:
    """Publish (G3 blocks found at start) until the subscription has propagated, then drain."""
    for i in range(100):
        report(tel, sched, WorkerReport(0, restored=[1000 + i]))
        if sub.receive(0.05) is not None:
            break
    while sub.receive(0.2) is not None:
        pass


def test_events_stream_and_metrics_endpoint() -> None:
    tel, sched, _ = make(
        disk=128,
        KVTIER_METRICS="1",
        KVTIER_EVENTS="1",
        KVTIER_EVENTS_ENDPOINT="tcp://127.0.0.1:0",
    )
    assert tel.server is None and tel.publisher is None  # nothing before start()
    with tel:
        assert tel.server is not None and tel.publisher is not None
        with KvEventSubscriber(tel.publisher.endpoint) as sub:
            _warm_up(tel, sched, sub)
            toks = list(range(700, 713))  # prefilled in two chunks: 9 tokens, then 4
            a = hashes(toks)
            lookup(sched, _Request("A", toks), [1, 2, 3])
            plan = step(tel, sched, [("A", [1, 2, 3], 0)], {"A": 9})
            report(tel, sched, WorkerReport(0, host_stored=plan.stores.hashes))
            # D shares A's first block (a G1 hit): its second sighting passes the filter, so it
            # is written to G3 from its G2 slot; A's third block evicts A's second from G2.
            lookup(sched, _Request("D", toks[:5]), [1, 5], computed=4)
            plan = step(
                tel, sched, [("D", [1, 5], 4)], {"D": 1, "A": 4}, cached=[("A", [4], 9, False)]
            )
            assert plan.stores.hashes == [a[2]] and [w.seq_hash for w in plan.disk_writes] == [a[0]]
            report(tel, sched, WorkerReport(0, host_stored=[a[2]], disk_stored=[a[0]]))
            # A read finds a[0] corrupt; 777 was never announced.
            report(tel, sched, WorkerReport(0, disk_bad=[a[0], 777]))
            got = []
            while (b := sub.receive(1.0)) is not None:
                got.extend(b.batch.events)
            assert got == [
                BlockStored((a[0], a[1]), None, tuple(toks[:8]), 4, MEDIUM_HOST),
                BlockRemoved((a[1],), MEDIUM_HOST),
                BlockStored((a[2],), a[1], tuple(toks[8:12]), 4, MEDIUM_HOST),
                BlockStored((a[0],), None, tuple(toks[:4]), 4, MEDIUM_DISK),
                BlockRemoved((a[0],), MEDIUM_DISK),
            ]
            assert sub.gaps == []
        with urllib.request.urlopen(tel.server.url, timeout=5) as resp:
            text = resp.read().decode()
        assert 'kvtier_blocks_total{path="device_to_host"} 3.0' in text
        assert 'kvtier_blocks_total{path="host_to_disk"} 1.0' in text
    assert tel.server is None and tel.publisher is None


def test_g2_stored_events_chain_with_parents_and_tokens() -> None:
    """Blocks landing together are grouped into chains (each block's parent is the previous
    block's hash); each event carries the first block's parent and every block's tokens."""
    tel, sched, _ = make(
        host=6,
        disk=128,
        KVTIER_EVENTS="1",
        KVTIER_EVENTS_ENDPOINT="tcp://127.0.0.1:0",
        KVTIER_METRICS="0",
    )
    a_toks = list(range(1, 14))  # 3 full blocks + 1
    b_toks = [9, 9, 9, 9, 7, 7, 7, 7, 8, 8, 8, 8, 5]
    a, b = hashes(a_toks), hashes(b_toks)
    with tel:
        assert tel.publisher is not None
        with KvEventSubscriber(tel.publisher.endpoint) as sub:
            report(tel, sched, WorkerReport(0, restored=[b[0]]))  # also in G3: no G3 write
            _warm_up(tel, sched, sub)
            # B's first block (a G1 hit) lands in G2 before the rest of B arrives.
            lookup(sched, _Request("B0", b_toks[:5]), [9, 10], computed=4)
            plan = step(tel, sched, [("B0", [9, 10], 4)], {"B0": 1})
            report(tel, sched, WorkerReport(0, host_stored=plan.stores.hashes))
            while sub.receive(0.2) is not None:
                pass
            # Request A: blocks a0 -> a1 -> a2 (a0 a root); request B: b1 (child of b0, which
            # landed earlier) -> b2.
            lookup(sched, _Request("A", a_toks), [1, 2, 3, 4])
            lookup(sched, _Request("B", b_toks), [9, 5, 6, 7], computed=4)
            plan = step(
                tel, sched, [("A", [1, 2, 3, 4], 0), ("B", [9, 5, 6, 7], 4)], {"A": 13, "B": 9}
            )
            assert plan.stores.hashes == [*a[:3], *b[1:3]]
            report(tel, sched, WorkerReport(0, host_stored=plan.stores.hashes))
            # G3 blocks restored at start carry their file header's parent hash.
            report(tel, sched, WorkerReport(0, restored=[41, 40], restored_parents=[40, None]))
            assert sched.reset()
            tel.on_reset()
            got: list[KvEvent] = []
            while (m := sub.receive(1.0)) is not None:
                got.extend(m.batch.events)
    assert got == [
        BlockStored(tuple(a[:3]), None, tuple(a_toks[:12]), 4, MEDIUM_HOST),
        BlockStored(tuple(b[1:3]), b[0], tuple(b_toks[4:12]), 4, MEDIUM_HOST),
        BlockStored((41,), 40, (), 4, MEDIUM_DISK),
        BlockStored((40,), None, (), 4, MEDIUM_DISK),
        AllBlocksCleared(),
    ]


def _ints(obj: object) -> set[int]:
    """Every int inside a (nested) plain-data value: dataclasses, lists, tuples, dicts."""
    if isinstance(obj, bool):
        return set()
    if isinstance(obj, int):
        return {obj}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _ints([getattr(obj, f.name) for f in dataclasses.fields(obj)])
    if isinstance(obj, dict):
        return _ints(list(obj.keys())) | _ints(list(obj.values()))
    if isinstance(obj, list | tuple):
        return set().union(*(_ints(x) for x in obj)) if obj else set()
    return set()


def test_token_ids_stay_on_the_scheduler_side_until_the_stores_land_or_fail() -> None:
    """The plan sent to the workers carries no token ids; telemetry holds each planned block's
    tokens (events on) until its copy is reported, then none."""
    tel, sched, _ = make(host=8, disk=8, disk_filter=False, KVTIER_EVENTS="1", KVTIER_METRICS="0")
    assert tel.wants_tokens
    sched.process_reports([WorkerReport(0, restored=[])])
    req = _Request("a", [70_000 + i for i in range(14)])  # 3 full blocks + 2 tokens
    sched.get_num_new_matched_tokens(req, 0)
    tokens: dict[int, tuple[int, ...]] = {}
    plan = sched.build_step_plan([("a", [4, 5, 6, 7], 0)], [], {"a": 14}, block_tokens=tokens)
    h = sequence_hashes(req.all_token_ids, 4, salt_hash())
    assert plan.stores.hashes == h and [w.seq_hash for w in plan.disk_writes] == h
    assert tokens == {h[i]: tuple(70_000 + 4 * i + j for j in range(4)) for i in range(3)}
    assert {f.name for f in dataclasses.fields(StoreBatch)} == {
        "gpu_blocks",
        "host_slots",
        "hashes",
        "parents",
    }
    assert "token_ids" not in {f.name for f in dataclasses.fields(DiskWrite)}
    assert _ints(pickle.loads(pickle.dumps(plan))).isdisjoint(req.all_token_ids)
    tel.on_plan(plan, tokens)
    assert tel.held_token_blocks == 6  # 3 G2 stores + 3 G3 writes
    # Block 2's G2 store fails, and with it its G3 write (read from that slot); the rest lands.
    report(
        tel,
        sched,
        WorkerReport(
            0,
            host_stored=h[:2],
            host_store_failed=[h[2]],
            disk_stored=h[:2],
            disk_store_failed=[h[2]],
            stores_read_step=plan.step,
        ),
    )
    assert tel.held_token_blocks == 0


def test_without_events_no_tokens_are_asked_for() -> None:
    tel, sched, _ = make(disk=0)
    assert not tel.wants_tokens
    lookup(sched, _Request("a", [1, 2, 3, 4, 5]), [0, 1])
    plan = step(tel, sched, [("a", [0, 1], 0)], {"a": 5})
    assert len(plan.stores.hashes) == 1
    assert tel.held_token_blocks == 0


def test_events_need_the_planner_to_keep_its_registry_events() -> None:
    settings = load_settings({}, {"KVTIER_EVENTS": "1"})
    sched = KvTierScheduler(SchedulerConfig(block_size=BS, host_blocks=2, disk_blocks=0))
    with pytest.raises(ValueError, match="record_events"):
        ConnectorTelemetry(settings, sched, block_bytes=1000)


def test_pinned_bytes_are_what_the_workers_report_page_locked() -> None:
    tel, sched, _ = make(workers=2, host=8)
    report(tel, sched)  # a CPU engine: no worker pins, nothing is page-locked
    assert sample(tel, "kvtier_pinned_bytes") == 0
    report(tel, sched, WorkerReport(0, host_pinned_rows=3), WorkerReport(1, host_pinned_rows=5))
    assert sample(tel, "kvtier_pinned_bytes") == 8 * 1000  # rows of both ranks, 1000 B a row
    report(tel, sched, WorkerReport(0, host_pinned_rows=8))  # rank 1 reports no change
    assert sample(tel, "kvtier_pinned_bytes") == 13 * 1000
