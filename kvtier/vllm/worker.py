"""The worker half of the connector: moves bytes exactly as the scheduler half planned.

Why this exists: the worker owns the data (vLLM's KV tensors, the G2 host rows, the G3 files) but
decides nothing; it executes each step's ``StepPlan`` with the data plane's pieces
(``DeviceStorage``/``HostStorage`` views, the ``TorchCopyEngine``, ``DiskStorage`` on ``DiskIo``
threads, the ``DiskToDeviceLoader`` for G3 loads, ``stage_blocks`` for G3 writes from the GPU) and
reports back what landed and what failed.

Ordering rules (where the races hide):

- Stores copy GPU blocks out in ``wait_for_save``, after the step's forward pass wrote them, and
  wait for the copy there, so a block vLLM frees after the step is never read later. G3 writes
  from a G2 slot are queued only after that slot's copy landed.
- Layer-wise loads (``layerwise_onboard``) start in ``start_load_kv``, before the forward pass;
  ``wait_for_layer_load(layer)`` waits for that layer only. Asynchronous loads run in the
  background and are reported by ``get_finished``.
- A G3 block that is missing or fails its checksum is not copied; its GPU block is reported by
  ``get_block_ids_with_load_errors`` so vLLM recomputes it. If a layer-wise load fails, that
  step's stores are dropped (they may have attended to the unloaded block).

On a CUDA device the same plan runs on ``GpuDataPath`` (``kvtier.vllm.gpu_path``): pinned G2,
stores issued behind an event and finished asynchronously (the scheduler half keeps a finished
request's blocks until ``get_finished`` names it), GPU-side waits instead of host waits. The
rules above hold with "wait" meaning a CUDA stream wait; the CPU path is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvtier.config import KvTierConfig, ModelConfig, require_count, require_tiers
from kvtier.storage.block_file import BlockHeader
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.identity import ModelIdentity
from kvtier.storage.layout import KvLayout, LayoutKind, detect_layout
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadHandle, DiskToDeviceLoader
from kvtier.transfer.disk_store import stage_blocks
from kvtier.transfer.engine import CopyHandle, TorchCopyEngine, check_ids, copy_batch
from kvtier.vllm.metadata import DiskWrite, LoadJob, StepPlan, WorkerReport
from kvtier.vllm.remote_exec import RemoteExecutor, RemoteFetch

if TYPE_CHECKING:
    from kvtier.vllm.gpu_path import GpuDataPath

__all__ = ["KvTierWorker", "WorkerConfig"]

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005
"""Longest a worker blocks in an idle step (no forward pass) waiting for background work."""


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker needs: its rank, the tier sizes (same as the scheduler half's) and G3."""

    rank: int
    host_blocks: int
    disk_blocks: int
    disk_dir: str | None
    disk_o_direct: bool = True
    io_threads: int = 4
    model_identity: ModelIdentity | None = None  # G3 namespace (kvtier.storage.identity)
    disk_group: str | None = None

    def __post_init__(self) -> None:
        require_count("rank", self.rank)
        require_tiers(self.host_blocks, self.disk_blocks, self.disk_dir)
        require_count("io_threads", self.io_threads, low=1)

    @classmethod
    def from_config(cls, config: KvTierConfig) -> WorkerConfig:
        """This worker's share of the one configuration root."""
        return cls(
            rank=config.rank,
            host_blocks=config.host_blocks,
            disk_blocks=config.disk_blocks,
            disk_dir=config.disk_dir,
            disk_o_direct=config.disk_o_direct,
            io_threads=config.io_threads,
            model_identity=config.model_identity,
            disk_group=config.disk_group,
        )


