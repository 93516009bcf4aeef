"""``KvBlockManager``: the one facade over the G1/G2/G3 tiers and the transfers between them.

Why this exists: an engine integration (the vLLM connector, a benchmark, a demo) should not wire
pools, storages, copy engines and queues together itself. It builds one ``KvBlockManager`` from one
``KvTierConfig``, registers its KV tensors, and then only offloads, matches, onboards and polls.

Threading rule: every method here is called from ONE thread (the owner's). Copies and disk I/O run
on worker threads, but their results reach the pools only inside ``poll()`` on the owner's thread,
so the control-plane metadata needs no locks. The only thread-safe calls are the data-level waits
on a handle (``TransferHandle.wait_layer`` / ``wait_data``), which layer-wise onboarding uses
from the forward pass.

Life cycle: ``KvBlockManager(config)`` (no side effects) -> ``register_device_kv(tensors)`` (or let
``start()`` allocate ``config.device_blocks`` itself) -> ``start()`` -> offload / match / onboard /
poll ... -> ``close()``. Also a context manager.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvtier.config import KvTierConfig
from kvtier.core.block import ImmutableBlock, MutableBlock
from kvtier.core.filter import FrequencyFilter, FrequencyFilterConfig
from kvtier.core.offload import OffloadQueue
from kvtier.core.pool import BlockPool
from kvtier.core.registry import TierEvent, TierRegistry
from kvtier.executor.plane import DataPlaneConfig, RankDataPlane
from kvtier.lifecycle import Lifecycle
from kvtier.manager.tiers import DevicePool, DiskPool, HostPool, TierMatch
from kvtier.plan.restore import plan_restore
from kvtier.storage.block_file import PRIORITY_MAX, PRIORITY_MIN
from kvtier.storage.layout import KvLayout, LayoutKind, default_layout, detect_layout
from kvtier.transfer.engine import CopyEngine
from kvtier.transfer.manager import TransferError, TransferHandle, TransferManager, TransferPath

if TYPE_CHECKING:
    from kvtier.ops.metrics import KvTierMetrics

__all__ = [
    "KvBlockManager",
    "KvHandle",
    "KvTierStats",
    "PathCounters",
    "TierHits",
    "TierMatch",
    "TransferError",
]

G1, G2, G3 = "G1", "G2", "G3"


@dataclass(frozen=True)
class PathCounters:
    """Totals of one transfer path: blocks and bytes that arrived, seconds spent, blocks failed."""

    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed_blocks: int = 0


@dataclass(frozen=True)
class TierHits:
    """Prefix-lookup totals of one tier: blocks found, and blocks asked for but not found."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class KvTierStats:
    """A snapshot of the manager's counters (``paths`` keyed by ``TransferPath.value``)."""

    paths: Mapping[str, PathCounters]
    host: TierHits
    disk: TierHits
    filter_rejections: int
    skipped_offloads: int


class KvHandle:
    """What ``offload`` and ``onboard`` return: one or two transfer batches (``parts``).

    Owner's thread: ``done()`` (True once ``poll`` has applied every part), ``ok``, ``error`` (a
    ``TransferError`` naming the failed blocks; for an onboard ``error.failed_device_block_ids``
    are the device blocks to recompute). Any thread: ``wait_layer(l)``, ``wait_data()``,
    ``data_done()``. ``skipped`` lists offloaded hashes that were not copied (already held, being
    written, or no room).
    """

    def __init__(
        self,
        parts: Sequence[TransferHandle],
        block_hashes: Sequence[int],
        device_block_ids: Sequence[int],
        num_layers: int,
        skipped: Sequence[int] = (),
    ) -> None:
        self.parts = tuple(parts)
        self.block_hashes = tuple(block_hashes)
        self.device_block_ids = tuple(device_block_ids)
        self.num_layers = num_layers
        self.skipped = tuple(skipped)

    def done(self) -> bool:
        return all(p.done() for p in self.parts)

    @property
    def ok(self) -> bool:
        return self.done() and self.error is None

    @property
    def error(self) -> TransferError | None:
        errors = [p.error for p in self.parts if p.error is not None]
        if not errors:
            return None
        if len(errors) == 1:
            return errors[0]
        return TransferError(
            errors[0].path,
            "; ".join(str(e) for e in errors),
            [h for e in errors for h in e.failed_hashes],
            [d for e in errors for d in e.failed_device_block_ids],
            [h for e in errors for h in e.corrupt_hashes],
        )

    def data_done(self) -> bool:
        return all(p.data_done() for p in self.parts)

    def wait_data(self, timeout: float | None = None) -> bool:
        return all([p.wait_data(timeout) for p in self.parts])

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return all([p.wait_layer(layer, timeout) for p in self.parts])

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"KvHandle({len(self.block_hashes)} blocks, {len(self.parts)} parts, {state})"


