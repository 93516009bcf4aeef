"""The scheduler half of the connector: decides what to load and what to store. No torch.

Why this exists: vLLM asks the scheduler half, for each waiting request, how many more prompt
tokens kvtier can supply beyond vLLM's own G1 prefix hit, and every step it must tell the workers
what to copy. This half owns the control plane of G2 and G3 (``SlotIndex``: which sequence hash
lives in which slot), because in vLLM's multi-process engine it cannot see the workers' memory.
It names exact slots and GPU blocks in a ``StepPlan``; the workers copy and report back in
``WorkerReport``s, which commit stores, release pins and drop corrupt G3 blocks.

Rules it keeps:

- Requests are hashed with KVBM's chained sequence hash, seeded by their cache salt and LoRA name,
  so requests with different salts never share a block.
- Matching: G2 from the end of vLLM's G1 hit, then G3 from where G2 stopped; full blocks only, and
  never the whole prompt (vLLM must compute at least one token).
- Every block a step completes (prompt or decode) is stored to G2 once; the G2 -> G3 cascade goes
  through the frequency filter. A G2 slot read by a load or a G3 write is pinned until the worker
  reports the read done, so it is never reused under a copy.
- A request that finishes while stores of its blocks may still read GPU memory keeps its blocks
  (``request_finished`` returns True) until the workers confirm (``finished_sending``). With
  kvtier's CPU worker that never happens (its stores read memory within the step that planned
  them); its CUDA worker stores asynchronously (``SchedulerConfig.async_store_reads``) and pins
  G2 in chunks (``pinned_host_rows``: G2 slots only below the rows every worker reported pinned).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtier.core.filter import FrequencyFilter, FrequencyFilterConfig
from kvtier.hashing import hash_chain, salt_hash
from kvtier.storage.block_file import acyclic_parents, block_file_name
from kvtier.storage.tier_dir import regular_file_exists
from kvtier.vllm.metadata import DiskWrite, LoadJob, StepPlan, StoreBatch, WorkerReport
from kvtier.vllm.onboard import OnboardAdvisor
from kvtier.vllm.remote_plan import RemoteLoad, RemotePlanner
from kvtier.vllm.slots import SlotIndex

__all__ = ["KvTierScheduler", "SchedulerConfig", "SchedulerCounters"]


class RequestLike(Protocol):
    """The attributes of vLLM's ``Request`` the scheduler half reads."""

    request_id: str
    cache_salt: str | None
    lora_request: Any

    @property
    def all_token_ids(self) -> Sequence[int]: ...

    @property
    def num_tokens(self) -> int: ...