@dataclass
class _LoadRun:
    """One ``LoadJob`` in flight: its G2, G3 and G4 parts, each a handle with per-layer progress."""

    job: LoadJob
    host_handle: CopyHandle | None
    disk_load: DiskLoadHandle | None = None  # the G3 part (``DiskToDeviceLoader``)
    remote: RemoteFetch | None = None  # the G4 part (kvtier.vllm.remote_exec)

    def _parts(self) -> tuple[CopyHandle | None, ...]:
        g4 = self.remote.future if self.remote is not None else None
        return (self.host_handle, self.disk_load, g4)

    def done(self) -> bool:
        return all(h is None or h.done() for h in self._parts())

    def wait_layer(self, layer: int) -> None:
        for h in self._parts():
            if h is not None:
                h.wait_layer(layer)

    def stream_wait_layer(self, layer: int) -> None:
        """CUDA: the current stream waits for layer ``layer`` of the G2 part (no host wait); the
        G3 part is waited for on the host (disk reads end on the host)."""
        if self.disk_load is not None:
            self.disk_load.wait()
        if self.host_handle is not None and self.host_handle.error is None:
            from kvtier.transfer.cuda.handle import CudaCopyHandle

            assert isinstance(self.host_handle, CudaCopyHandle)
            self.host_handle.stream_wait_layer(layer)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every part; with a timeout, return early (unfinished) instead of raising."""
        for h in self._parts():
            if h is not None:
                try:
                    h.wait(timeout)
                except TimeoutError:
                    return

    def disk_failed(self) -> list[int]:
        """Wait (host) for the G3 part; the GPU blocks it did not load."""
        dl = self.disk_load
        if dl is None:
            return []
        dl.wait()
        return [d for d in self.job.disk_gpu_blocks if d in dl.failed]

    def bad_hashes(self) -> list[int]:
        """G3 blocks whose file was missing or bad (call once ``done()``)."""
        dl = self.disk_load
        pairs = zip(self.job.disk_hashes, self.job.disk_gpu_blocks, strict=True)
        return [] if dl is None else [h for h, d in pairs if d in dl.bad_files]

    def finish(self) -> tuple[list[int], list[int]]:
        """GPU blocks that did not load from (G2, G3) (call once ``done()``)."""
        host_failed: list[int] = []
        if self.host_handle is not None and self.host_handle.error is not None:
            host_failed = list(self.job.host_gpu_blocks)
        return host_failed, self.disk_failed()


class KvTierWorker:
    """Worker half (see the module docstring). Called from the model runner's thread."""

    def __init__(self, config: WorkerConfig) -> None:
        """Record the config only; ``register_kv_caches`` allocates and starts threads."""
        self.config = config
        self.layout: KvLayout | None = None
        self._device: DeviceStorage | None = None
        self._host: HostStorage | None = None
        self._disk: DiskStorage | None = None
        self._disk_io: DiskIo | None = None
        self._loader: DiskToDeviceLoader | None = None
        self._engine: TorchCopyEngine | None = None
        self._gpu: GpuDataPath | None = None
        self._landing: list[_LoadRun] = []  # CUDA: layer-wise loads whose copy may still run
        self._delayed: list[tuple[int, list[str]]] = []  # CUDA: (step, delayed-free requests)
        self._layer_index: dict[str, int] = {}
        self._plan: StepPlan | None = None
        self._sync_runs: list[_LoadRun] = []
        self._async_runs: list[_LoadRun] = []
        self._writes: list[tuple[int, Future[BlockHeader | None]]] = []
        self._load_errors: set[int] = set()
        self._report = WorkerReport(rank=config.rank)
        self.layer_waits = 0  # wait_for_layer_load calls that gated a layer-wise load
        self.remote: RemoteExecutor | None = None  # G4, attached by the connector when configured

    # -- life cycle ---------------------------------------------------------------------------

    def register_kv_caches(
        self,
        kv_caches: Mapping[str, torch.Tensor] | torch.Tensor,
        model: ModelConfig,
        *,
        backend: str = "",
    ) -> None:
        """Detect the layout of vLLM's KV tensors (one per layer, or vLLM 0.26's cross-layer
        tensor), allocate G2, open G3 and start threads."""
        layout = detect_layout(kv_caches, model, backend=backend)
        self.layout = layout
        if layout.kind is not LayoutKind.FULLY_CONTIGUOUS:
            self._layer_index = {name: i for i, name in enumerate(layout.layer_names)}
        self._device = DeviceStorage.wrap(kv_caches, layout)
        if self.config.host_blocks:
            self._host = HostStorage(self.config.host_blocks, layout.block_bytes)
            with torch.inference_mode(False):
                self._host.allocate()
        if self._device.device.type == "cuda":
            from kvtier.vllm.gpu_path import GpuDataPath

            self._gpu = GpuDataPath(self._device, self._host)
        else:
            self._engine = TorchCopyEngine()
            self._engine.start()
        restored: list[int] = []
        parents: list[int | None] = []
        if self.config.disk_blocks:
            assert self.config.disk_dir is not None
            ident = self.config.model_identity
            self._disk = DiskStorage(
                Path(self.config.disk_dir),
                ident.namespace(layout.fingerprint) if ident else layout.fingerprint,
                layout.block_bytes,
                o_direct=self.config.disk_o_direct,
                capacity=self.config.disk_blocks,
                group=self.config.disk_group,
                identity=ident.describe(layout.fingerprint) if ident else None,
            )
            found = self._disk.open()
            if self._disk.names_only:  # a large tier: the scheduler finds blocks by file name
                found = []
            self._report.disk_folder = str(self._disk.directory)
            restored = [s.header.sequence_hash for s in found]
            parents = [s.header.parent_hash for s in found]
            self._disk_io = DiskIo(self._disk, self.config.io_threads)
            self._disk_io.start()
            engine = self._gpu.engine if self._gpu is not None else self._engine
            assert engine is not None
            self._loader = DiskToDeviceLoader(
                self._disk_io, engine, pin_memory=self._gpu is not None
            )
            self._loader.start()
        if self._gpu is not None:
            self._gpu.start()
            self._report.host_pinned_rows = self._gpu.take_pinned()
        self._report.restored = restored
        self._report.restored_parents = parents

    def close(self) -> None:
        """Finish in-flight copies and disk writes (files end complete or absent); stop threads."""
        for run in self._sync_runs + self._async_runs + self._landing:
            run.wait()
        if self._gpu is not None:
            self._gpu.poll(self._report, self._queue_write, wait=True)
        if self.remote is not None:
            self.remote.close()
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        if self._disk_io is not None:
            self._disk_io.close()
            self._disk_io = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        if self._disk is not None:
            self._disk.close()

    # -- per step -----------------------------------------------------------------------------

    def bind(self, plan: StepPlan) -> None:
        self._plan = plan
        if self._gpu is not None:
            # Here, not in start_load_kv: vLLM 0.32 starts loads after launching the forward pass
            # when none is synchronous, too late to order the pass after the last store's read.
            self._gpu.gate_forward()

    def clear(self) -> None:
        self._plan = None

    def start_load_kv(self) -> None:
        """Apply G3 deletions, then start this step's loads."""
        plan = self._plan
        if plan is None:
            return
        if self._disk is not None:
            for h in plan.disk_deletes:
                self._disk.remove(h)
        for job in plan.loads:
            run = self._start_load(job)
            (self._async_runs if job.is_async else self._sync_runs).append(run)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until layer ``layer_name`` of every layer-wise load of this step has landed."""
        if not self._sync_runs:
            return
        last = self.layout.model.num_layers - 1 if self.layout is not None else 0
        # An unknown name (vLLM 0.26's cross-layer tensor has no per-layer names): wait for all.
        layer = self._layer_index.get(layer_name, last)
        self.layer_waits += 1
        for run in self._sync_runs:
            if self._gpu is not None:
                run.stream_wait_layer(layer)
            else:
                run.wait_layer(layer)

    def wait_for_save(self) -> None:
        """Finish layer-wise loads, copy this step's stores out, queue its G3 writes."""
        plan = self._plan
        if self._gpu is not None:
            self._wait_for_save_gpu(self._gpu, plan)
            return
        step_failed = False
        for run in self._sync_runs:
            run.wait()
            if self._finish_load(run):
                step_failed = True
        self._sync_runs = []
        if plan is None:
            return
        failed_hashes = self._store_host(plan, step_failed)
        self._queue_disk_writes(plan, step_failed, failed_hashes)
        if self.remote is not None and plan.remote_writes is not None:
            self.remote.write_behind(plan.remote_writes, self._host, failed_hashes)
        self._report.stores_read_step = plan.step

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose delayed-free stores are done, requests whose async loads are done)."""
        if self._plan is not None and self._plan.idle:
            self._idle_wait()
        if self._gpu is not None:
            return self._get_finished_gpu(self._gpu)
        recving: set[str] = set()
        still: list[_LoadRun] = []
        for run in self._async_runs:
            if run.done():
                self._finish_load(run)
                recving.add(run.job.req_id)
            else:
                still.append(run)
        self._async_runs = still
        self._collect_writes()
        # Stores read GPU memory synchronously inside ``wait_for_save``, so a request whose
        # blocks were kept for them is done as soon as the scheduler names it.
        sending = set(self._plan.delayed_free) if self._plan is not None else set()
        return (sending or None), (recving or None)

    def _collect_writes(self) -> None:
        """Report the G3 writes that finished."""
        pending: list[tuple[int, Future[BlockHeader | None]]] = []
        for h, fut in self._writes:
            if fut.done():
                err = fut.exception()
                if err is None:
                    self._report.disk_stored.append(h)
                else:
                    if self._disk is None or self._disk.writable:  # read-only: said at start
                        logger.warning("kvtier: G3 write of block %016x failed: %s", h, err)
                    self._report.disk_store_failed.append(h)
            else:
                pending.append((h, fut))
        self._writes = pending

    def _idle_wait(self) -> None:
        """An idle engine steps back to back while it waits for us; block a little instead of
        letting it spin, so the load and I/O threads get the GIL (it cut a G3 onboard in the
        async mode from about 200 ms to the raw read time)."""
        if any(run.done() for run in self._async_runs):
            return
        if self._async_runs:
            self._async_runs[0].wait(IDLE_WAIT_S)
        elif self._gpu is not None and self._gpu.runs:
            try:
                for h in self._gpu.runs[0].handles():
                    h.wait(IDLE_WAIT_S)
            except TimeoutError:
                pass
        elif self._writes:
            wait([f for _, f in self._writes], timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> WorkerReport | None:
        if self.remote is not None:
            self._report.remote = self.remote.take_report()
        report, self._report = self._report, WorkerReport(rank=self.config.rank)
        return None if report.is_empty else report

    @property
    def num_inflight(self) -> int:
        n = len(self._async_runs) + len(self._writes) + len(self._sync_runs) + len(self._landing)
        return n + (len(self._gpu.runs) if self._gpu is not None else 0)

    # -- internals ----------------------------------------------------------------------------

    def _start_load(self, job: LoadJob) -> _LoadRun:
        if job.host_slots and self._host is None:
            raise RuntimeError("kvtier: a G2 load was planned but this worker has no G2")
        if job.disk_hashes and self._loader is None:
            raise RuntimeError("kvtier: a G3 load was planned but this worker has no G3")
        assert self._device is not None
        if self._gpu is not None:
            host = None
            if job.host_slots:
                host = self._gpu.load_host(
                    job.host_slots, job.host_gpu_blocks, layerwise=not job.is_async
                )
            gpu_run = _LoadRun(job, host)
            if job.disk_hashes:
                assert self._loader is not None
                gpu_run.disk_load = self._gpu.load_disk(
                    self._loader, job.disk_hashes, job.disk_gpu_blocks
                )
            return gpu_run
        assert self._engine is not None
        host_handle: CopyHandle | None = None
        if job.host_slots:
            assert self._host is not None
            host_handle = self._engine.host_to_device(
                self._host, self._device, job.host_slots, job.host_gpu_blocks
            )
        run = _LoadRun(job, host_handle)
        if job.remote is not None and job.remote.hashes:
            if self.remote is None:
                raise RuntimeError("kvtier: a G4 load was planned but this worker has no G4")
            run.remote = self.remote.fetch(job.remote, self._engine, self._device, self._host)
        if job.disk_hashes:
            assert self._loader is not None
            run.disk_load = self._loader.load(self._device, job.disk_hashes, job.disk_gpu_blocks)
        return run

    def _finish_load(self, run: _LoadRun) -> bool:
        """Record a finished load's outcome; True if any of its blocks failed."""
        host_failed, disk_failed = run.finish()
        self._load_errors.update(host_failed)
        self._load_errors.update(disk_failed)
        remote_failed: list[int] = []
        if run.remote is not None:  # G4 (counted in its RemoteReport); fetched blocks land in G2
            remote_failed = run.remote.failed_gpu_blocks
            self._load_errors.update(remote_failed)
            self._report.host_stored.extend(run.remote.host_stored)
            self._report.host_store_failed.extend(run.remote.host_failed)
        self._report.loads_done.append(run.job.job_id)
        self._report.disk_bad.extend(run.bad_hashes())
        self._report.host_load_failed += len(host_failed)
        self._report.disk_load_failed += len(disk_failed)
        return bool(host_failed or disk_failed or remote_failed)

    def _store_host(self, plan: StepPlan, step_failed: bool) -> set[int]:
        """Copy this step's G2 stores out of the GPU and wait; returns the hashes that failed."""
        batch = plan.stores
        if not batch.gpu_blocks:
            return set()
        if step_failed or self._host is None or self._engine is None or self._device is None:
            self._report.host_store_failed.extend(batch.hashes)
            return set(batch.hashes)
        # In this thread: the copy is waited for here anyway, and a hand-off to the copy thread
        # and back cost more than the memcpy of a decode step's few blocks.
        try:
            check_ids(self._device, self._host, batch.gpu_blocks, batch.host_slots)
            copy_batch(True, self._device, self._host, batch.gpu_blocks, batch.host_slots)
        except Exception as exc:
            logger.warning("kvtier: G2 store of step %d failed: %s", plan.step, exc)
            self._report.host_store_failed.extend(batch.hashes)
            return set(batch.hashes)
        self._report.host_stored.extend(batch.hashes)
        return set()

    def _queue_disk_writes(self, plan: StepPlan, step_failed: bool, failed: set[int]) -> None:
        if not plan.disk_writes:
            return
        io = self._disk_io
        from_gpu = [w for w in plan.disk_writes if w.gpu_block >= 0]
        staging: HostStorage | None = None
        gpu_ok = False
        if from_gpu and io is not None and not step_failed:
            assert self._engine is not None and self._device is not None
            gpu_blocks = [w.gpu_block for w in from_gpu]
            staging, handle = stage_blocks(self._engine, self._device, gpu_blocks)
            err = handle.wait()
            gpu_ok = err is None
            if err is not None:
                logger.warning("kvtier: staging copy for G3 writes failed: %s", err)
        gpu_row = {w.seq_hash: i for i, w in enumerate(from_gpu)}
        for w in plan.disk_writes:
            row: torch.Tensor | None = None
            if io is None:
                row = None
            elif w.host_slot >= 0:
                if w.seq_hash not in failed and self._host is not None:
                    row = self._host.row(w.host_slot)
            elif gpu_ok and staging is not None:
                row = staging.row(gpu_row[w.seq_hash])
            self._queue_write(w, row)

    def _queue_write(self, w: DiskWrite, row: torch.Tensor | None) -> None:
        """Queue one G3 write from ``row`` (None: its source copy failed, report it failed)."""
        io = self._disk_io
        if row is None or io is None:
            logger.warning(
                "kvtier: G3 write of block %016x skipped: its source copy failed", w.seq_hash
            )
            self._report.disk_store_failed.append(w.seq_hash)
            return
        (fut,) = io.write([w.seq_hash], [row], [w.parent_hash], [0])
        self._writes.append((w.seq_hash, fut))

    # -- CUDA ---------------------------------------------------------------------------------

    def _wait_for_save_gpu(self, gpu: GpuDataPath, plan: StepPlan | None) -> None:
        """Layer-wise loads: failures are known now (a refused copy, a bad G3 block), the copies
        themselves land on the GPU's own time; stores: issued behind an event, not awaited."""
        step_failed = False
        for run in self._sync_runs:
            failed = bool(run.disk_failed()) or (
                run.host_handle is not None and run.host_handle.error is not None
            )
            if failed or run.done():
                step_failed = self._finish_load(run) or step_failed
            else:
                self._landing.append(run)
        self._sync_runs = []
        if plan is None:
            return
        gpu.store(plan, step_failed)  # a failed step's stores are reported failed by poll
        gpu.planned(plan.step)
        gpu.poll(self._report, self._queue_write)
        self._report.stores_read_step = gpu.released_through

    def _get_finished_gpu(self, gpu: GpuDataPath) -> tuple[set[str] | None, set[str] | None]:
        plan = self._plan
        if plan is not None:
            gpu.planned(plan.step - 1)
            if plan.delayed_free:
                self._delayed.append((plan.step, list(plan.delayed_free)))
        gpu.poll(self._report, self._queue_write)
        self._report.stores_read_step = max(self._report.stores_read_step, gpu.released_through)
        pinned = gpu.take_pinned()
        if pinned >= 0:
            self._report.host_pinned_rows = pinned
        recving: set[str] = set()
        still: list[_LoadRun] = []
        for run in self._async_runs:
            if run.done():
                self._finish_load(run)
                recving.add(run.job.req_id)
            else:
                still.append(run)
        self._async_runs = still
        landing: list[_LoadRun] = []
        for run in self._landing:
            if run.done():
                self._finish_load(run)
            else:
                landing.append(run)
        self._landing = landing
        self._collect_writes()
        # A delayed request of step s finished before s: its stores are of steps < s.
        sending: set[str] = set()
        waiting: list[tuple[int, list[str]]] = []
        for step, ids in self._delayed:
            if gpu.released_through >= step - 1:
                sending.update(ids)
            else:
                waiting.append((step, ids))
        self._delayed = waiting
        return (sending or None), (recving or None)
