"""G4's share of the connector's telemetry: ``kvtier_remote_*`` metrics and ``REMOTE`` events.

Why here: like the rest of ``ConnectorTelemetry``, G4's figures come from what the scheduler half
already has: its ``RemotePlanner``'s counters (its own lookups, plus the workers' fetch and write
figures folded in from their ``RemoteReport``s) and the hashes the workers report written.
``RemoteTelemetry`` turns counter deltas into metrics each step and written hashes into
``BlockStored`` events with medium ``REMOTE`` (rank 0's report only: every rank writes its own
shard of the same block). No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace

from kvtier.executor.jobs import WorkerReport
from kvtier.ops.event_wire import MEDIUM_REMOTE, BlockStored, KvEvent
from kvtier.ops.metrics import KvTierMetrics
from kvtier.vllm.remote_plan import RemoteCounters, RemotePlanner

__all__ = ["RemoteTelemetry"]


class RemoteTelemetry:
    """Per-step G4 metrics and events (see the module docstring)."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._last = RemoteCounters()

    def events(self, reports: Sequence[WorkerReport]) -> list[KvEvent]:
        """``BlockStored`` (medium REMOTE) for each block rank 0 wrote to G4."""
        out: list[KvEvent] = []
        for r in reports:
            if r.remote is None or r.rank != 0:
                continue
            parents = r.remote.written_parents
            for i, h in enumerate(r.remote.written):
                parent = parents[i] if i < len(parents) else None
                out.append(BlockStored((h,), parent, (), self._block_size, MEDIUM_REMOTE))
        return out

    def observe(self, planner: RemotePlanner, metrics: KvTierMetrics) -> None:
        """Record what changed in the planner's counters since the last step."""
        cur = planner.counters
        d = RemoteCounters(
            **{
                f.name: getattr(cur, f.name) - getattr(self._last, f.name)
                for f in fields(RemoteCounters)
                if f.name != "worker_breaker"
            }
        )
        self._last = replace(cur)
        m = metrics.remote
        if d.lookup_blocks or d.hit_blocks:
            metrics.record_remote_lookup(max(d.lookup_blocks, d.hit_blocks), d.hit_blocks)
        if d.lookups or d.lookup_seconds:
            m.record_op("lookup", d.lookup_blocks, 0, d.lookup_seconds)
        if d.fetched_blocks or d.fetch_seconds:
            m.record_op("get", d.fetched_blocks, d.fetched_bytes, d.fetch_seconds)
        if d.written_blocks or d.write_seconds:
            m.record_op("put", d.written_blocks, d.written_bytes, d.write_seconds)
        for reason, n in (
            ("missing", d.fetch_missing),
            ("corrupt", d.fetch_corrupt),
            ("failed", d.fetch_failed),
            ("lookup_timeout", d.lookup_timeouts),
            ("lookup_error", d.lookup_errors),
        ):
            if n:
                m.record_misses(reason, n)
        if d.write_dropped or d.write_failed:
            m.record_writes(d.write_dropped, d.write_failed)
        m.set_breaker("scheduler", planner.breaker_state)
        m.set_breaker("worker", cur.worker_breaker)
