"""Metrics and KV events of the vLLM connector, read from the planner and the workers' reports.

Why here: in vLLM's multi-process engine the workers may live in other processes, and the
scheduler half (in the engine-core process) is the one place that sees everything: it plans every
copy and applies every report. So the metrics server and the event publisher run beside it and
read what it already keeps; nothing extra crosses a process boundary, and a copy counts once all
workers (tensor parallel) reported it.

What is read, each step:

- the planner's ``TierRegistry`` events (kept only while KV events are on), the one record of what
  G2 and G3 hold: ``BlockStored`` when a block lands (a chain landing in G2 together is one event,
  as vLLM batches a request's blocks; G3 one event per block), ``BlockRemoved`` when one leaves
  (eviction, a G3 block read back corrupt), ``AllBlocksCleared`` on a cache reset;
- the planner's landed copies (``TierPlanner.take_transfers``): blocks, bytes and latency per
  path, from planning to the report that completed it (queueing included);
- the scheduler half's counters (deltas per step): lookups and matched tokens per tier, counted
  once per request vLLM schedules (as vLLM counts ``external_prefix_cache_queries/hits``, so the
  two hit rates agree); load errors per tier; filter rejections;
- occupancy per tier: sizes every step, the pinned count at most once per ``occupancy_interval_s``;
  the G2 bytes the workers' pinners page-locked (CUDA), every step.

Held here while events are on: the tokens of blocks whose copy is in flight, until it lands (its
``BlockStored`` carries them) or fails; the registry and the plan carry hashes only. No torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace

from kvtier.core.onboard_cost import TIERS
from kvtier.core.registry import RemoveEvent, StoreEvent, TierEvent
from kvtier.executor.jobs import StepPlan, WorkerReport
from kvtier.lifecycle import Lifecycle
from kvtier.ops.event_stream import EventsConfig, KvEventPublisher
from kvtier.ops.event_wire import (
    MEDIUM_DISK,
    MEDIUM_REMOTE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)
from kvtier.ops.events import events_from_tier_events
from kvtier.ops.metrics import ONBOARD_TIERS, KvTierMetrics
from kvtier.ops.metrics_server import MetricsConfig, MetricsServer
from kvtier.plan.planner import G2, G3
from kvtier.settings import KvTierSettings
from kvtier.vllm.onboard import OnboardAdvisor
from kvtier.vllm.remote_plan import RemoteCounters, RemotePlanner
from kvtier.vllm.scheduler import KvTierScheduler


class RemoteTelemetry:
    """G4's share: ``kvtier_remote_*`` metrics from the ``RemotePlanner``'s counter deltas (its
    lookups, the workers' fetch and write figures folded in), and its ``BlockStored`` events."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._last = RemoteCounters()

    def events(self, reports: Sequence[WorkerReport]) -> list[KvEvent]:
        """``BlockStored`` (medium REMOTE) per block rank 0 wrote (each rank writes a shard)."""
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


class ConnectorTelemetry(Lifecycle):
    """Metrics server + event publisher of one connector's scheduler half.

    ``metrics`` always counts (cheap); it is served only when ``settings.metrics`` is on, and
    events are published only when ``settings.events`` is on (then the scheduler's planner must
    keep its registry events: ``SchedulerConfig.record_events``). Constructing it does nothing;
    :meth:`start` binds the ports."""

    def __init__(
        self,
        settings: KvTierSettings,
        scheduler: KvTierScheduler,
        *,
        block_bytes: int,
        data_parallel_rank: int = 0,
        occupancy_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.events and not scheduler.planner.config.record_events:
            raise ValueError("KV events need SchedulerConfig.record_events=True")
        self.metrics = KvTierMetrics(clock=clock)
        self._settings = settings
        self._sched = scheduler
        self._block_size = scheduler.config.block_size
        self._block_bytes = block_bytes
        self._workers = scheduler.config.num_workers
        self._dp_rank = data_parallel_rank
        self._interval = occupancy_interval_s
        self._clock = clock
        self.server: MetricsServer | None = None
        self.publisher: KvEventPublisher | None = None
        self._tokens: dict[str, dict[int, tuple[int, ...]]] = {G2: {}, G3: {}}
        self._last: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
        self._last_occupancy = float("-inf")
        self._pinned = {"host": 0, "disk": 0}
        self._onboard_seen: dict[str, tuple[int, int]] = {}  # tier -> (loaded, skipped) counted
        self._onboard_beliefs: dict[str, tuple[float, float, int]] = {}  # tier -> last set
        self._onboard_prefill: float | None = None
        self._occupancy: dict[str, tuple[int, int, int]] = {}  # tier -> last set
        self._remote = RemoteTelemetry(self._block_size)  # G4: kvtier_remote_* and REMOTE events

    def start(self) -> ConnectorTelemetry:
        """Serve metrics and open the event socket, as the settings ask."""
        s = self._settings
        if s.metrics and self.server is None:
            cfg = MetricsConfig(enabled=True, port=s.metrics_port, host=s.metrics_host)
            self.server = MetricsServer(self.metrics, cfg).start()
        if s.events and self.publisher is None:
            ecfg = EventsConfig(
                endpoint=s.events_endpoint,
                replay_endpoint=s.events_replay_endpoint,
                topic=s.events_topic,
                data_parallel_rank=self._dp_rank,
            )
            try:
                self.publisher = KvEventPublisher(ecfg).start()
            except OSError:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Stop serving and publishing. Safe to call twice."""
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- feeding ------------------------------------------------------------------------------

    @property
    def wants_tokens(self) -> bool:
        """Whether :meth:`on_plan` should be given the planned blocks' tokens (events are on)."""
        return self._settings.events

    @property
    def held_token_blocks(self) -> int:
        """Planned copies whose block tokens are held for a ``BlockStored`` event, until the copy
        lands or fails (zero once every planned store has been reported)."""
        return sum(len(t) for t in self._tokens.values())

    def on_plan(
        self, plan: StepPlan, block_tokens: Mapping[int, tuple[int, ...]] | None = None
    ) -> None:
        """Publish what planning this step evicted; hold the tokens of the blocks it stores
        (``block_tokens``, by hash, as ``KvTierScheduler.build_step_plan`` fills it) per tier,
        until each copy lands or fails."""
        if block_tokens:
            for tier, hashes in (
                (G2, plan.stores.hashes),
                (G3, [w.seq_hash for w in plan.disk_writes]),
            ):
                held = self._tokens[tier]
                for h in hashes:
                    got = block_tokens.get(h)
                    if got:
                        held[h] = got
        self._publish(self._wire(self._sched.planner.registry.drain_events(), ()))

    def on_reports(self, reports: Sequence[WorkerReport]) -> None:
        """After the scheduler half applied this step's reports: publish what landed and left,
        count the copies that completed, refresh the scheduler-derived figures."""
        sched = self._sched
        planner = sched.planner
        restored: list[int] = []
        for r in reports:
            restored.extend(r.restored or ())
            for tier, failed in ((G2, r.host_store_failed), (G3, r.disk_store_failed)):
                for h in failed:
                    self._tokens[tier].pop(h, None)
        events = self._wire(planner.registry.drain_events(), restored)
        events.extend(self._remote.events(reports))
        self._publish(events)
        self.metrics.record_transfers(planner.take_transfers(), self._block_bytes * self._workers)
        self._observe(self._clock())
        if sched.remote is not None:
            self._remote.observe(sched.remote, self.metrics)

    def on_onboard(self, advisor: OnboardAdvisor) -> None:
        """Cost-aware onboarding's tokens loaded / skipped, estimates next to measurements and
        current beliefs (call once a step, after ``advisor.step_done()``)."""
        c = advisor.counters
        m = advisor.model
        for tier, label in zip(TIERS, ONBOARD_TIERS, strict=True):
            loaded, skipped = c.loaded_tokens[tier], c.skipped_tokens[tier]
            seen_loaded, seen_skipped = self._onboard_seen.get(tier, (0, 0))
            if (loaded, skipped) != (seen_loaded, seen_skipped):
                self.metrics.record_onboard_tokens(
                    label, loaded - seen_loaded, skipped - seen_skipped
                )
                self._onboard_seen[tier] = (loaded, skipped)
            belief = (m.tier_bandwidth(tier), m.tier_latency(tier), m.queued_bytes[tier])
            if belief != self._onboard_beliefs.get(tier):  # set when it changes, not every step
                self._onboard_beliefs[tier] = belief
                self.metrics.set_onboard_model(label, *belief)
        for e in advisor.take_estimates():
            self.metrics.record_onboard_estimate(e.kind, e.estimated, e.measured)
        prefill = m.prefill_seconds(0, 1)
        if prefill != self._onboard_prefill:
            self._onboard_prefill = prefill
            self.metrics.set_onboard_prefill(prefill)

    def on_reset(self) -> None:
        """kvtier's tiers were emptied (``KvTierScheduler.reset``): one ``AllBlocksCleared``
        instead of a removal per block."""
        self._sched.planner.registry.drain_events()
        self._publish([AllBlocksCleared()])

    # -- internals ----------------------------------------------------------------------------

    def _wire(self, events: list[TierEvent], restored: Sequence[int]) -> list[KvEvent]:
        """Registry events as published: G2's first (a chain of stores is one ``BlockStored``),
        then G3's (one ``BlockStored`` per block, a run of removes one ``BlockRemoved``), the
        blocks of the G3 index restored at start-up last, in the order ``restored`` lists them.
        A stored block's held tokens go into its event and are dropped."""
        g2 = [e for e in events if e.tier == G2]
        out = events_from_tier_events(g2, self._block_size, self._tokens[G2].get)
        for e in g2:
            if isinstance(e, StoreEvent):
                self._tokens[G2].pop(e.sequence_hash, None)
        pos = {h: i for i, h in enumerate(dict.fromkeys(restored))}
        found: list[StoreEvent] = []
        gone: list[int] = []
        for e in events:
            if e.tier != G3:
                continue
            if isinstance(e, RemoveEvent):
                gone.append(e.sequence_hash)
                continue
            if e.sequence_hash in pos:
                found.append(e)
                continue
            if gone:
                out.append(BlockRemoved(tuple(gone), MEDIUM_DISK))
                gone = []
            out.append(self._disk_stored(e))
        if gone:
            out.append(BlockRemoved(tuple(gone), MEDIUM_DISK))
        found.sort(key=lambda e: pos[e.sequence_hash])
        out.extend(self._disk_stored(e) for e in found)
        return out

    def _disk_stored(self, e: StoreEvent) -> BlockStored:
        tokens, bs = self._tokens[G3].pop(e.sequence_hash, ()), self._block_size
        tokens = tokens if len(tokens) == bs else ()
        return BlockStored((e.sequence_hash,), e.parent_sequence_hash, tokens, bs, MEDIUM_DISK)

    def _observe(self, now: float) -> None:
        scheduler = self._sched
        c = scheduler.counters
        cur = (
            c.query_tokens,
            c.query_host_tokens,
            c.query_disk_tokens,
            c.host_load_failures,
            c.disk_load_failures,
            scheduler.filter.rejections,
        )
        d = [a - b for a, b in zip(cur, self._last, strict=True)]
        self._last = cur
        looked, host, disk, host_errors, disk_errors, rejected = d
        if looked:
            # Counted when vLLM allocates for the lookup, so retries while a request waits for
            # G1 space count once: the same tokens vLLM's external_prefix_cache_* count.
            self.metrics.record_lookup_tokens(looked, host, disk)
        # Workers report the tier of each failed load (G2 "host", G3 "disk").
        if host_errors:
            self.metrics.record_load_errors("host", host_errors)
        if disk_errors:
            self.metrics.record_load_errors("disk", disk_errors)
        if rejected:
            self.metrics.record_filter_rejections(rejected)
        # Sizes are O(1) and refreshed every step. Pins exist only while copies are in flight;
        # counting them walks the index, so that happens at most once per interval.
        busy = scheduler.has_pending_work()
        if not busy:
            self._pinned = {"host": 0, "disk": 0}
        elif now - self._last_occupancy >= self._interval:
            self._last_occupancy = now
            self._pinned = {"host": scheduler.host.num_pinned, "disk": scheduler.disk.num_pinned}
        self.metrics.set_pinned_bytes(scheduler.planner.pinned_rows_total * self._block_bytes)
        for tier, index in (("host", scheduler.host), ("disk", scheduler.disk)):
            held = len(index)
            pinned = min(held, self._pinned[tier])
            occupancy = (pinned, held - pinned, index.num_slots - held)
            if occupancy != self._occupancy.get(tier):
                self._occupancy[tier] = occupancy
                self.metrics.set_pool_occupancy(tier, *occupancy)

    def _publish(self, events: list[KvEvent]) -> None:
        if events and self.publisher is not None:
            self.publisher.publish(events)
