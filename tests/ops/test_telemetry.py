"""Connector telemetry: metrics and events derived from step plans and worker reports."""

from __future__ import annotations

import dataclasses
import pickle
import urllib.request
from dataclasses import dataclass

from kvtier.hashing import salt_hash, sequence_hashes
from kvtier.ops.events import (
    MEDIUM_DISK,
    MEDIUM_HOST,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventSubscriber,
)
from kvtier.settings import load_settings
from kvtier.vllm.metadata import DiskWrite, LoadJob, StepPlan, StoreBatch, WorkerReport
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig
from kvtier.vllm.telemetry import ConnectorTelemetry


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


def make(workers: int = 1, **env: str) -> tuple[ConnectorTelemetry, KvTierScheduler, Clock]:
    clock = Clock()
    settings = load_settings({}, {"KVTIER_METRICS_PORT": "0", **env})
    sched = KvTierScheduler(SchedulerConfig(block_size=4, host_blocks=2, disk_blocks=4))
    tel = ConnectorTelemetry(
        settings, block_size=4, block_bytes=1000, num_workers=workers, clock=clock
    )
    return tel, sched, clock


def sample(tel: ConnectorTelemetry, name: str, **labels: str) -> float | None:
    return tel.metrics.registry.get_sample_value(name, labels)


def test_transfers_count_once_all_workers_report_with_plan_to_report_latency() -> None:
    tel, sched, clock = make(workers=2)
    tel.on_plan(
        StepPlan(
            step=1,
            loads=[
                LoadJob(
                    7,
                    "r0",
                    True,
                    host_slots=[0, 1],
                    host_gpu_blocks=[5, 6],
                    disk_hashes=[33],
                    disk_gpu_blocks=[7],
                )
            ],
            stores=StoreBatch(gpu_blocks=[1, 2], host_slots=[0, 1], hashes=[11, 12]),
            disk_writes=[DiskWrite(11, None, host_slot=0), DiskWrite(13, 12, gpu_block=3)],
        )
    )
    clock.now += 0.125
    tel.on_reports([WorkerReport(0, host_stored=[11, 12], loads_done=[7])], sched)
    assert sample(tel, "kvtier_blocks_total", path="device_to_host") == 0  # one of two workers
    clock.now += 0.125
    tel.on_reports(
        [
            WorkerReport(1, host_stored=[11, 12], loads_done=[7], disk_stored=[11, 13]),
            WorkerReport(0, disk_stored=[11], disk_store_failed=[13]),
        ],
        sched,
    )
    assert sample(tel, "kvtier_blocks_total", path="device_to_host") == 2
    assert sample(tel, "kvtier_bytes_total", path="device_to_host") == 2 * 1000 * 2
    assert sample(tel, "kvtier_blocks_total", path="host_to_device") == 2
    assert sample(tel, "kvtier_blocks_total", path="disk_to_device") == 1
    assert sample(tel, "kvtier_blocks_total", path="host_to_disk") == 1
    assert sample(tel, "kvtier_blocks_total", path="device_to_disk") == 0  # one worker failed
    assert sample(tel, "kvtier_transfer_seconds_sum", path="host_to_device") == 0.25
    assert sample(tel, "kvtier_transfer_seconds_bucket", path="device_to_host", le="0.1") == 0
    assert sample(tel, "kvtier_transfer_seconds_bucket", path="device_to_host", le="0.25") == 2


def test_lookups_filter_errors_and_occupancy_come_from_the_scheduler() -> None:
    tel, sched, _ = make()
    sched.counters.query_tokens += 40
    sched.counters.query_host_tokens += 16
    sched.counters.query_disk_tokens += 4
    sched.process_reports([WorkerReport(0, host_load_failed=2, disk_load_failed=3)])
    for h in (1, 1, 2):
        sched.filter.sighting(h)  # first sightings are rejected (the filter is on by default)
    slot = sched.host.reserve(99)
    assert slot is not None
    tel.on_reports([], sched)
    assert sample(tel, "kvtier_lookup_tokens_total") == 40
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
    tel.on_reports([], sched)  # no change: nothing counted twice
    assert sample(tel, "kvtier_lookup_tokens_total") == 40