@dataclass(frozen=True)
class SchedulerConfig:
    """Geometry and policy of the scheduler half."""

    block_size: int
    host_blocks: int
    disk_blocks: int
    disk_filter: bool = True
    layerwise_onboard: bool = False
    num_workers: int = 1
    async_store_reads: bool = False
    """True when workers may still read a store's GPU blocks after the step that planned it
    (an asynchronous copy stream); then ``request_finished`` keeps the blocks until the workers
    confirm. kvtier's CPU worker finishes those reads inside the step (``wait_for_save``), so
    vLLM may free a finished request's blocks at once; its CUDA worker does not."""
    layerwise_disk: bool = True
    """With ``layerwise_onboard``, whether matches with G3 blocks load inside the forward pass
    too. False sends them through the asynchronous path: vLLM with asynchronous scheduling (its
    GPU default) has already scheduled the next step when an in-pass load fails, so it would emit
    one token computed from the missing block; a G3 read can fail (a corrupt file), a G2 copy
    cannot once issued."""
    pinned_host_rows: bool = False
    """True when workers pin G2 in chunks after start-up (CUDA): G2 slots are handed out only
    below the smallest pinned-row count every worker has reported (``WorkerReport``)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
        for name in ("host_blocks", "disk_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 0, got {value!r}")


@dataclass
class SchedulerCounters:
    """Cumulative counters of the scheduler half (blocks unless named otherwise)."""

    lookups: int = 0
    lookup_blocks: int = 0
    query_tokens: int = 0
    """Tokens beyond G1 of the requests vLLM scheduled (not resumed after preemption), counted
    once per scheduling, as vLLM counts ``vllm:external_prefix_cache_queries``; retried
    lookups of a request waiting for G1 space are not counted again."""
    query_host_tokens: int = 0
    query_disk_tokens: int = 0
    host_hit_blocks: int = 0
    disk_hit_blocks: int = 0
    matched_tokens: int = 0
    onboard_h2d: int = 0
    onboard_d2d: int = 0
    offload_d2h: int = 0
    offload_h2d: int = 0
    offload_d2d: int = 0
    store_failures: int = 0
    load_failures: int = 0
    host_load_failures: int = 0
    disk_load_failures: int = 0
    disk_corrupt: int = 0
    host_evictions: int = 0
    disk_evictions: int = 0
    resumed_requests: int = 0


@dataclass
class _Req:
    request: RequestLike
    salt: int
    hashes: list[int] = field(default_factory=list)
    hashed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    next_store: int = 0
    match_start: int = 0
    match_host: int = 0
    match_disk: int = 0
    match_remote: int = 0
    last_store_step: int = -1
    load_job: int | None = None
    loaded_from: int = 0
    loaded_to: int = 0
    query_tokens: int = 0


@dataclass
class _Load:
    req_id: str
    host_hashes: list[int]
    disk_hashes: list[int]
    reports: int = 0


@dataclass
class _Pending:
    reports: int = 0
    failed: bool = False
    host_pin: int | None = None  # a G2 hash pinned as the source of a G3 write


class CountingFilter(FrequencyFilter):
    """Core's G2->G3 frequency filter, counting the sightings it turned away (for metrics)."""

    def __init__(
        self, config: FrequencyFilterConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(config, clock=clock)
        self.rejections = 0

    def should_offload(self, sequence_hash: int) -> bool:
        admitted = super().should_offload(sequence_hash)
        if not admitted:
            self.rejections += 1
        return admitted

    def sighting(self, sequence_hash: int) -> bool:
        """Same as ``should_offload`` (the name telemetry's tests use)."""
        return self.should_offload(sequence_hash)


def _lora_name(request: RequestLike) -> str | None:
    lora = getattr(request, "lora_request", None)
    if lora is None:
        return None
    name = getattr(lora, "lora_name", None)
    return str(name) if name is not None else None


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
        self.host = SlotIndex("G2", config.host_blocks)
        self.disk = SlotIndex("G3", config.disk_blocks)
        self.filter = CountingFilter(FrequencyFilterConfig(enabled=config.disk_filter), clock=clock)
        self.counters = SchedulerCounters()
        self._reqs: dict[str, _Req] = {}
        self._step = 0
        self._confirmed_step = -1
        self._next_job = 0
        self._plan_loads: list[LoadJob] = []
        self._loads: dict[int, _Load] = {}
        self._host_pending: dict[int, _Pending] = {}
        self._disk_pending: dict[int, _Pending] = {}
        self._disk_deletes: list[int] = []
        self._delayed: list[str] = []
        self._delayed_waiting: set[str] = set()
        self._disk_ready = config.disk_blocks == 0
        self._restored_reports: list[set[int]] = []
        self._restored_order: list[int] = []
        self._restored_parents: dict[int, int | None] = {}
        self._pinned_rows: dict[int, int] = {}
        if config.pinned_host_rows:
            self.host.limit_usable(0)
        self._disk_folders: list[str] = []  # each worker's G3 folder, shared with other engines

    # -- vLLM scheduler-side API --------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: RequestLike, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens kvtier can load beyond ``num_computed_tokens`` (block aligned), and whether the
        load is asynchronous. None while the G3 index is not known yet (first step)."""
        if not self._disk_ready:
            return None, False
        st = self._track(request)
        bs = self.config.block_size
        start = num_computed_tokens // bs
        limit = (request.num_tokens - 1) // bs  # never the whole prompt
        n = start
        while n < limit and self.host.lookup(st.hashes[n]) is not None:
            n += 1
        host_end = n
        n = self._disk_end(st.hashes, n, limit)
        disk_end = n
        if self.remote is not None and not self.config.layerwise_onboard and n < limit:
            got = self.remote.match(request.request_id, st.hashes, n, limit)  # G4, step-bounded
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
            self.onboard.allocated(
                request.request_id, num_external_tokens // self.config.block_size
            )
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
        remote = RemoteLoad()
        host_slots: list[int] = []
        host_gpu: list[int] = []
        host_hashes: list[int] = []
        disk_hashes: list[int] = []
        disk_gpu: list[int] = []
        for i in range(start, start + count):
            h = st.hashes[i]
            if i < start + st.match_host:
                host_slots.append(self.host.pin(h))
                host_hashes.append(h)
                host_gpu.append(block_ids[i])
            elif i >= start + st.match_host + st.match_disk:  # G4, kept in G2 where room
                remote.hashes.append(h)
                remote.gpu_blocks.append(block_ids[i])
                remote.host_slots.append(self._reserve_g2_copy(h, st.hashes[i - 1] if i else None))
            else:
                self.disk.pin(h)
                disk_hashes.append(h)
                disk_gpu.append(block_ids[i])
        job_id = self._next_job
        self._next_job += 1
        self._loads[job_id] = _Load(request.request_id, host_hashes, disk_hashes)
        self._plan_loads.append(
            LoadJob(
                job_id,
                request.request_id,
                self._load_async(st),
                host_slots,
                host_gpu,
                list(disk_hashes),
                disk_gpu,
                remote if remote.hashes else None,
            )
        )
        if self.remote is not None:
            self.remote.counters.hit_blocks += len(remote.hashes)
        if self.onboard is not None:
            parts = {"G2": len(host_hashes), "G3": len(disk_hashes), "G4": len(remote.hashes)}
            self.onboard.load_planned(job_id, parts)
        st.load_job = job_id
        st.loaded_from, st.loaded_to = start, start + count
        self.counters.host_hit_blocks += len(host_hashes)
        self.counters.disk_hit_blocks += len(disk_hashes)
        self.counters.matched_tokens += num_external_tokens
        self.counters.onboard_h2d += len(host_hashes)
        self.counters.onboard_d2d += len(disk_hashes)

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
        """Plan this step: the loads decided at allocation, and stores of the blocks this step
        completes.

        ``new_reqs``: (req_id, block_ids, num_computed_tokens); ``cached_reqs``: (req_id,
        new_block_ids or None, num_computed_tokens, resumed). ``block_tokens``, when given, gets
        the tokens of every block this plan stores (G2 or G3), by sequence hash: for the KV
        events of the scheduler-side telemetry, which the plan itself (sent to every worker)
        does not carry.
        """
        step = self._step
        self._step += 1
        touched: list[tuple[_Req, int, int]] = []
        for req_id, block_ids, computed in new_reqs:
            st = self._reqs.get(req_id)
            if st is None:
                continue
            st.block_ids = list(block_ids)
            touched.append((st, computed, computed + num_scheduled_tokens.get(req_id, 0)))
        for req_id, new_ids, computed, resumed in cached_reqs:
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if resumed:
                self.counters.resumed_requests += 1
                st.block_ids = list(new_ids or ())
            elif new_ids:
                st.block_ids.extend(new_ids)
            touched.append((st, computed, computed + num_scheduled_tokens.get(req_id, 0)))
        if self.onboard is not None:  # times this step for the prefill cost model
            self.onboard.step_planned((st.request.request_id, c, d - c) for st, c, d in touched)
        stores = StoreBatch()
        writes: list[DiskWrite] = []
        for st, computed, done_tokens in touched:
            # Blocks vLLM recomputes (a failed load, a preempted request) are stored again.
            st.next_store = min(st.next_store, computed // self.config.block_size)
            self._plan_stores(st, done_tokens, step, stores, writes, block_tokens)
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
            disk_deletes=self._disk_deletes,
            delayed_free=self._delayed,
            idle=idle,
            remote_writes=remote_writes,
        )
        self._plan_loads, self._disk_deletes, self._delayed = [], [], []
        return plan

    def process_reports(self, reports: Iterable[WorkerReport]) -> None:
        """Apply the workers' completions (called once per step with that step's reports)."""
        n = self.config.num_workers
        reports = list(reports)
        if reports and len(reports) == n:
            self.step_confirmed(min(r.stores_read_step for r in reports))
        for r in reports:
            if r.host_pinned_rows >= 0:
                self._pinned_rows[r.rank] = r.host_pinned_rows
                if len(self._pinned_rows) == n:
                    self.host.set_usable(min(self._pinned_rows.values()))
            if r.remote is not None and self.remote is not None:
                self.remote.on_report(r.rank, r.remote)
            if r.restored is not None:
                self._restored_reports.append(set(r.restored))
                if r.disk_folder is not None:
                    self._disk_folders.append(r.disk_folder)
                if r.rank == 0:
                    self._restored_order = list(r.restored)
                    if r.restored_parents:
                        self._restored_parents = dict(
                            zip(r.restored, r.restored_parents, strict=True)
                        )
                if len(self._restored_reports) == n:
                    self._restore_disk()
            for h in r.host_stored:
                self._finish_host(h, ok=True)
            for h in r.host_store_failed:
                self._finish_host(h, ok=False)
            for h in r.disk_stored:
                self._finish_disk(h, ok=True)
            for h in r.disk_store_failed:
                self._finish_disk(h, ok=False)
            for h in r.disk_bad:
                self.counters.disk_corrupt += 1
                if self.disk.remove(h) and self.config.num_workers > 1:
                    # Tensor parallelism: a block bad on one rank is bad for all (vLLM recomputes
                    # it everywhere); the other ranks' shards of it are deleted too, not orphaned.
                    self._disk_deletes.append(h)
            self.counters.load_failures += r.load_failed_blocks
            self.counters.host_load_failures += r.host_load_failed
            self.counters.disk_load_failures += r.disk_load_failed
            for job_id in r.loads_done:
                load = self._loads.get(job_id)
                if load is None:
                    continue
                load.reports += 1
                if load.reports == n:
                    del self._loads[job_id]
                    if self.onboard is not None:
                        self.onboard.load_done(job_id)
                    for h in load.host_hashes:
                        self.host.unpin(h)
                    for h in load.disk_hashes:
                        self.disk.unpin(h)
                    st = self._reqs.get(load.req_id)
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
        return bool(
            self._host_pending
            or self._disk_pending
            or self._loads
            or self._delayed_waiting
            or self._disk_deletes
            or not self._disk_ready
        )

    def reset(self) -> bool:
        """Drop everything G2 and G3 hold (vLLM's ``reset_cache`` hook: cached KV is no longer
        valid, e.g. after a weight update). The G3 files are deleted by the workers at the next
        step. Refused (False, nothing dropped) while a load or store is in flight or the G3
        index is not known yet: those copies would land stale blocks after the reset."""
        if self._loads or self._host_pending or self._disk_pending or not self._disk_ready:
            return False
        self.host.clear()
        self._disk_deletes.extend(self.disk.clear())
        return True

    def check_invariants(self) -> None:
        """Pools are consistent and every pin is accounted for by a load or a G3 write."""
        self.host.check_invariants()
        self.disk.check_invariants()
        host_pins: dict[int, int] = {}
        disk_pins: dict[int, int] = {}
        for h in self._host_pending:
            host_pins[h] = host_pins.get(h, 0) + 1
        for h, p in self._disk_pending.items():
            disk_pins[h] = disk_pins.get(h, 0) + 1
            if p.host_pin is not None:
                host_pins[p.host_pin] = host_pins.get(p.host_pin, 0) + 1
        for load in self._loads.values():
            for h in load.host_hashes:
                host_pins[h] = host_pins.get(h, 0) + 1
            for h in load.disk_hashes:
                disk_pins[h] = disk_pins.get(h, 0) + 1
        for index, pins in ((self.host, host_pins), (self.disk, disk_pins)):
            held = index.pin_counts()
            assert held == {h: c for h, c in pins.items() if c}, (
                f"{index.name}: pins {held} differ from the loads and writes in flight {pins}"
            )

    @property
    def num_tracked_requests(self) -> int:
        return len(self._reqs)

    # -- internals ----------------------------------------------------------------------------

    def _load_async(self, st: _Req) -> bool:
        """Whether the current match loads outside the forward pass (see ``SchedulerConfig``)."""
        if not self.config.layerwise_onboard:
            return True
        return st.match_disk > 0 and not self.config.layerwise_disk

    def _track(self, request: RequestLike) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _Req(request, salt_hash(request.cache_salt, _lora_name(request)))
            self._reqs[request.request_id] = st
        self._hash_up_to(st, request.num_tokens)
        return st

    def _hash_up_to(self, st: _Req, num_tokens: int) -> None:
        bs = self.config.block_size
        full = (num_tokens // bs) * bs
        if full <= st.hashed_tokens:
            return
        tokens = st.request.all_token_ids[st.hashed_tokens : full]
        parent = st.hashes[-1] if st.hashes else None
        _, seqs = hash_chain(list(tokens), bs, st.salt, parent)
        st.hashes.extend(seqs)
        st.hashed_tokens = full

    def _plan_stores(
        self,
        st: _Req,
        done_tokens: int,
        step: int,
        stores: StoreBatch,
        writes: list[DiskWrite],
        block_tokens: dict[int, tuple[int, ...]] | None,
    ) -> None:
        bs = self.config.block_size
        done_tokens = min(done_tokens, st.request.num_tokens)
        self._hash_up_to(st, done_tokens)
        complete = min(done_tokens // bs, len(st.block_ids), len(st.hashes))
        if st.next_store >= complete:
            return
        all_tokens = st.request.all_token_ids
        for i in range(st.next_store, complete):
            h = st.hashes[i]
            parent = st.hashes[i - 1] if i else None
            gpu_block = st.block_ids[i]
            planned = len(stores.hashes)
            host_slot = self._store_host(h, parent, gpu_block, stores)
            if host_slot is not None:
                st.last_store_step = step
            write = None
            if self.config.disk_blocks and h not in self.disk and self.filter.should_offload(h):
                write = self._store_disk(h, parent, host_slot, gpu_block)
                if write is not None:
                    writes.append(write)
                    if write.gpu_block >= 0:
                        st.last_store_step = step
            if block_tokens is not None and (write is not None or len(stores.hashes) > planned):
                block_tokens[h] = tuple(all_tokens[i * bs : (i + 1) * bs])
        st.next_store = max(st.next_store, complete)

    def _store_host(
        self,
        h: int,
        parent: int | None,
        gpu_block: int,
        stores: StoreBatch,
    ) -> int | None:
        """Reserve a G2 slot for ``h`` and plan its copy; returns the slot a G3 write may read
        (an existing ready slot counts), or None."""
        if not self.config.host_blocks:
            return None
        if h in self.host:
            self.host.touch(h)
            return self.host.slot_of(h)
        got = self.host.reserve(h, parent)
        if got is None:
            return None
        slot, evicted = got
        self.counters.host_evictions += len(evicted)
        self._host_pending[h] = _Pending()
        stores.gpu_blocks.append(gpu_block)
        stores.host_slots.append(slot)
        stores.hashes.append(h)
        stores.parents.append(parent)
        self.counters.offload_d2h += 1
        return slot

    def _reserve_g2_copy(self, h: int, parent: int | None) -> int:
        """A G2 slot for a block fetched from G4 (pending until the worker reports it), or -1."""
        if not self.config.host_blocks or h in self.host:
            return -1
        got = self.host.reserve(h, parent)
        if got is None:
            return -1
        slot, evicted = got
        self.counters.host_evictions += len(evicted)
        self._host_pending[h] = _Pending()
        return slot

    def _store_disk(
        self,
        h: int,
        parent: int | None,
        host_slot: int | None,
        gpu_block: int,
    ) -> DiskWrite | None:
        got = self.disk.reserve(h, parent)
        if got is None:
            return None
        _, evicted = got
        self.counters.disk_evictions += len(evicted)
        self._disk_deletes.extend(evicted)
        pending = _Pending()
        self._disk_pending[h] = pending
        if host_slot is not None:
            # A pending G2 copy is ordered before this write by the worker (same or earlier step).
            self.host.pin(h, pending_ok=True)
            pending.host_pin = h
            self.counters.offload_h2d += 1
            return DiskWrite(h, parent, host_slot=host_slot)
        self.counters.offload_d2d += 1
        return DiskWrite(h, parent, gpu_block=gpu_block)

    def _finish_host(self, h: int, *, ok: bool) -> None:
        p = self._host_pending.get(h)
        if p is None:
            return
        p.reports += 1
        p.failed = p.failed or not ok
        if p.reports < self.config.num_workers:
            return
        del self._host_pending[h]
        if p.failed:
            # A G3 write planned from this slot is failed by the worker too and drops its pin.
            self.counters.store_failures += 1
            self.host.abort(h)
        else:
            self.host.commit(h)

    def _finish_disk(self, h: int, *, ok: bool) -> None:
        p = self._disk_pending.get(h)
        if p is None:
            return
        p.reports += 1
        p.failed = p.failed or not ok
        if p.reports < self.config.num_workers:
            return
        del self._disk_pending[h]
        if p.host_pin is not None:
            self.host.unpin(p.host_pin)
        if p.failed:
            self.counters.store_failures += 1
            self.disk.abort(h)
            self._disk_deletes.append(h)
        else:
            self.disk.commit(h)

    def _restore_disk(self) -> None:
        # A block is usable only if every rank found its shard; shards of the others are deleted.
        common = set.intersection(*self._restored_reports)
        self._disk_deletes.extend(sorted(set.union(*self._restored_reports) - common))
        newest_first = [h for h in self._restored_order if h in common]
        keep = newest_first[: self.config.disk_blocks]
        order = _parents_first(reversed(keep), self._restored_parents)
        parents = acyclic_parents(order, self._restored_parents)  # no self links, no cycles
        left = self.disk.restore(order, parents)
        self._disk_deletes.extend(left)
        self._disk_deletes.extend(newest_first[self.config.disk_blocks :])
        self._disk_ready = True
        self._restored_reports = []
        self._restored_parents = {}

    # -- G3 shared with other engines (kvtier.storage.tier_dir) ------------------------------

    def _disk_end(self, hashes: Sequence[int], n: int, limit: int) -> int:
        """Where the G3 part of a match that starts at ``n`` ends: this index first and, where
        it misses, the blocks other engines sharing the directory wrote since this one started
        (a miss in this index is not a miss in the tier)."""
        while n < limit:
            h = hashes[n]
            if self.disk.lookup(h) is None and not self._adopt_disk(
                h, hashes[n - 1] if n else None
            ):
                break
            n += 1
        return n

    def _adopt_disk(self, h: int, parent: int | None) -> bool:
        """Take a block another engine wrote into this G3 index, if every worker's folder has
        its file (one ``lstat`` each; the worker's read verifies it, a vanished file is a load
        error and vLLM recomputes)."""
        if not self._disk_folders or h in self.disk:
            return False
        name = block_file_name(h)
        if not all(regular_file_exists(os.path.join(f, name)) for f in self._disk_folders):
            return False
        got = self.disk.reserve(h, parent)
        if got is None:
            return False
        self.counters.disk_evictions += len(got[1])
        self._disk_deletes.extend(got[1])
        self.disk.commit(h)
        return True


def _parents_first(oldest_first: Iterable[int], parents: dict[int, int | None]) -> list[int]:
    """``oldest_first`` reordered so that a block's parent, when it is among them, comes before
    it (a pool counts a parent's children as they register); otherwise the order is kept, so
    recency (eviction order) carries over a restart as far as the parent links allow."""
    blocks = list(oldest_first)
    wanted = set(blocks)
    placed: set[int] = set()
    out: list[int] = []
    for h in blocks:
        chain: list[int] = []
        x: int | None = h
        while x is not None and x in wanted and x not in placed:
            placed.add(x)
            chain.append(x)
            x = parents.get(x)
        out.extend(reversed(chain))
    return out
