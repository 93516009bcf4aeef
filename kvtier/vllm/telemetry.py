"""Metrics and KV events of the vLLM connector, fed from the plans and reports it already has.

Why here, and why from plans and reports: in vLLM's multi-process engine the workers may live in
other processes than the scheduler, and the scheduler half (in the engine-core process) is the
one place that sees everything: every copy it plans (``StepPlan``) and every completion the
workers report (``WorkerReport``). So the metrics server and the event publisher run there, next
to the scheduler half, and take their figures from those two plain-data messages; nothing extra
crosses a process boundary. The same design holds for one worker or many (tensor parallel): a
copy counts once all workers reported it.

What is derived:

- blocks, bytes and latency per path: a copy counts when the last worker reports it; its latency
  is from the step that planned it to that report (what the engine waits, queueing included);
- lookups and matched tokens per tier: from the scheduler half's counters (deltas per step),
  counted once per request vLLM schedules (``SchedulerCounters.query_tokens``), as vLLM counts
  its ``external_prefix_cache_queries/hits``, so ``kvtier_hit_rate`` and vLLM's external hit
  rate agree; load errors per tier (the workers say which tier failed);
- occupancy per tier (in use = pinned by a copy in flight, inactive = held and not pinned,
  free), sizes every step, the pinned count at most once per ``occupancy_interval_s`` (it is
  zero whenever nothing is in flight);
- events: ``BlockStored`` when a G2 store or G3 write lands (with its parent hash, which the plan
  carries, and its tokens, which the scheduler half hands over with the plan but never puts in
  it: the plan is pickled to every worker, the tokens are needed only here; they are held by
  sequence hash from :meth:`ConnectorTelemetry.on_plan` until the copy lands or fails, and only
  while events are on; a G2 chain landing together is one event); ``BlockRemoved`` when a G2
  slot is reused for another block (eviction), a G3 block is deleted, or a G3 block read back
  corrupt.

No torch (this runs in the scheduler half).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvtier.core.onboard_cost import TIERS
from kvtier.core.registry import StoreEvent
from kvtier.lifecycle import Lifecycle
from kvtier.ops.events import (
    MEDIUM_DISK,
    MEDIUM_HOST,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventsConfig,
    KvEvent,
    KvEventPublisher,
    events_from_tier_events,
)
from kvtier.ops.metrics import ONBOARD_TIERS, KvTierMetrics, MetricsConfig, MetricsServer
from kvtier.settings import KvTierSettings
from kvtier.vllm.metadata import StepPlan, WorkerReport
from kvtier.vllm.onboard import OnboardAdvisor
from kvtier.vllm.remote_telemetry import RemoteTelemetry


class _Counters(Protocol):
    query_tokens: int
    query_host_tokens: int
    query_disk_tokens: int
    host_load_failures: int
    disk_load_failures: int


class _Index(Protocol):
    num_slots: int

    def __len__(self) -> int: ...

    @property
    def num_pinned(self) -> int: ...


class _Filter(Protocol):
    rejections: int


class SchedulerView(Protocol):
    """What telemetry reads from the scheduler half (``KvTierScheduler`` has all of it)."""

    @property
    def counters(self) -> _Counters: ...

    @property
    def host(self) -> _Index: ...

    @property
    def disk(self) -> _Index: ...

    @property
    def filter(self) -> _Filter: ...

    def has_pending_work(self) -> bool: ...


@dataclass
class _Pending:
    started: float
    reports: int = 0
    failed: bool = False
    host_blocks: int = 0
    disk_blocks: int = 0
    parent: int | None = None
    tokens: tuple[int, ...] = ()
    from_host: bool = False


class ConnectorTelemetry(Lifecycle):
    """Metrics server + event publisher of one connector (scheduler role).

    ``metrics`` always counts (cheap); it is served only when ``settings.metrics`` is on, and
    events are published only when ``settings.events`` is on. Constructing it does nothing;
    :meth:`start` binds the ports.
    """

    def __init__(
        self,
        settings: KvTierSettings,
        *,
        block_size: int,
        block_bytes: int,
        num_workers: int = 1,
        data_parallel_rank: int = 0,
        occupancy_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = KvTierMetrics(clock=clock)
        self._settings = settings
        self._block_size = block_size
        self._block_bytes = block_bytes
        self._workers = num_workers
        self._dp_rank = data_parallel_rank
        self._interval = occupancy_interval_s
        self._clock = clock
        self.server: MetricsServer | None = None
        self.publisher: KvEventPublisher | None = None
        self._loads: dict[int, _Pending] = {}
        self._host: dict[int, _Pending] = {}
        self._disk: dict[int, _Pending] = {}
        self._host_slot_hash: dict[int, int] = {}
        self._host_announced: set[int] = set()
        self._disk_announced: set[int] = set()
        self._last: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
        self._last_occupancy = float("-inf")
        self._pinned = {"host": 0, "disk": 0}
        self._onboard_seen: dict[str, tuple[int, int]] = {}  # tier -> (loaded, skipped) counted
        self._onboard_beliefs: dict[str, tuple[float, float, int]] = {}  # tier -> last set
        self._onboard_prefill: float | None = None
        self._occupancy: dict[str, tuple[int, int, int]] = {}  # tier -> last set
        self._remote = RemoteTelemetry(block_size)  # G4: kvtier_remote_* and REMOTE events

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
        """Blocks whose tokens are held for a ``BlockStored`` event, until their copy lands or
        fails (zero once every planned store has been reported)."""
        return sum(1 for t in (self._host, self._disk) for p in t.values() if p.tokens)

    def on_plan(
        self, plan: StepPlan, block_tokens: Mapping[int, tuple[int, ...]] | None = None
    ) -> None:
        """Note the copies one step plans (call with every plan sent to the workers).

        ``block_tokens``: the tokens of the blocks it stores, by sequence hash (what
        ``KvTierScheduler.build_step_plan`` fills in); held until each copy lands or fails.
        """
        now = self._clock()
        tokens_of = block_tokens if block_tokens is not None else {}
        events: list[KvEvent] = []
        for job in plan.loads:
            self._loads[job.job_id] = _Pending(
                now, host_blocks=len(job.host_slots), disk_blocks=len(job.disk_hashes)
            )
        evicted: list[int] = []
        stores = plan.stores
        for i, (slot, h) in enumerate(zip(stores.host_slots, stores.hashes, strict=True)):
            old = self._host_slot_hash.get(slot)
            if old is not None and old != h and old in self._host_announced:
                self._host_announced.discard(old)
                evicted.append(old)
            self._host_slot_hash[slot] = h
            parent = stores.parents[i] if stores.parents else None
            self._host[h] = _Pending(now, parent=parent, tokens=tokens_of.get(h, ()))
        if evicted:
            events.append(BlockRemoved(tuple(evicted), MEDIUM_HOST))
        for w in plan.disk_writes:
            self._disk[w.seq_hash] = _Pending(
                now,
                parent=w.parent_hash,
                tokens=tokens_of.get(w.seq_hash, ()),
                from_host=w.host_slot >= 0,
            )
        gone = [h for h in plan.disk_deletes if h in self._disk_announced]
        if gone:
            self._disk_announced.difference_update(gone)
            events.append(BlockRemoved(tuple(gone), MEDIUM_DISK))
        self._publish(events)

    def on_reports(self, reports: Sequence[WorkerReport], scheduler: SchedulerView) -> None:
        """Count what the workers finished, then refresh the scheduler-derived figures."""
        now = self._clock()
        events: list[KvEvent] = []
        stored_host: list[StoreEvent] = []
        host_tokens: dict[int, tuple[int, ...]] = {}
        for r in reports:
            for job_id in r.loads_done:
                p = self._landed(self._loads, job_id)
                if p is not None:
                    if p.host_blocks:
                        self._transfer("host_to_device", p.host_blocks, now - p.started)
                    if p.disk_blocks:
                        self._transfer("disk_to_device", p.disk_blocks, now - p.started)
            for h in r.host_stored:
                p = self._landed(self._host, h)
                if p is not None and not p.failed:
                    self._transfer("device_to_host", 1, now - p.started)
                    self._host_announced.add(h)
                    if self.publisher is not None:
                        stored_host.append(StoreEvent(len(stored_host), "G2", h, p.parent))
                        host_tokens[h] = p.tokens
            for h in r.host_store_failed:
                self._fail(self._host, h)
            for h in r.disk_stored:
                p = self._landed(self._disk, h)
                if p is not None and not p.failed:
                    path = "host_to_disk" if p.from_host else "device_to_disk"
                    self._transfer(path, 1, now - p.started)
                    self._disk_announced.add(h)
                    tokens = p.tokens if len(p.tokens) == self._block_size else ()
                    events.append(
                        BlockStored((h,), p.parent, tokens, self._block_size, MEDIUM_DISK)
                    )
            for h in r.disk_store_failed:
                self._fail(self._disk, h)
            bad = [h for h in r.disk_bad if h in self._disk_announced]
            if bad:
                self._disk_announced.difference_update(bad)
                events.append(BlockRemoved(tuple(bad), MEDIUM_DISK))
            if r.restored:
                parent_of = dict(zip(r.restored, r.restored_parents, strict=False))
                fresh = [h for h in r.restored if h not in self._disk_announced]
                self._disk_announced.update(fresh)
                events.extend(
                    BlockStored((h,), parent_of.get(h), (), self._block_size, MEDIUM_DISK)
                    for h in fresh
                )
        if stored_host:  # built only with a publisher
            # Chains of blocks (each one's parent the previous one's hash) become one event whose
            # parent is the first block's parent, as vLLM batches a request's blocks.
            events[:0] = events_from_tier_events(stored_host, self._block_size, host_tokens.get)
        events.extend(self._remote.events(reports))
        self._publish(events)
        self._observe(scheduler, now)
        planner = getattr(scheduler, "remote", None)
        if planner is not None:
            self._remote.observe(planner, self.metrics)

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
        """kvtier's tiers were emptied (``KvTierScheduler.reset``): one ``AllBlocksCleared``."""
        self._host_announced.clear()
        self._disk_announced.clear()
        self._host_slot_hash.clear()
        self._publish([AllBlocksCleared()])

    # -- internals ----------------------------------------------------------------------------

    def _landed(self, table: dict[int, _Pending], key: int) -> _Pending | None:
        """Count one worker's report; return the entry once every worker reported it."""
        p = table.get(key)
        if p is None:
            return None
        p.reports += 1
        if p.reports < self._workers:
            return None
        del table[key]
        return p

    def _fail(self, table: dict[int, _Pending], key: int) -> None:
        p = table.get(key)
        if p is not None:
            p.failed = True
            self._landed(table, key)

    def _transfer(self, path: str, blocks: int, seconds: float) -> None:
        nbytes = blocks * self._block_bytes * self._workers
        self.metrics.record_transfer(path, blocks, nbytes, max(0.0, seconds))

    def _observe(self, scheduler: SchedulerView, now: float) -> None:
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
