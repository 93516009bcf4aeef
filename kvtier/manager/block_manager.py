"""``KvBlockManager``: the one facade over the G1/G2/G3 tiers and the transfers between them.

Why: an embedder (a benchmark, a demo) builds one object from one ``KvTierConfig`` and only
offloads, matches, onboards and polls. Every G2/G3 decision is its ``TierPlanner``'s (the control
plane the vLLM scheduler half runs, here with one worker); ``copies.py`` turns the decisions into
transfer batches and reports their outcome back. Threading: every method runs on ONE thread (the
owner's); results reach the planner only in ``poll()``, so it needs no locks; only a handle's data
waits (``wait_layer`` / ``wait_data``) are thread-safe. Life cycle: ``KvBlockManager(config)``
(no side effects) -> ``register_device_kv`` (or ``start()`` allocates ``config.device_blocks``)
-> ``start()`` -> offload / match / onboard / poll ... -> ``close()``; also a context manager.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from kvtier.config import KvTierConfig
from kvtier.core.pool import BlockPool
from kvtier.core.registry import TierEvent
from kvtier.executor.plane import DataPlaneConfig, RankDataPlane
from kvtier.lifecycle import Lifecycle
from kvtier.manager.copies import Copies
from kvtier.manager.handles import KvHandle, KvTierStats, Tally, TierMatch
from kvtier.plan.planner import PlannerConfig, TierPlanner
from kvtier.plan.slots import SlotIndex
from kvtier.storage.block_file import PRIORITY_MAX, PRIORITY_MIN
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import KvLayout, LayoutKind, default_layout, detect_layout
from kvtier.transfer.copy_api import CopyEngine
from kvtier.transfer.manager import TransferManager

if TYPE_CHECKING:
    from kvtier.ops.metrics import KvTierMetrics

__all__ = ["KvBlockManager"]


S = TypeVar("S", DeviceStorage, HostStorage, DiskStorage)


@dataclass
class Tier(Generic[S]):
    """A tier as a pair of a control-plane ``BlockPool`` (for G2 and G3 the planner's) and the
    storage holding its bytes (composition, so here, not in ``kvtier/storage/``, which imports no
    pools). Slot i of ``pool`` is G1 block i of the engine's (or kvtier's own) tensors, G2 row i of
    ``storage.rows``, or a G3 capacity unit (G3 files are named by the hash the slot holds)."""

    pool: BlockPool
    storage: S


DevicePool = Tier[DeviceStorage]
HostPool = Tier[HostStorage]
DiskPool = Tier[DiskStorage]


# Argument checks of offload and onboard: a copy is registered only when it lands (in poll), so what
# register (or a G3 block file header) would refuse is refused before anything is planned or moved.
def check_device_ids(device_block_ids: Sequence[int], num_blocks: int) -> None:
    for d in device_block_ids:
        if not 0 <= d < num_blocks:
            raise ValueError(f"device block id {d} out of range 0..{num_blocks - 1}")


def offload_parents(
    device_block_ids: Sequence[int],
    sequence_hashes: Sequence[int],
    parent_sequence_hashes: Sequence[int | None] | None,
    priority: int,
    *,
    num_blocks: int,
    with_disk: bool,
) -> list[int | None]:
    """Check an offload's arguments; returns each block's parent (by default the chain within
    the call: block i's parent is block i-1's hash, the first has none)."""
    n = len(sequence_hashes)
    if len(device_block_ids) != n:
        raise ValueError(f"{len(device_block_ids)} device block ids for {n} sequence hashes")
    if parent_sequence_hashes is None:
        parents: list[int | None] = [None, *sequence_hashes[:-1]] if n else []
    else:
        parents = list(parent_sequence_hashes)
        if len(parents) != n:
            raise ValueError(f"{len(parents)} parent hashes for {n} sequence hashes")
    check_device_ids(device_block_ids, num_blocks)
    if len(set(sequence_hashes)) != n:
        raise ValueError("sequence_hashes of one offload must be distinct")
    for h, parent in zip(sequence_hashes, parents, strict=True):
        BlockPool.check_registration(h, parent_sequence_hash=parent, priority=priority)
    if with_disk and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(
            f"priority must fit in 32 bits with a disk tier (block file header), got {priority}"
        )
    return parents


def check_onboard(match: TierMatch, device_block_ids: Sequence[int], num_blocks: int) -> int:
    """Check an onboard's arguments; returns how many blocks of the match it copies."""
    if match.released:
        raise ValueError("this match was already released or onboarded")
    n = len(device_block_ids)
    if n > len(match):
        raise ValueError(f"{n} device blocks for a match of {len(match)} blocks")
    check_device_ids(device_block_ids, num_blocks)
    if len(set(device_block_ids)) != n:
        raise ValueError("device_block_ids of one onboard must be distinct")
    return n


