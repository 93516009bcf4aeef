"""The scheduler half of the connector: decides what to load and what to store. No torch.

Why this exists: vLLM asks it, for each waiting request, how many more prompt tokens kvtier can
supply beyond vLLM's own G1 prefix hit, and every step what the workers must copy. It is vLLM glue
around kvtier's control plane: it tracks requests (``kvtier.vllm.requests``) and asks the
``TierPlanner`` (kvtier.plan) every tier question (what matches, which slot a store fills, what a
load pins); in vLLM's multi-process engine it cannot see the workers' memory. It names exact slots
and GPU blocks in a ``StepPlan``; the planner applies the workers' ``WorkerReport``s.

Rules it keeps:

- Requests are hashed with KVBM's chained sequence hash, seeded by their cache salt and LoRA name,
  so requests with different salts never share a block.
- Matching starts at the end of vLLM's G1 hit; full blocks only, never the whole prompt (vLLM
  must compute at least one token). Every block a step completes (prompt or decode) is offered
  to the planner once (G2, and G3 through the cascade).
- A request that finishes while stores of its blocks may still read GPU memory keeps its blocks
  (``request_finished`` returns True) until the workers confirm (``finished_sending``): only
  CUDA workers, whose stores are asynchronous (``SchedulerConfig.async_store_reads``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvtier.config import KvTierConfig, require_count
from kvtier.executor.jobs import (
    DiskWrite,
    LoadJob,
    RemoteLoad,
    StepPlan,
    StoreBatch,
    WorkerReport,
)
from kvtier.hashing import SequenceHashes, salt_hash
from kvtier.plan.counters import SchedulerCounters
from kvtier.plan.planner import G2, G3, PlannerConfig, TierPlanner
from kvtier.vllm.onboard import OnboardAdvisor
from kvtier.vllm.remote_plan import RemotePlanner
from kvtier.vllm.requests import RequestLike, RequestState, lora_name, scheduled_rows

__all__ = ["KvTierScheduler", "SchedulerConfig", "SchedulerCounters"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Geometry and policy of the scheduler half, derived from the config root (``from_config``);
    its tier sizes and worker count are checked by the planner's own rules (``PlannerConfig``)."""

    block_size: int
    host_blocks: int
    disk_blocks: int
    disk_filter: bool = True
    layerwise_onboard: bool = False
    num_workers: int = 1
    async_store_reads: bool = False
    """True when workers may still read a store's GPU blocks after the step that planned it (CUDA:
    an asynchronous copy stream; the CPU worker finishes them in ``wait_for_save``); then
    ``request_finished`` keeps a finished request's blocks until the workers confirm."""
    layerwise_disk: bool = True
    """With ``layerwise_onboard``, whether matches with G3 blocks load inside the forward pass
    too. False sends them through the asynchronous path: vLLM with asynchronous scheduling (its
    GPU default) has already scheduled the next step when an in-pass load fails, so it would emit
    one token computed from the missing block; a G3 read can fail (a corrupt file), a G2 copy
    cannot once issued."""
    pinned_host_rows: bool = False
    """True when workers pin G2 in chunks after start-up (CUDA): G2 slots are handed out only
    below the smallest pinned-row count every worker has reported (``WorkerReport``)."""
    record_events: bool = False
    """Keep the planner's Store/Remove events for the telemetry's KV events (events on)."""

    def __post_init__(self) -> None:
        require_count("block_size", self.block_size, low=1)
        self.planner()  # validates the tier sizes and the worker count

    @classmethod
    def from_config(cls, config: KvTierConfig, *, record_events: bool = False) -> SchedulerConfig:
        """The scheduler half's share of the one configuration root (the fields' notes say why
        CUDA and asynchronous scheduling set theirs). ``record_events``: KV events are on."""
        return cls(
            block_size=config.model.block_size,
            host_blocks=config.host_blocks,
            disk_blocks=config.disk_blocks,
            disk_filter=config.disk_filter,
            layerwise_onboard=config.layerwise_onboard,
            num_workers=config.num_workers,
            async_store_reads=config.device != "cpu",
            pinned_host_rows=config.device != "cpu",
            layerwise_disk=not config.async_scheduling,
            record_events=record_events,
        )

    def planner(self) -> PlannerConfig:
        """The planner's share of this configuration."""
        return PlannerConfig(
            host_blocks=self.host_blocks,
            disk_blocks=self.disk_blocks,
            disk_filter=self.disk_filter,
            num_workers=self.num_workers,
            pinned_host_rows=self.pinned_host_rows,
            record_events=self.record_events,
        )


