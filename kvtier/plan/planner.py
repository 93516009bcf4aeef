"""``TierPlanner``: the one place that decides what lives where across G2 and G3. No torch.

Why this exists: the data plane (a worker, possibly in another process) only moves bytes; every
tier decision is made here on plain data (``kvtier.plan`` says why), tested in microseconds:

- prefix match: G2 from a start block, then G3 from where G2 stopped (adopting the G3 files other
  engines wrote in the folders they share);
- two phases for every copy: ``store``/``reserve_copy``/``begin_load`` reserve (a pending slot, or
  pins on the slots a load or a G3 write from G2 reads, so none is reused under a copy), the
  workers' reports commit or abort once all ``num_workers`` reported (a failure on any rank
  aborts: the slot is freed, a G3 file deleted); loads in flight: ``kvtier.plan.loads``;
- the G2 -> G3 cascade: a block is written to G3 when G3 does not hold it and the frequency filter
  admits it (from its G2 slot when it has one, else from the GPU block);
- restore of G3 at start-up (``kvtier.plan.restore``), reset, invariants.

Every arrival (commit, restore) and departure (eviction, removal) lands in ``registry`` (a
``TierRegistry`` the pools report to) as a Store/Remove event, and every copy that landed on all
workers in ``take_transfers``, timed by the in-flight records themselves: the connector's
telemetry reads both, and keeps no copy of what is in flight. The G3 files to delete (evicted,
failed, corrupt on some rank, reset) accumulate until ``take_deletes`` hands them to the next plan.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvtier.config import require_count
from kvtier.core.filter import FrequencyFilter, FrequencyFilterConfig
from kvtier.core.registry import TierRegistry
from kvtier.plan.counters import SchedulerCounters
from kvtier.plan.loads import LoadJobs
from kvtier.plan.restore import plan_restore
from kvtier.plan.slots import SlotIndex
from kvtier.storage.block_file import block_file_name
from kvtier.storage.tier_dir import regular_file_exists

__all__ = ["PlannerConfig", "StoreChoice", "TierPlanner", "Transfer"]

G2 = "G2"
G3 = "G3"


@dataclass(frozen=True)
class PlannerConfig:
    """Sizes and policy of the tiers the planner manages."""

    host_blocks: int
    disk_blocks: int
    disk_filter: bool = True
    num_workers: int = 1
    pinned_host_rows: bool = False
    """G2 slots are handed out only below the pinned-row count every worker reported."""
    record_events: bool = False
    """Whether ``registry`` keeps Store/Remove events (only when someone drains them)."""

    def __post_init__(self) -> None:
        require_count("host_blocks", self.host_blocks)
        require_count("disk_blocks", self.disk_blocks)
        require_count("num_workers", self.num_workers, low=1)


class StoreChoice(NamedTuple):
    """What ``TierPlanner.store`` planned for one block (a tuple: built once per stored block)."""

    host_slot: int | None
    """The G2 slot a new device -> host copy fills, or None (G2 holds it already, or is full)."""
    in_host: bool
    """G2 holds the block after this plan (a new copy, or one pending or ready before)."""
    disk_write: bool
    """A G3 write is planned (from ``disk_host_slot`` when >= 0, else from the GPU block)."""
    disk_host_slot: int = -1


_NOTHING = StoreChoice(None, False, False)


Transfer = tuple[str, int, float]
"""(path as the metrics name it, blocks, seconds from planning to the last report) of a copy every
worker reported landed; a plain tuple, as one is built per block on the scheduler's hot path."""