def test_events_stream_and_metrics_endpoint() -> None:
    tel, sched, _ = make(
        KVTIER_METRICS="1", KVTIER_EVENTS="1", KVTIER_EVENTS_ENDPOINT="tcp://127.0.0.1:0"
    )
    assert tel.server is None and tel.publisher is None  # nothing before start()
    with tel:
        assert tel.server is not None and tel.publisher is not None
        with KvEventSubscriber(tel.publisher.endpoint) as sub:
            for i in range(100):  # until the subscription has propagated
                tel.on_reports([WorkerReport(0, restored=[1000 + i])], sched)
                if sub.receive(0.05) is not None:
                    break
            while sub.receive(0.2) is not None:
                pass
            tel.on_plan(StepPlan(1, stores=StoreBatch([1, 2], [0, 1], [11, 12], [None, 11])))
            tel.on_reports([WorkerReport(0, host_stored=[11, 12])], sched)
            tel.on_plan(
                StepPlan(
                    2,
                    stores=StoreBatch([3], [0], [13], [12]),  # slot 0 reused: 11 was evicted
                    disk_writes=[DiskWrite(12, 11, host_slot=1)],
                ),
                {12: (5, 6, 7, 8)},
            )
            tel.on_reports([WorkerReport(0, host_stored=[13], disk_stored=[12])], sched)
            tel.on_plan(StepPlan(3, disk_deletes=[12, 777]))  # 777 was never announced
            got = []
            while (b := sub.receive(1.0)) is not None:
                got.extend(b.batch.events)
            assert got == [
                BlockStored((11, 12), None, (), 4, MEDIUM_HOST),
                BlockRemoved((11,), MEDIUM_HOST),
                BlockStored((13,), 12, (), 4, MEDIUM_HOST),
                BlockStored((12,), 11, (5, 6, 7, 8), 4, MEDIUM_DISK),
                BlockRemoved((12,), MEDIUM_DISK),
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
        KVTIER_EVENTS="1", KVTIER_EVENTS_ENDPOINT="tcp://127.0.0.1:0", KVTIER_METRICS="0"
    )
    with tel:
        assert tel.publisher is not None
        with KvEventSubscriber(tel.publisher.endpoint) as sub:
            for i in range(100):  # until the subscription has propagated
                tel.on_reports([WorkerReport(0, restored=[1000 + i])], sched)
                if sub.receive(0.05) is not None:
                    break
            while sub.receive(0.2) is not None:
                pass
            # Request A: blocks 21 -> 22 -> 23 (21 a root); request B: 31 (child of 30, which
            # landed earlier) -> 32. B's block sits between A's in the batch.
            stores = StoreBatch(
                gpu_blocks=[1, 2, 3, 4, 5],
                host_slots=[0, 1, 2, 3, 4],
                hashes=[21, 22, 31, 23, 32],
                parents=[None, 21, 30, 22, 31],
            )
            tokens = {
                21: (1, 2, 3, 4),
                22: (5, 6, 7, 8),
                31: (9, 9, 9, 9),
                23: (10, 11, 12, 13),
                32: (7,) * 4,
            }
            tel.on_plan(StepPlan(1, stores=stores), tokens)
            tel.on_reports([WorkerReport(0, host_stored=[21, 22, 23, 31, 32])], sched)
            # G3 blocks restored at start carry their file header's parent hash.
            tel.on_reports([WorkerReport(0, restored=[41, 40], restored_parents=[40, None])], sched)
            tel.on_reset()
            got: list[KvEvent] = []
            while (b := sub.receive(1.0)) is not None:
                got.extend(b.batch.events)
    assert got == [
        BlockStored((21, 22, 23), None, (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13), 4, MEDIUM_HOST),
        BlockStored((31, 32), 30, (9, 9, 9, 9, 7, 7, 7, 7), 4, MEDIUM_HOST),
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
    tel, _, _ = make(KVTIER_EVENTS="1", KVTIER_METRICS="0")
    assert tel.wants_tokens
    sched = KvTierScheduler(
        SchedulerConfig(block_size=4, host_blocks=8, disk_blocks=8, disk_filter=False)
    )
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
    report = WorkerReport(
        0,
        host_stored=h[:2],
        host_store_failed=[h[2]],
        disk_stored=h[:2],
        disk_store_failed=[h[2]],
        stores_read_step=plan.step,
    )
    sched.process_reports([report])
    tel.on_reports([report], sched)
    assert tel.held_token_blocks == 0


def test_without_events_no_tokens_are_asked_for() -> None:
    tel, _, _ = make()
    assert not tel.wants_tokens
    tel.on_plan(StepPlan(1, stores=StoreBatch([1], [0], [11], [None])))
    assert tel.held_token_blocks == 0