class KvTierScheduler:
    """Scheduler half (see the module docstring). All calls come from vLLM's scheduler thread."""

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        remote: RemotePlanner | None = None,
        onboard: OnboardAdvisor | None = None,
    ):
        self.config = config
        self.remote = remote  # G4 lookups and write-behind planning (kvtier.vllm.remote_plan)
        self.onboard = onboard  # cost-aware cap on each load (kvtier.vllm.onboard)
        self.counters = SchedulerCounters()
        self.planner = TierPlanner(config.planner(), counters=self.counters, clock=clock)
        self.host = self.planner.host  # what G2 and G3 hold, and the G2 -> G3 filter
        self.disk = self.planner.disk
        self.filter = self.planner.filter
        self._reqs: dict[str, RequestState] = {}
        self._step = 0
        self._confirmed_step = -1
        self._plan_loads: list[LoadJob] = []
        self._delayed: list[str] = []
        self._delayed_waiting: set[str] = set()

    # -- vLLM scheduler-side API --------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: RequestLike, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens kvtier can load beyond ``num_computed_tokens`` (block aligned), and whether the
        load is asynchronous. None while the G3 index is not known yet (first step)."""
        if not self.planner.disk_ready:
            return None, False
        st = self._track(request)
        bs = self.config.block_size
        start = num_computed_tokens // bs
        limit = (request.num_tokens - 1) // bs  # never the whole prompt
        hashes = st.hashes.hashes
        host_end, disk_end = self.planner.match(hashes, start, limit)
        n = disk_end
        if self.remote is not None and not self.config.layerwise_onboard and n < limit:
            got = self.remote.match(request.request_id, hashes, n, limit)  # G4, step-bounded
            if got is None:
                return None, False
            n += got
        if self.onboard is not None:  # load only what beats recomputing it
            matched = [("G2", host_end - start), ("G3", disk_end - host_end), ("G4", n - disk_end)]
            keep = start + self.onboard.choose(request, start, matched, bs)
            host_end, disk_end, n = min(host_end, keep), min(disk_end, keep), keep
        st.match_start, st.match_host, st.match_disk = start, host_end - start, disk_end - host_end
        st.match_remote = n - disk_end
        st.query_tokens = request.num_tokens - num_computed_tokens
        self.counters.lookups += 1
        self.counters.lookup_blocks += max(0, limit - start)
        if n == start:
            return 0, False
        return (n - start) * bs, self._load_async(st)

    def update_state_after_alloc(
        self, request: RequestLike, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Plan the load of the blocks matched for ``request`` into its new GPU blocks."""
        st = self._track(request)
        if self.remote is not None:
            self.remote.forget(request.request_id)
        bs = self.config.block_size
        if st.query_tokens and not getattr(request, "num_preemptions", 0):
            # Once per lookup that led to this allocation (vLLM counts resumed requests apart).
            self.counters.query_tokens += st.query_tokens
            if num_external_tokens:
                self.counters.query_host_tokens += st.match_host * bs
                self.counters.query_disk_tokens += st.match_disk * bs
        st.query_tokens = 0
        if self.onboard is not None:
            self.onboard.allocated(request.request_id, num_external_tokens // bs)
        if num_external_tokens == 0:
            return
        start = st.match_start
        count = num_external_tokens // bs
        matched = st.match_host + st.match_disk + st.match_remote
        if count != matched or len(block_ids) < start + count:
            raise RuntimeError(
                f"kvtier: request {request.request_id} was allocated {num_external_tokens} "
                f"external tokens for a match of {matched} blocks"
            )
        hashes = st.hashes.hashes
        host_end, disk_end = start + st.match_host, start + st.match_host + st.match_disk
        job_id, host_slots = self.planner.begin_load(
            request.request_id, hashes[start:host_end], hashes[host_end:disk_end]
        )
        remote = RemoteLoad()
        for i in range(disk_end, start + count):  # G4, kept in G2 where room
            remote.hashes.append(hashes[i])
            remote.gpu_blocks.append(block_ids[i])
            remote.host_slots.append(
                self.planner.reserve_copy(hashes[i], hashes[i - 1] if i else None)
            )
        self._plan_loads.append(
            LoadJob(
                job_id,
                request.request_id,
                self._load_async(st),
                host_slots,
                list(block_ids[start:host_end]),
                hashes[host_end:disk_end],
                list(block_ids[host_end:disk_end]),
                remote if remote.hashes else None,
            )
        )
        if self.remote is not None:
            self.remote.counters.hit_blocks += len(remote.hashes)
        if self.onboard is not None:
            parts = {"G2": st.match_host, "G3": st.match_disk, "G4": len(remote.hashes)}
            self.onboard.load_planned(job_id, parts)
        st.load_job = job_id
        self.counters.matched_tokens += num_external_tokens

    def external_hit_split(self, request_id: str) -> tuple[int, int]:
        """Tokens of the current load that come from (G2, G3)."""
        st = self._reqs.get(request_id)
        if st is None or st.load_job is None:
            return 0, 0
        bs = self.config.block_size
        return st.match_host * bs, st.match_disk * bs

    def build_step_plan(
        self,
        new_reqs: Iterable[tuple[str, Sequence[int], int]],
        cached_reqs: Iterable[tuple[str, Sequence[int] | None, int, bool]],
        num_scheduled_tokens: dict[str, int],
        *,
        idle: bool = False,
        block_tokens: dict[int, tuple[int, ...]] | None = None,
    ) -> StepPlan:
        """Plan this step: the loads decided at allocation, and stores of the blocks it completes.

        ``new_reqs``: (req_id, block_ids, num_computed_tokens); ``cached_reqs``: (req_id,
        new_block_ids or None, num_computed_tokens, resumed). ``block_tokens``, when given, gets
        the tokens of every block this plan stores, by hash, for the telemetry's KV events (the
        plan, sent to every worker, carries none)."""
        step = self._step
        self._step += 1
        bs = self.config.block_size
        reqs = self._reqs
        rows: list[tuple[str, int, int]] | None = [] if self.onboard is not None else None
        stores = StoreBatch()
        writes: list[DiskWrite] = []
        # One pass, O(1) per request unless it completes a block: a decode step touches every
        # running request, and only ~2 of 32 fill a block.
        for req_id, block_ids, computed, resumed, new in scheduled_rows(new_reqs, cached_reqs):
            st = reqs.get(req_id)
            if st is None:
                continue
            if new:
                st.block_ids = list(block_ids or ())
            elif resumed:
                self.counters.resumed_requests += 1
                st.block_ids = list(block_ids or ())
            elif block_ids:
                st.block_ids.extend(block_ids)
            done = computed + num_scheduled_tokens.get(req_id, 0)
            if rows is not None:
                rows.append((req_id, computed, done - computed))
            # Blocks vLLM recomputes (a failed load, a preempted request) are stored again.
            first = computed // bs
            if first < st.next_store:
                st.next_store = first
            if done // bs > st.next_store and len(st.block_ids) > st.next_store:
                st.plan_stores(self.planner, done, step, stores, writes, block_tokens)
        if rows is not None and self.onboard is not None:  # times this step for the cost model
            self.onboard.step_planned(step, rows)
        remote_writes = None
        if self.remote is not None:
            remote_writes = self.remote.plan_writes(
                stores.hashes, stores.parents, stores.host_slots
            )
            self.remote.end_step()
        plan = StepPlan(
            step=step,
            loads=self._plan_loads,
            stores=stores,
            disk_writes=writes,
            disk_deletes=self.planner.take_deletes(),
            delayed_free=self._delayed,
            idle=idle,
            remote_writes=remote_writes,
        )
        self._plan_loads, self._delayed = [], []
        return plan

    def process_reports(self, reports: Iterable[WorkerReport]) -> None:
        """Apply the workers' completions (called once per step with that step's reports)."""
        planner = self.planner
        reports = list(reports)
        if reports and len(reports) == self.config.num_workers:
            self.step_confirmed(min(r.stores_read_step for r in reports))
        for r in reports:
            if r.host_pinned_rows >= 0:
                planner.pinned_rows(r.rank, r.host_pinned_rows)
            if r.remote is not None and self.remote is not None:
                self.remote.on_report(r.rank, r.remote)
            if r.restored is not None:
                planner.restored(r.rank, r.restored, r.restored_parents, r.disk_folder)
            for h in r.host_stored:
                planner.store_reported(G2, h, ok=True)
            for h in r.host_store_failed:
                planner.store_reported(G2, h, ok=False)
            for h in r.disk_stored:
                planner.store_reported(G3, h, ok=True)
            for h in r.disk_store_failed:
                planner.store_reported(G3, h, ok=False)
            for h in r.disk_bad:
                planner.disk_bad(h)
            self.counters.load_failures += r.load_failed_blocks
            self.counters.host_load_failures += r.host_load_failed
            self.counters.disk_load_failures += r.disk_load_failed
            for job_id in r.loads_done:
                req_id = planner.load_reported(job_id)
                if req_id is None:
                    continue
                if self.onboard is not None:
                    self.onboard.load_done(job_id)
                st = self._reqs.get(req_id)
                if st is not None and st.load_job == job_id:
                    st.load_job = None

    def step_confirmed(self, step: int) -> None:
        """The workers finished reading GPU memory for every store planned up to ``step``."""
        self._confirmed_step = max(self._confirmed_step, step)

    def request_finished(self, request: RequestLike) -> bool:
        """Forget the request; True when its GPU blocks must wait for stores still reading them."""
        st = self._reqs.pop(request.request_id, None)
        if self.remote is not None:
            self.remote.forget(request.request_id)
        if self.onboard is not None:
            self.onboard.forget(request.request_id)
        if st is None:
            return False
        if self.config.async_store_reads and st.last_store_step > self._confirmed_step:
            self._delayed.append(request.request_id)
            self._delayed_waiting.add(request.request_id)
            return True
        return False

    def finished_sending(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self._delayed_waiting.discard(rid)

    def has_pending_work(self) -> bool:
        """Stores or loads are in flight (the engine should keep stepping to collect them)."""
        return bool(self._delayed_waiting) or self.planner.has_pending()

    def reset(self) -> bool:
        """Drop everything G2 and G3 hold (vLLM's ``reset_cache`` hook: cached KV is no longer
        valid, e.g. after a weight update); see ``TierPlanner.reset``."""
        return self.planner.reset()

    def check_invariants(self) -> None:
        """Pools are consistent and every pin is accounted for by a load or a G3 write."""
        self.planner.check_invariants()

    @property
    def num_tracked_requests(self) -> int:
        return len(self._reqs)

    # -- internals ----------------------------------------------------------------------------

    def _load_async(self, st: RequestState) -> bool:
        """Whether the current match loads outside the forward pass (see ``SchedulerConfig``)."""
        if not self.config.layerwise_onboard:
            return True
        return st.match_disk > 0 and not self.config.layerwise_disk

    def _track(self, request: RequestLike) -> RequestState:
        st = self._reqs.get(request.request_id)
        if st is None:
            salt = salt_hash(request.cache_salt, lora_name(request))
            st = RequestState(request, SequenceHashes(self.config.block_size, salt))
            self._reqs[request.request_id] = st
        st.hashes.advance(request.all_token_ids, request.num_tokens)
        return st