@dataclass
class _Restore:
    reports: list[set[int]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # rank 0's, newest first
    parents: dict[int, int | None] = field(default_factory=dict)
    priorities: dict[int, int] = field(default_factory=dict)


class TierPlanner:
    """Decisions over G2 and G3 (see the module docstring). Not thread-safe: one caller."""

    def __init__(
        self,
        config: PlannerConfig,
        *,
        counters: SchedulerCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
        disk_has: Callable[[int], bool] | None = None,
    ) -> None:
        """``disk_has(h)``: a shared G3 holds a file of ``h`` (a process owning its storage
        passes its check); by default, looked up in the folders the workers report."""
        self.config = config
        self.counters = counters if counters is not None else SchedulerCounters()
        self.registry = TierRegistry(record_events=config.record_events)
        self.host = SlotIndex(G2, config.host_blocks, registry=self.registry)
        self.disk = SlotIndex(G3, config.disk_blocks, registry=self.registry)
        filter_config = FrequencyFilterConfig(enabled=config.disk_filter)
        self.filter = FrequencyFilter(filter_config, clock=clock)
        self._clock = clock
        self._transfers: deque[Transfer] = deque(maxlen=1 << 16)  # drained every step
        self.disk_ready = config.disk_blocks == 0
        """Whether the G3 index is known (every worker reported what it found on disk)."""
        self._from_host: set[int] = set()  # G3 writes in flight that pin their G2 slot
        self._loads = LoadJobs(self.host, self.disk, config.num_workers)
        self._deletes: list[int] = []
        self._restore = _Restore()
        self._pinned_rows: dict[int, int] = {}
        self._disk_folders: list[str] = []  # each worker's G3 folder, shared with other engines
        self._has_file = disk_has or self._in_folders
        if config.pinned_host_rows:
            self.host.limit_usable(0)

    # -- matching -----------------------------------------------------------------------------

    def match(self, hashes: Sequence[int], start: int, limit: int) -> tuple[int, int]:
        """Where the G2 part and then the G3 part of a prefix match from ``start`` end (block
        indices, at most ``limit``). An adoption reserves a G3 slot, which may evict a block this
        match found before it: the G3 part then ends there, so every block it names is held."""
        n = start
        while n < limit and self.host.lookup(hashes[n]) is not None:
            n += 1
        host_end = n
        lookup, adopted = self.disk.lookup, False
        while n < limit:
            h = hashes[n]
            if lookup(h) is None:
                if not self._adopt(h, hashes[n - 1] if n else None):
                    break
                adopted = True
            n += 1
        if adopted:
            n = next((i for i in range(host_end, n) if lookup(hashes[i]) is None), n)
        return host_end, n

    def _adopt(self, h: int, parent: int | None) -> bool:
        """Take a block another engine wrote into this G3 index, if every worker's folder has
        its file (one ``lstat`` each; the worker's read verifies it, a vanished file is a load
        error and vLLM recomputes)."""
        if h in self.disk or not self._has_file(h):
            return False
        if self._reserve(self.disk, h, parent) is None:
            return False
        self.disk.commit(h)
        return True

    def _in_folders(self, h: int) -> bool:
        name = block_file_name(h)
        folders = self._disk_folders
        return bool(folders) and all(regular_file_exists(os.path.join(f, name)) for f in folders)

    # -- loads --------------------------------------------------------------------------------

    def begin_load(
        self, req_id: str, host_hashes: list[int], disk_hashes: list[int]
    ) -> tuple[int, list[int]]:
        """Pin the matched blocks a load reads; returns its job id and the G2 slots it reads."""
        job = self._loads.begin(req_id, host_hashes, disk_hashes, self._clock())
        self.counters.host_hit_blocks += len(host_hashes)
        self.counters.disk_hit_blocks += len(disk_hashes)
        self.counters.onboard_h2d += len(host_hashes)
        self.counters.onboard_d2d += len(disk_hashes)
        return job

    def trim_load(self, job_id: int, keep: int) -> None:
        """Keep the pins of the first ``keep`` blocks of load ``job_id`` (its G2 blocks first),
        dropping the rest; ``keep=0`` cancels the load (nothing was copied)."""
        self._loads.trim(job_id, keep)

    def load_reported(self, job_id: int) -> str | None:
        """One worker finished load ``job_id``; the last one unpins it and gets its request id."""
        load = self._loads.reported(job_id)
        if load is None:
            return None
        self._landed("host_to_device", len(load.host_hashes), load.since)
        self._landed("disk_to_device", len(load.disk_hashes), load.since)
        return load.req_id

    def reserve_copy(self, h: int, parent: int | None) -> int:
        """A G2 slot for a block fetched from a lower tier (pending until reported), or -1."""
        if not self.config.host_blocks or h in self.host:
            return -1
        slot = self._reserve(self.host, h, parent)
        return -1 if slot is None else slot

    # -- stores -------------------------------------------------------------------------------

    def store(self, h: int, parent: int | None, priority: int = 0) -> StoreChoice:
        """Plan the stores of one block a step completed: G2 once, and G3 through the cascade.
        ``priority``: its eviction priority in the tiers it lands in (lowest evicted first)."""
        host_slot: int | None = None
        source: int | None = None  # a G2 slot a G3 write may read (pending or ready)
        if self.config.host_blocks:
            if h in self.host:
                self.host.touch(h)
                source = self.host.slot_of(h)
            else:
                host_slot = source = self._reserve(self.host, h, parent, priority, timed=True)
                if host_slot is not None:
                    self.counters.offload_d2h += 1
        in_host = source is not None
        if not self.config.disk_blocks or h in self.disk or not self.filter.should_offload(h):
            return StoreChoice(host_slot, in_host, False) if in_host else _NOTHING
        if self._reserve(self.disk, h, parent, priority, timed=True) is None:
            return StoreChoice(host_slot, in_host, False)
        if source is None:
            self.counters.offload_d2d += 1
            return StoreChoice(host_slot, False, True)
        # A pending G2 copy is ordered before this write by the worker (same or earlier step).
        self.host.pin(h, pending_ok=True)
        self._from_host.add(h)
        self.counters.offload_h2d += 1
        return StoreChoice(host_slot, True, True, source)

    def host_read(self, h: int) -> tuple[int, int | None, int] | None:
        """A ready G2 block was read again: a sighting for the frequency filter. Returns the G3
        write it earns, ``(G2 slot to read, pinned until reported; parent; priority)``, or None."""
        if not self.config.disk_blocks or h in self.disk or self.host.lookup(h) is None:
            return None
        if not self.filter.should_offload(h):
            return None
        parent, priority = self.host.describe(h)
        if self._reserve(self.disk, h, parent, priority, timed=True) is None:
            return None
        self._from_host.add(h)
        self.counters.offload_h2d += 1
        return self.host.pin(h), parent, priority

    def store_reported(self, tier: str, h: int, *, ok: bool) -> None:
        """One worker's outcome of a G2 store or G3 write; commit or abort once all reported."""
        index = self.host if tier == G2 else self.disk
        since = index.planned_at(h)  # read first: a commit drops the pending record
        landed = index.report(h, ok=ok, needed=self.config.num_workers)
        if landed is None:
            return
        from_host = tier == G3 and h in self._from_host
        if from_host:
            self._from_host.discard(h)
            self.host.unpin(h)
        if landed:
            if since is not None:
                path = "host_to_disk" if from_host else "device_to_disk"
                self._landed("device_to_host" if tier == G2 else path, 1, since)
            return
        # A G3 write planned from a failed G2 slot is failed by the worker too, dropping its pin.
        self.counters.store_failures += 1
        if tier == G3:
            self._deletes.append(h)

    def disk_bad(self, h: int) -> None:
        """A worker read G3 block ``h`` back corrupt: forget it (vLLM recomputes)."""
        self.counters.disk_corrupt += 1
        if self.disk.remove(h) and self.config.num_workers > 1:
            # Tensor parallelism: a block bad on one rank is bad for all; the other ranks'
            # shards of it are deleted too, not orphaned.
            self._deletes.append(h)

    def _reserve(
        self,
        index: SlotIndex,
        h: int,
        parent: int | None,
        priority: int = 0,
        *,
        timed: bool = False,
    ) -> int | None:
        """A pending slot for ``h`` in ``index`` (evicting if needed; evicted G3 blocks' files
        are deleted), or None when every slot is pending or pinned. ``timed``: a copy the
        metrics time (a store from the GPU or G2; not a G4 fetch or an adopted file)."""
        got = index.reserve(h, parent, self._clock() if timed else None, priority)
        if got is None:
            return None
        slot, evicted = got
        if index is self.host:
            self.counters.host_evictions += len(evicted)
        else:
            self.counters.disk_evictions += len(evicted)
            self._deletes.extend(evicted)
        return slot

    # -- worker state ---------------------------------------------------------------------

    def pinned_rows(self, rank: int, rows: int) -> None:
        """Worker ``rank`` has page-locked G2 rows ``[0, rows)``."""
        self._pinned_rows[rank] = rows
        if len(self._pinned_rows) == self.config.num_workers:
            self.host.set_usable(min(self._pinned_rows.values()))

    @property
    def pinned_rows_total(self) -> int:
        """G2 rows page-locked, summed over the workers that reported (CPU workers never do)."""
        return sum(self._pinned_rows.values())

    def restored(
        self,
        rank: int,
        newest_first: list[int],
        parents: list[int | None],
        folder: str | None,
        priorities: Sequence[int] = (),
    ) -> None:
        """Worker ``rank`` found these G3 blocks at start-up (with their headers' parents and,
        if given, priorities); once all reported, the index is rebuilt. A block is usable only
        if every rank found its shard; the others are deleted."""
        r = self._restore
        r.reports.append(set(newest_first))
        if folder is not None:
            self._disk_folders.append(folder)
        if rank == 0:
            r.order = list(newest_first)
            if parents:
                r.parents = dict(zip(newest_first, parents, strict=True))
            if priorities:
                r.priorities = dict(zip(newest_first, priorities, strict=True))
        if len(r.reports) < self.config.num_workers:
            return
        common = set.intersection(*r.reports)
        self._deletes.extend(sorted(set.union(*r.reports) - common))
        found = [h for h in r.order if h in common]
        plan = plan_restore(found, r.parents, self.config.disk_blocks)
        self._deletes.extend(self.disk.restore(plan.order, plan.parents, r.priorities))
        self._deletes.extend(plan.dropped)
        self.disk_ready = True
        self._restore = _Restore()

    # -- whole state ----------------------------------------------------------------------

    def _landed(self, path: str, blocks: int, since: float) -> None:
        if blocks:
            self._transfers.append((path, blocks, self._clock() - since))

    def take_transfers(self) -> list[Transfer]:
        """Copies landed since the last call, oldest first (at most 65536 kept: drain each step)."""
        out = list(self._transfers)
        self._transfers.clear()
        return out

    def take_deletes(self) -> list[int]:
        """G3 files to delete, for the next plan (the list is handed over and restarted)."""
        out, self._deletes = self._deletes, []
        return out

    def has_pending(self) -> bool:
        """A copy is in flight, a delete waits for a plan, or the G3 index is not known yet."""
        in_flight = self.host.in_flight or self.disk.in_flight
        return bool(in_flight or self._loads or self._deletes) or not self.disk_ready

    def reset(self) -> bool:
        """Drop everything G2 and G3 hold (their G3 files are deleted by the next plan).
        Refused (False, nothing dropped) while a copy is in flight or the G3 index is not known
        yet: those copies would land stale blocks after the reset."""
        if self._loads or self.host.in_flight or self.disk.in_flight or not self.disk_ready:
            return False
        self.host.clear()
        self._deletes.extend(self.disk.clear())
        return True

    def check_invariants(self) -> None:
        """Pools are consistent and every pin is accounted for by a load or a G3 write."""
        self.host.check_invariants()
        self.disk.check_invariants()
        host_pins = dict.fromkeys(self.host.stores_in_flight(), 1)
        disk_pins = dict.fromkeys(self.disk.stores_in_flight(), 1)
        for h in self._from_host:
            host_pins[h] = host_pins.get(h, 0) + 1
        self._loads.count_pins(host_pins, disk_pins)
        for index, pins in ((self.host, host_pins), (self.disk, disk_pins)):
            held = index.pin_counts()
            assert held == {h: c for h, c in pins.items() if c}, (
                f"{index.name}: pins {held} differ from the loads and writes in flight {pins}"
            )