@dataclass
class _Effect:
    """What ``poll`` must do to the pools when a batch finishes."""

    kind: str  # "store" (offload/cascade into ``tier``) or "onboard"
    tier: str = ""
    targets: list[MutableBlock] = field(default_factory=list)
    parents: list[int | None] = field(default_factory=list)
    priorities: list[int] = field(default_factory=list)
    held: list[ImmutableBlock] = field(default_factory=list)  # refs released when done


class KvBlockManager(Lifecycle):
    """Tiered KV block manager: G1 device, G2 host, G3 disk, with polled asynchronous transfers.

    Public surface (all on the owner's thread unless noted):

    - ``register_device_kv(tensors, kind=None) -> KvLayout``: adopt the engine's G1 tensors (one
      tensor = fully contiguous, dict layer_name -> tensor = layer-separate; layout detected).
      Call before ``start``; without it ``start`` allocates ``config.device_blocks`` itself.
    - ``start()`` / ``close()`` / ``with``.
    - ``layout``, ``device_pool``, ``host_pool``, ``disk_pool`` (None when a tier is absent),
      ``registry``, ``transfers``.
    - ``offload(device_block_ids, sequence_hashes, *, parent_sequence_hashes=None, priority=0,
      gate=None) -> KvHandle``: copy device blocks to G2 (or G3 when there is no G2) and register
      them there when the copy lands. Blocks the target already holds or is already receiving, or
      that do not fit because the target is full of blocks in use, are skipped
      (``handle.skipped``). ``gate`` is waited on before the device blocks are read.
    - ``match(sequence_hashes) -> TierMatch``: the longest prefix held by G2, then G3 from where G2
      stopped; holds a reference on every matched block until released or onboarded.
    - ``onboard(match, device_block_ids, *, gate=None) -> KvHandle``: copy the first
      ``len(device_block_ids)`` blocks of a match into the given device blocks; takes over the
      match's references (the rest are released at once) and releases them when done.
      ``handle.wait_layer(l)`` (thread-safe) returns when layer ``l`` landed.
    - ``poll() -> list[KvHandle]``: progress the queues, apply finished transfers to the pools
      (register offloaded blocks, roll back failed ones, release onboard references, drop corrupt
      disk blocks, queue the G2 -> G3 cascade); returns the handles that finished in this call.
    - ``wait(handle, timeout=None)`` / ``wait_all(timeout=None)``: poll until finished.
    - ``stats() -> KvTierStats``; ``drain_events()``: the registry's Store/Remove events.
    """

    def __init__(
        self,
        config: KvTierConfig,
        *,
        copy_engine: CopyEngine | None = None,
        metrics: KvTierMetrics | None = None,
    ) -> None:
        """Record the config; allocate nothing, start nothing (see ``start``).

        ``copy_engine`` overrides the data plane's choice (``TorchCopyEngine`` on CPU,
        ``CudaCopyEngine`` on CUDA; ``kvtier.executor.plane``);
        ``metrics`` receives every transfer and lookup as well as ``stats()``.
        """
        if not isinstance(config, KvTierConfig):
            raise TypeError(f"config must be a KvTierConfig, got {type(config).__name__}")
        self.config = config
        self.metrics = metrics
        self.registry = TierRegistry()
        self._plane = RankDataPlane(DataPlaneConfig.from_config(config), copy_engine)
        self._device_tensors: Mapping[str, torch.Tensor] | torch.Tensor | None = None
        self._layout: KvLayout | None = None
        self.device_pool: DevicePool | None = None
        self.host_pool: HostPool | None = None
        self.disk_pool: DiskPool | None = None
        self._transfers: TransferManager | None = None
        self._effects: dict[TransferHandle, _Effect] = {}
        self._handles: list[KvHandle] = []
        self._writing: dict[str, set[int]] = {G2: set(), G3: set()}
        self._filter = FrequencyFilter(FrequencyFilterConfig(enabled=config.disk_filter))
        self._cascade_queue: OffloadQueue[ImmutableBlock] | None = None
        self._cascade_inflight = 0
        self._paths: dict[str, PathCounters] = {p.value: PathCounters() for p in TransferPath}
        self._hits = {G2: TierHits(), G3: TierHits()}
        self._filter_rejections = 0
        self._skipped = 0
        self._started = False
        self._closed = False

    # -- set-up ---------------------------------------------------------------------------------

    def register_device_kv(
        self,
        tensors: Mapping[str, torch.Tensor] | torch.Tensor,
        *,
        kind: LayoutKind | None = None,
    ) -> KvLayout:
        """Adopt engine-owned G1 tensors and return their detected layout. Call before ``start``."""
        if self._started:
            raise RuntimeError("register_device_kv must be called before start()")
        layout = detect_layout(tensors, self.config.model, kind=kind)
        self._device_tensors = tensors
        self._layout = layout
        return layout

    @property
    def layout(self) -> KvLayout:
        if self._layout is None:
            raise RuntimeError("no device KV yet: call register_device_kv() or start()")
        return self._layout

    @property
    def transfers(self) -> TransferManager:
        if self._transfers is None:
            raise RuntimeError("KvBlockManager is not started")
        return self._transfers

    def start(self) -> None:
        """Allocate host memory, open the disk tier (restoring its index), start worker threads."""
        if self._closed:
            raise RuntimeError("a closed KvBlockManager cannot be started again")
        if self._started:
            return
        cfg = self.config
        if self._layout is None or self._device_tensors is None:
            if cfg.device_blocks == 0:
                raise RuntimeError(
                    "no device KV: call register_device_kv(tensors) or set device_blocks > 0"
                )
            self._layout = default_layout(
                cfg.model, LayoutKind(cfg.device_layout), cfg.device_blocks
            )
        layout = self._layout
        plane = self._plane  # the one wiring of storages, engine, disk threads and loader
        plane.open(layout, self._device_tensors)
        bs = cfg.model.block_size
        self.device_pool = DevicePool(
            BlockPool(layout.num_blocks, block_size=bs, tier=G1, registry=self.registry),
            plane.device,
        )
        if plane.host is not None:
            pool = BlockPool(cfg.host_blocks, block_size=bs, tier=G2, registry=self.registry)
            self.host_pool = HostPool(pool, plane.host)
        if plane.disk is not None:
            pool = BlockPool(cfg.disk_blocks, block_size=bs, tier=G3, registry=self.registry)
            self.disk_pool = DiskPool(pool, plane.disk)
            # The one restore rule (kvtier.plan.restore): the newest files that fit, oldest
            # first, parents before children, unsafe parent links dropped; the rest deleted.
            by_hash = {e.sequence_hash: e for e in plane.found}
            links = {e.sequence_hash: e.parent_hash for e in plane.found}
            restore = plan_restore(list(by_hash), links, cfg.disk_blocks)
            for extra in restore.dropped:  # beyond G3's size (it shrank): delete
                plane.disk.remove(extra)
            for block_id, h in enumerate(restore.order):
                pool.restore(
                    block_id,
                    h,
                    parent_sequence_hash=restore.parents[h],
                    priority=by_hash[h].priority,
                )
                self.disk_pool.slot_hashes[block_id] = h
            self._cascade_queue = OffloadQueue(pool)
        self._transfers = TransferManager(
            plane.engine,
            device=plane.device,
            host=plane.host,
            disk_io=plane.disk_io,
            loader=plane.loader,
            num_layers=cfg.model.num_layers,
            max_inflight_blocks=cfg.max_inflight_blocks,
            pin_staging=plane.on_cuda,
        )
        self._started = True

    def close(self, timeout: float = 30.0) -> None:
        """Finish (up to ``timeout`` s) or cancel in-flight work, apply it, stop threads.

        Every disk block is then either complete and registered on disk, or absent.
        """
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        assert self._transfers is not None
        if self._cascade_queue is not None:
            left = self._cascade_queue.pop(len(self._cascade_queue))
            for req in (*left.ready, *left.skipped):
                req.payload.release()
        settled = self._transfers.close(timeout)
        # The engine first (fails copies whose gate never opened), then the loader and the disk
        # threads (every block file is now complete or absent), G3, the pinner, G2.
        self._plane.close()
        settled.extend(self._transfers.close(1.0))  # settles what finished meanwhile
        for part in settled:
            self._apply(part)
        self._handles.clear()

    def _check_running(self) -> TransferManager:
        if not self._started or self._closed:
            raise RuntimeError("KvBlockManager is not running (call start(), not after close())")
        assert self._transfers is not None
        return self._transfers

    def _check_device_ids(self, device_block_ids: Sequence[int]) -> None:
        nb = self.layout.num_blocks
        for d in device_block_ids:
            if not 0 <= d < nb:
                raise ValueError(f"device block id {d} out of range 0..{nb - 1}")

    # -- offload --------------------------------------------------------------------------------

    def offload(
        self,
        device_block_ids: Sequence[int],
        sequence_hashes: Sequence[int],
        *,
        parent_sequence_hashes: Sequence[int | None] | None = None,
        priority: int = 0,
        gate: object | None = None,
    ) -> KvHandle:
        """Offload device blocks; see the class docstring. ``parent_sequence_hashes`` defaults to
        the chain within the call (block i's parent is block i-1's hash; the first has none)."""
        transfers = self._check_running()
        n = len(sequence_hashes)
        if len(device_block_ids) != n:
            raise ValueError(f"{len(device_block_ids)} device block ids for {n} sequence hashes")
        if parent_sequence_hashes is None:
            parents: list[int | None] = [None, *sequence_hashes[:-1]] if n else []
        else:
            parents = list(parent_sequence_hashes)
            if len(parents) != n:
                raise ValueError(f"{len(parents)} parent hashes for {n} sequence hashes")
        self._check_device_ids(device_block_ids)
        if len(set(sequence_hashes)) != n:
            raise ValueError("sequence_hashes of one offload must be distinct")
        for h, parent in zip(sequence_hashes, parents, strict=True):
            BlockPool.check_registration(h, parent_sequence_hash=parent, priority=priority)
        if self.disk_pool is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise ValueError(
                f"priority must fit in 32 bits with a disk tier (block file header), got {priority}"
            )
        tier = G2 if self.host_pool is not None else G3 if self.disk_pool is not None else None
        if tier is None:
            raise RuntimeError("offload needs a host or disk tier; both are disabled")
        path = TransferPath.DEVICE_TO_HOST if tier == G2 else TransferPath.DEVICE_TO_DISK
        target_pool = self._pool(tier)
        picked = []
        for i, h in enumerate(sequence_hashes):
            if target_pool.contains(h):
                if tier == G2:
                    self._sighted_in_host(h)
            elif h not in self._writing[tier]:
                picked.append(i)
        targets = self._allocate(tier, len(picked), [sequence_hashes[i] for i in picked])
        chosen = picked[: len(targets)]
        chosen_set = set(chosen)
        skipped = [h for i, h in enumerate(sequence_hashes) if i not in chosen_set]
        self._skipped += len(skipped)
        hashes = [sequence_hashes[i] for i in chosen]
        dids = [device_block_ids[i] for i in chosen]
        pars = [parents[i] for i in chosen]
        part = transfers.submit(
            path,
            hashes,
            dids,
            [b.block_id for b in targets] if tier == G2 else [],
            parents=pars,
            priorities=[priority] * len(hashes),
            gate=gate,
        )
        self._writing[tier].update(hashes)
        self._effects[part] = _Effect("store", tier, targets, pars, [priority] * len(hashes))
        handle = KvHandle([part], hashes, dids, self.layout.model.num_layers, skipped)
        self._handles.append(handle)
        return handle

    def _pool(self, tier: str) -> BlockPool:
        owner = self.host_pool if tier == G2 else self.disk_pool
        assert owner is not None
        return owner.pool

    def _allocate(self, tier: str, n: int, hashes: Sequence[int]) -> list[MutableBlock]:
        """Up to ``n`` target blocks (fewer when the tier is full of blocks in use)."""
        pool = self._pool(tier)
        want = min(n, pool.num_free + pool.num_inactive)
        blocks: list[MutableBlock] | None = None
        while want > 0:
            blocks = pool.allocate(want)
            if blocks is not None:
                break
            want //= 2
        if not blocks:
            return []
        if tier == G3:
            assert self.disk_pool is not None
            self.disk_pool.reclaim(
                [b.block_id for b in blocks], self._writing[G3] | set(hashes[: len(blocks)])
            )
        return blocks

    # -- match and onboard ----------------------------------------------------------------------

    def match(self, sequence_hashes: Sequence[int]) -> TierMatch:
        """Cross-tier prefix match; see the class docstring."""
        self._check_running()
        host = self.host_pool.pool.match(sequence_hashes) if self.host_pool else []
        rest = sequence_hashes[len(host) :]
        disk: list[ImmutableBlock] = []
        if self.disk_pool is not None and rest:
            parent = host[-1].sequence_hash if host else None
            disk = self.disk_pool.match_shared(rest, parent, self._writing[G3])
        n = len(sequence_hashes)
        if self.host_pool is not None:
            self._hits[G2] = _add_hits(self._hits[G2], len(host), n - len(host))
        if self.disk_pool is not None:
            self._hits[G3] = _add_hits(self._hits[G3], len(disk), len(rest) - len(disk))
        if self.metrics is not None:
            self.metrics.record_lookup(n, len(host), len(disk), self.config.model.block_size)
        return TierMatch(host, disk)

    def onboard(
        self, match: TierMatch, device_block_ids: Sequence[int], *, gate: object | None = None
    ) -> KvHandle:
        """Onboard a match into the given device blocks; see the class docstring."""
        transfers = self._check_running()
        if match.released:
            raise ValueError("this match was already released or onboarded")
        n = len(device_block_ids)
        if n > len(match):
            raise ValueError(f"{n} device blocks for a match of {len(match)} blocks")
        self._check_device_ids(device_block_ids)
        if len(set(device_block_ids)) != n:
            raise ValueError("device_block_ids of one onboard must be distinct")
        host = match.host[:n]
        disk = match.disk[: n - len(host)]
        for extra in (*match.host[len(host) :], *match.disk[len(disk) :]):
            extra.release()
        match.released = True
        parts: list[TransferHandle] = []
        dids = list(device_block_ids)
        if host:
            part = transfers.submit(
                TransferPath.HOST_TO_DEVICE,
                [b.sequence_hash for b in host],
                [b.block_id for b in host],
                dids[: len(host)],
                gate=gate,
            )
            self._effects[part] = _Effect("onboard", G2, held=list(host))
            parts.append(part)
        if disk:
            part = transfers.submit(
                TransferPath.DISK_TO_DEVICE,
                [b.sequence_hash for b in disk],
                [],
                dids[len(host) :],
                gate=gate,
            )
            self._effects[part] = _Effect("onboard", G3, held=list(disk))
            parts.append(part)
        for b in host:  # reuse is a sighting for the G2 -> G3 frequency filter
            self._sighted_in_host(b.sequence_hash)
        hashes = [b.sequence_hash for b in (*host, *disk)]
        handle = KvHandle(parts, hashes, dids, self.layout.model.num_layers)
        self._handles.append(handle)
        return handle

    # -- progress -------------------------------------------------------------------------------

    def poll(self) -> list[KvHandle]:
        """Progress queues and apply finished transfers; see the class docstring."""
        transfers = self._check_running()
        settled = transfers.poll()
        for part in settled:
            self._apply(part)
        self._pump_cascade()
        if settled and self.metrics is not None:
            self._publish_occupancy(self.metrics)
        finished = [h for h in self._handles if h.done()]
        if finished:
            self._handles = [h for h in self._handles if not h.done()]
        return finished

    def wait(self, handle: KvHandle, timeout: float | None = None) -> None:
        """Poll until ``handle`` is done (raises TimeoutError after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not handle.done():
            self.poll()
            if handle.done():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{handle!r} not done after {timeout} s")
            time.sleep(0.0002)

    def wait_all(self, timeout: float | None = None) -> None:
        """Poll until nothing is queued or in flight, cascades included."""
        deadline = None if timeout is None else time.monotonic() + timeout
        transfers = self._check_running()
        while True:
            self.poll()
            queued = len(self._cascade_queue) if self._cascade_queue is not None else 0
            if not transfers.pending() and not self._effects and not queued:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"transfers still pending after {timeout} s")
            time.sleep(0.0002)

    def _apply(self, part: TransferHandle) -> None:
        effect = self._effects.pop(part, None)
        if effect is None:
            return
        failed = set()
        if part.error is not None:
            bad = set(part.error.failed_hashes)
            failed = {i for i, h in enumerate(part.block_hashes) if h in bad}
        self._count(part, len(failed))
        if effect.kind == "onboard":
            self._apply_onboard(part, effect, failed)
        else:
            self._apply_store(part, effect, failed)

    def _count(self, part: TransferHandle, nfailed: int) -> None:
        key = part.path.value
        c = self._paths[key]
        ok = part.num_blocks - nfailed
        nbytes = ok * self.layout.block_bytes
        seconds = part.seconds or 0.0
        self._paths[key] = PathCounters(
            c.blocks + ok, c.bytes + nbytes, c.seconds + seconds, c.failed_blocks + nfailed
        )
        if self.metrics is not None and part.num_blocks:
            self.metrics.record_transfer(key, ok, nbytes, seconds)

    def _apply_onboard(self, part: TransferHandle, effect: _Effect, failed: set[int]) -> None:
        for b in effect.held:
            b.release()
        if effect.tier == G3 and failed:
            assert self.disk_pool is not None
            for i in failed:
                self.disk_pool.pool.remove(part.block_hashes[i])
            if self.metrics is not None:
                self.metrics.record_load_errors("disk", len(failed))
        elif failed and self.metrics is not None:
            self.metrics.record_load_errors("host", len(failed))

    def _apply_store(self, part: TransferHandle, effect: _Effect, failed: set[int]) -> None:
        tier = effect.tier
        pool = self._pool(tier)
        self._writing[tier].difference_update(part.block_hashes)
        if part.path is TransferPath.HOST_TO_DISK:
            self._cascade_inflight -= part.num_blocks
        stored: list[ImmutableBlock] = []
        for i, (block, h) in enumerate(zip(effect.targets, part.block_hashes, strict=True)):
            if i in failed:
                block.release()
                continue
            block.mark_complete()
            imm = pool.register(
                block, h, parent_sequence_hash=effect.parents[i], priority=effect.priorities[i]
            )
            if tier == G3:
                assert self.disk_pool is not None
                self.disk_pool.slot_hashes[imm.block_id] = h
            stored.append(imm)
        for b in effect.held:
            b.release()
        if tier == G2 and self.disk_pool is not None and not self._closed:
            self._cascade(stored)
        else:
            for imm in stored:
                imm.release()

    def _cascade(self, stored: list[ImmutableBlock]) -> None:
        """Queue G2 -> G3 writes of host blocks that pass the frequency filter, keeping a ref on
        each host block until its write settles; the rest are released."""
        assert self.disk_pool is not None and self._cascade_queue is not None
        for imm in stored:
            h = imm.sequence_hash
            if self.disk_pool.pool.contains(h) or h in self._writing[G3]:
                imm.release()
            elif not self._filter.should_offload(h):
                imm.release()
                self._filter_rejections += 1
                if self.metrics is not None:
                    self.metrics.record_filter_rejections()
            elif not self._cascade_queue.push(h, imm, priority=imm.priority):
                imm.release()

    def _sighted_in_host(self, sequence_hash: int) -> None:
        """A block G2 already holds was offloaded again or onboarded: a sighting for the
        frequency filter, and a G2 -> G3 write once it passes."""
        if self.host_pool is None or self.disk_pool is None or self._cascade_queue is None:
            return
        if self.disk_pool.pool.contains(sequence_hash) or sequence_hash in self._writing[G3]:
            return
        if sequence_hash in self._cascade_queue:
            return
        held = self.host_pool.pool.match([sequence_hash])
        self._cascade(held)

    def _pump_cascade(self) -> None:
        """Submit queued G2 -> G3 writes, highest priority first, in half the in-flight bound."""
        queue = self._cascade_queue
        if queue is None or not len(queue) or self._closed:
            return
        budget = max(1, self.config.max_inflight_blocks // 2) - self._cascade_inflight
        if budget <= 0:
            return
        batch = queue.pop(budget)
        for req in batch.skipped:
            req.payload.release()
        picked = [r.payload for r in batch.ready]
        if not picked:
            return
        hashes = [b.sequence_hash for b in picked]
        targets = self._allocate(G3, len(picked), hashes)
        for extra in picked[len(targets) :]:
            extra.release()
        picked = picked[: len(targets)]
        if not picked:
            return
        hashes = hashes[: len(picked)]
        assert self._transfers is not None
        part = self._transfers.submit(
            TransferPath.HOST_TO_DISK,
            hashes,
            [b.block_id for b in picked],
            [],
            parents=[b.parent_sequence_hash for b in picked],
            priorities=[b.priority for b in picked],
        )
        self._cascade_inflight += len(picked)
        self._writing[G3].update(hashes)
        self._effects[part] = _Effect(
            "store",
            G3,
            targets,
            [b.parent_sequence_hash for b in picked],
            [b.priority for b in picked],
            held=picked,
        )

    # -- observability --------------------------------------------------------------------------

    def stats(self) -> KvTierStats:
        """A snapshot of every counter."""
        return KvTierStats(
            dict(self._paths),
            self._hits[G2],
            self._hits[G3],
            self._filter_rejections,
            self._skipped,
        )

    def _publish_occupancy(self, metrics: KvTierMetrics) -> None:
        for label, tier in (
            ("device", self.device_pool),
            ("host", self.host_pool),
            ("disk", self.disk_pool),
        ):
            if tier is not None:
                p = tier.pool
                metrics.set_pool_occupancy(label, p.num_active, p.num_inactive, p.num_free)
        if self._plane.pinner is not None:
            metrics.set_pinned_bytes(self._plane.pinner.progress().pinned_bytes)

    def drain_events(self) -> list[TierEvent]:
        """The registry's Store/Remove events since the last call, oldest first."""
        return self.registry.drain_events()


def _add_hits(h: TierHits, hits: int, misses: int) -> TierHits:
    return TierHits(h.hits + hits, h.misses + misses)
