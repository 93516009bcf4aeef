"""G4 metrics and events, from the plain data the scheduler half already has: planner counters
become ``kvtier_remote_*`` series (hit rate, blocks/bytes/seconds per op, misses by reason, drops,
breaker state) and written hashes become ``BlockStored`` events with medium REMOTE."""

from __future__ import annotations

from kvtier.executor.jobs import RemoteReport, WorkerReport
from kvtier.ops.event_wire import MEDIUM_REMOTE, BlockStored
from kvtier.ops.metrics import KvTierMetrics
from kvtier.storage.remote import RemoteConfig
from kvtier.vllm.remote_plan import RemotePlanner
from kvtier.vllm.telemetry import RemoteTelemetry


def test_counters_become_metrics_and_written_blocks_events() -> None:
    planner = RemotePlanner(RemoteConfig("redis://127.0.0.1:1/0"))  # never started: no I/O
    metrics = KvTierMetrics()
    tel = RemoteTelemetry(block_size=16)
    c = planner.counters
    c.lookups, c.lookup_blocks, c.hit_blocks, c.lookup_seconds = 2, 10, 4, 0.002
    planner.on_report(
        0,
        RemoteReport(
            namespace="ns",
            written=[7, 8],
            written_parents=[None, 7],
            fetched_blocks=4,
            fetched_bytes=4 << 21,
            fetch_seconds=0.01,
            fetch_corrupt=1,
            write_dropped=3,
            breaker_state="open",
        ),
    )
    tel.observe(planner, metrics)
    tel.observe(planner, metrics)  # no change: nothing counted twice
    get = metrics.registry.get_sample_value
    assert get("kvtier_remote_lookup_blocks_total") == 10
    assert get("kvtier_remote_hit_blocks_total") == 4
    assert get("kvtier_remote_hit_rate") == 0.4
    assert get("kvtier_remote_bytes_total", {"op": "get"}) == 4 << 21
    assert get("kvtier_remote_blocks_total", {"op": "put"}) == 2
    assert get("kvtier_remote_misses_total", {"reason": "corrupt"}) == 1
    assert get("kvtier_remote_write_dropped_total") == 3
    assert get("kvtier_remote_breaker_state", {"side": "worker"}) == 2
    assert get("kvtier_remote_breaker_state", {"side": "scheduler"}) == 0
    assert get("kvtier_hit_rate", {"tier": "host"}) == 0.0  # other tiers' windows untouched
    report = WorkerReport(rank=0, remote=RemoteReport(written=[7, 8], written_parents=[None, 7]))
    other = WorkerReport(rank=1, remote=RemoteReport(written=[7, 8], written_parents=[None, 7]))
    events = tel.events([report, other])
    assert events == [
        BlockStored((7,), None, (), 16, MEDIUM_REMOTE),
        BlockStored((8,), 7, (), 16, MEDIUM_REMOTE),
    ]