def _pool_of(index: SlotIndex) -> BlockPool:
    assert index.pool is not None
    return index.pool


class KvBlockManager(Lifecycle):
    """Tiered KV block manager: G1 device, G2 host, G3 disk, with polled asynchronous transfers.

    Calls: ``register_device_kv``, ``start`` / ``close`` / ``with``,
    ``offload`` (G2, and G3 through the cascade, from G2 or, when G2 is absent or full, from the
    device), ``match`` (pins a G2-then-G3 prefix), ``onboard`` (takes a match's pins over),
    ``poll`` (the only place outcomes reach the planner), ``wait`` / ``wait_all``, ``stats``,
    ``drain_events``. Attributes: ``layout``, ``planner``, ``registry``, ``transfers``,
    ``device_pool`` / ``host_pool`` / ``disk_pool`` (None when absent; G2/G3 are the planner's).
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
        # One worker; without G2 every offload goes to G3 and the filter (G2 -> G3) has no say.
        plan = PlannerConfig(
            config.host_blocks,
            config.disk_blocks,
            disk_filter=config.disk_filter and config.host_blocks > 0,
            record_events=True,
        )
        self.planner = TierPlanner(plan, disk_has=self._has_disk_file)
        self.registry = self.planner.registry
        self._plane = RankDataPlane(DataPlaneConfig.from_config(config), copy_engine)
        self._device_tensors: Mapping[str, torch.Tensor] | torch.Tensor | None = None
        self._layout: KvLayout | None = None
        self.device_pool: DevicePool | None = None
        self.host_pool: HostPool | None = None
        self.disk_pool: DiskPool | None = None
        self._transfers: TransferManager | None = None
        self._copies: Copies | None = None
        self._handles: list[KvHandle] = []
        self._tally = Tally()
        self._rejections_told = 0  # filter rejections already given to the metrics
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
            BlockPool(layout.num_blocks, block_size=bs, tier="G1", registry=self.registry),
            plane.device,
        )
        if plane.host is not None:
            self.host_pool = HostPool(_pool_of(self.planner.host), plane.host)
        if plane.disk is not None:
            self.disk_pool = DiskPool(_pool_of(self.planner.disk), plane.disk)
            # The one restore rule (kvtier.plan.restore), in the planner: the newest files that
            # fit, oldest first, parents before children, unsafe parent links dropped.
            found = plane.found  # empty for a large tier: files are the index, adopted when matched
            hashes = [e.sequence_hash for e in found]
            parents = [e.parent_hash for e in found]
            priorities = [e.priority for e in found]
            self.planner.restored(0, hashes, parents, None, priorities=priorities)
            for extra in self.planner.take_deletes():  # beyond G3's size (it shrank)
                plane.disk.remove(extra)
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
        self._copies = Copies(
            self.planner,
            self._transfers,
            self.disk_pool.storage if self.disk_pool else None,
            layout=layout,
            tally=self._tally,
            metrics=self.metrics,
        )
        self._started = True

    def close(self, timeout: float = 30.0) -> None:
        """Finish (up to ``timeout`` s) or cancel in-flight work, apply it, stop threads; every
        disk block is then either complete and registered on disk, or absent."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        assert self._transfers is not None
        settled = self._transfers.close(timeout)
        # The engine first (fails copies whose gate never opened), then the loader and the disk
        # threads (every block file is now complete or absent), G3, the pinner, G2.
        self._plane.close()
        settled.extend(self._transfers.close(1.0))  # settles what finished meanwhile
        assert self._copies is not None
        self._copies.settle(settled, closing=True)
        self._handles.clear()

    def _check_running(self) -> Copies:
        if not self._started or self._closed:
            raise RuntimeError("KvBlockManager is not running (call start(), not after close())")
        assert self._copies is not None
        return self._copies

    # -- offload, match, onboard ----------------------------------------------------------------

    def offload(
        self,
        device_block_ids: Sequence[int],
        sequence_hashes: Sequence[int],
        *,
        parent_sequence_hashes: Sequence[int | None] | None = None,
        priority: int = 0,
        gate: object | None = None,
    ) -> KvHandle:
        """Offload device blocks; see the class docstring (default parents: ``offload_parents``)."""
        copies = self._check_running()
        parents = offload_parents(
            device_block_ids,
            sequence_hashes,
            parent_sequence_hashes,
            priority,
            num_blocks=self.layout.num_blocks,
            with_disk=self.disk_pool is not None,
        )
        if self.host_pool is None and self.disk_pool is None:
            raise RuntimeError("offload needs a host or disk tier; both are disabled")
        handle = copies.store(device_block_ids, sequence_hashes, parents, priority, gate)
        self._handles.append(handle)
        return handle

    def match(self, sequence_hashes: Sequence[int]) -> TierMatch:
        """Cross-tier prefix match; see the class docstring."""
        match = self._check_running().pin_prefix(sequence_hashes)
        n, nh, nd = len(sequence_hashes), match.num_host, match.num_disk
        self._tally.lookup(n, nh if self.host_pool else None, nd if self.disk_pool else None)
        if self.metrics is not None:
            self.metrics.record_lookup(n, nh, nd, self.config.model.block_size)
        return match

    def onboard(
        self, match: TierMatch, device_block_ids: Sequence[int], *, gate: object | None = None
    ) -> KvHandle:
        """Onboard a match into the given device blocks; see the class docstring."""
        copies = self._check_running()
        check_onboard(match, device_block_ids, self.layout.num_blocks)
        handle = copies.load(match, list(device_block_ids), gate)
        self._handles.append(handle)
        return handle

    def _has_disk_file(self, sequence_hash: int) -> bool:
        """The planner's check for a G3 block another process wrote (one ``lstat``)."""
        return self.disk_pool is not None and self.disk_pool.storage.has_block(sequence_hash)

    # -- progress -------------------------------------------------------------------------------

    def poll(self) -> list[KvHandle]:
        """Progress queues and report finished transfers; see the class docstring."""
        copies = self._check_running()
        settled = copies.transfers.poll()
        if settled:
            copies.settle(settled)
            if self.metrics is not None:
                self._publish_occupancy(self.metrics)
        finished = [h for h in self._handles if h.done()]
        if finished:
            self._handles = [h for h in self._handles if not h.done()]
        return finished

    def wait(self, handle: KvHandle, timeout: float | None = None) -> None:
        """Poll until ``handle`` is done (raises TimeoutError after ``timeout`` s)."""
        self._poll_until(handle.done, timeout, f"{handle!r} not done")

    def wait_all(self, timeout: float | None = None) -> None:
        """Poll until nothing is queued or in flight, cascades included."""
        copies = self._check_running()
        self._poll_until(lambda: not copies.transfers.pending() and not copies.jobs, timeout)

    def _poll_until(
        self, done: Callable[[], bool], timeout: float | None, what: str = "transfers still pending"
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self.poll()
            if done():
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout} s")
            time.sleep(0.0002)

    # -- observability --------------------------------------------------------------------------

    def stats(self) -> KvTierStats:
        """A snapshot of every counter."""
        return self._tally.snapshot(self.planner.filter.rejections)

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
        rejections = self.planner.filter.rejections
        if rejections > self._rejections_told:
            metrics.record_filter_rejections(rejections - self._rejections_told)
            self._rejections_told = rejections

    def drain_events(self) -> list[TierEvent]:
        """The registry's Store/Remove events since the last call, oldest first."""
        return self.registry.drain_events()
