"""The worker's data path on a CUDA GPU: pinned G2, asynchronous stores, GPU-side gating.

Why a file of its own: on a GPU the worker must never hold the forward pass up, so every copy is
issued on the ``CudaCopyEngine``'s own streams and ordered against the model with CUDA events
instead of host waits. ``KvTierWorker`` keeps its CPU path (synchronous torch copies) and hands
the GPU work to ``GpuDataPath``.

Ordering (every rule is a GPU-side event wait unless said otherwise):

- G2 is pageable memory page-locked in chunks by a ``ChunkedPinner`` after start-up; only rows
  below ``pinned_rows`` are used (the scheduler half plans slots below the count the workers
  report; the engine refuses any other row, so a store planned too early fails, never copies
  pageable memory).
- A step's stores: ``wait_for_save`` records an event on the model's stream after the forward
  pass; the device->host copy waits on it on its own stream, and ``wait_for_save`` returns at
  once. Their G3 writes and G4 write-behind are queued (``poll``) only once the copy landed, in
  step order.
- Reuse of a stored GPU block: the next step's forward pass (``gate_forward``, called when the
  step's plan is bound: before the pass in every vLLM version) and every load (the ``gate`` of
  the host->device copies) wait for the last store's *gather* (``released_event``), so neither a
  preempted request's freed blocks nor a load into them can overwrite a block before it was
  read. A finished request's blocks are also held by vLLM (delayed free) until
  ``released_through`` covers its stores.
- Loads run on the engine's highest-priority streams, behind ``gate()``; a layer-wise load's layer
  ``l`` is waited for with ``stream_wait_layer`` (GPU side). G3 loads go through the
  ``DiskToDeviceLoader``'s pinned bounce rows and G4 loads through pinned staging rows; their
  completion is known on the host only (disk reads, G4 fetches).

The rank's storages, store engine (``STORE_COPY``), pinner and loader are the data plane's
(``kvtier.executor.plane.RankDataPlane``); this path adds the layer-wise engine and the ordering.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvtier.executor.jobs import DiskWrite, RemoteWrites, StepPlan, WorkerReport
from kvtier.executor.plane import RankDataPlane
from kvtier.executor.remote import RemoteExecutor
from kvtier.executor.stores import DiskWrites
from kvtier.storage.host import HostStorage
from kvtier.transfer.copy_api import CopyEngine, CopyHandle
from kvtier.transfer.cuda.config import CudaCopyConfig
from kvtier.transfer.cuda.engine import CudaCopyEngine
from kvtier.transfer.cuda.events import new_event
from kvtier.transfer.cuda.handle import CudaCopyHandle
from kvtier.transfer.cuda.plan import triton_available
from kvtier.transfer.disk_io import stage_blocks

__all__ = ["GpuDataPath", "StoreRun"]

logger = logging.getLogger(__name__)

LAYERWISE_LOAD = CudaCopyConfig(mode="kernel", kernel_programs=32)
"""The engine for layer-wise G2 loads: a small-grid kernel reading the mapped pinned rows lands
the layers one by one (each with its own event), so layer l's attention starts while later
layers still cross PCIe; the DMA path lands every layer at the end."""


@dataclass
class StoreRun:
    """One step's stores in flight: the G2 copy, and a staging copy for G3 writes from the GPU."""

    step: int
    hashes: list[int]
    host: CudaCopyHandle | None
    writes: list[DiskWrite]
    staging: HostStorage | None = None
    staging_copy: CudaCopyHandle | None = None
    failed: set[int] = field(default_factory=set)
    """Hashes whose G2 store failed before anything was issued (the step's load failed)."""
    remote_writes: RemoteWrites | None = None
    """The step's landed G2 stores to write behind to G4."""

    def handles(self) -> list[CudaCopyHandle]:
        return [h for h in (self.host, self.staging_copy) if h is not None]

    def done(self) -> bool:
        return all(h.done() for h in self.handles())

    def released(self) -> bool:
        return all(h.source_released() for h in self.handles())


def _cuda(handle: CopyHandle) -> CudaCopyHandle:
    assert isinstance(handle, CudaCopyHandle)
    return handle


class GpuDataPath:
    """The CUDA half of ``KvTierWorker`` (see the module docstring). Model-runner thread only."""

    def __init__(self, plane: RankDataPlane) -> None:
        """On an open ``plane`` whose engine is the CUDA engine."""
        engine = plane.engine
        assert isinstance(engine, CudaCopyEngine)
        self.plane = plane
        self.device = plane.device
        self.host = plane.host
        self.engine = engine
        self.layer_engine = CudaCopyEngine(LAYERWISE_LOAD, device=self.device.device)
        self.runs: list[StoreRun] = []
        self._last_d2h: CudaCopyHandle | None = None
        self._reported_pinned = -1
        self._planned_through = -1
        self.released_through = -1
        """Every store planned up to this step has read its GPU blocks."""

    def start(self) -> None:
        """The layer-wise engine, on the plane's pinned G2 (the store engine is the plane's)."""
        pinner = self.plane.pinner
        kernel = self.layer_engine.config.mode == "kernel" and triton_available()
        if self.host is not None and pinner is not None and kernel:
            self.layer_engine.start()
            self.layer_engine.attach_pinner(self.host, pinner)

    def close(self) -> None:
        """Stop the layer-wise engine (``poll(wait=True)`` first; the plane closes the rest)."""
        self.layer_engine.close()

    # -- gating -------------------------------------------------------------------------------

    def gate(self) -> torch.cuda.Event | None:
        """What a copy into GPU blocks waits for: the last store's gather (None: nothing)."""
        last = self._last_d2h
        if last is None or last.source_released():
            return None
        return last.released_event

    def gate_forward(self) -> None:
        """Make the model's stream wait until the last store gathered its blocks (GPU side)."""
        ev = self.gate()
        if ev is not None:
            torch.cuda.current_stream(self.device.device).wait_event(ev)

    def load_engine(self, layerwise: bool) -> CopyEngine:
        """The engine of G2 -> GPU loads; ``layerwise`` (a load inside the forward pass) lands
        layer by layer on the kernel engine when it runs."""
        return self.layer_engine if layerwise and self.layer_engine.started else self.engine

    # -- stores -------------------------------------------------------------------------------

    def store(self, plan: StepPlan, step_failed: bool) -> None:
        """Issue this step's stores behind an event after the forward pass; return at once."""
        batch = plan.stores
        from_gpu = [w for w in plan.disk_writes if w.gpu_block >= 0]
        if not batch.gpu_blocks and not plan.disk_writes:
            return
        with torch.cuda.device(self.device.device):
            after_forward = new_event()
            after_forward.record(torch.cuda.current_stream())
        run = StoreRun(plan.step, list(batch.hashes), None, list(plan.disk_writes))
        run.remote_writes = plan.remote_writes
        if batch.gpu_blocks:
            if step_failed or self.host is None:
                run.failed.update(batch.hashes)
            else:
                copy = self.engine.device_to_host(
                    self.device, self.host, batch.gpu_blocks, batch.host_slots, after_forward
                )
                run.host = self._last_d2h = _cuda(copy)
        if from_gpu and not step_failed:
            blocks = [w.gpu_block for w in from_gpu]
            run.staging, copy = stage_blocks(
                self.engine, self.device, blocks, after_forward, pin_memory=True
            )
            run.staging_copy = self._last_d2h = _cuda(copy)
        self.runs.append(run)

    def poll(
        self,
        report: WorkerReport,
        writes: DiskWrites,
        remote: RemoteExecutor | None,
        *,
        wait: bool = False,
    ) -> None:
        """Report stores that landed, queue their G3 and G4 writes (in step order), advance
        ``released_through``; ``wait``: block until every run landed (shutdown)."""
        while self.runs:
            run = self.runs[0]
            if wait:
                for h in run.handles():
                    h.wait()
            if not run.done():
                break
            self.runs.pop(0)
            self._finish(run, report, writes, remote)
        released = self.released_through
        for run in self.runs:
            if not run.released():
                break
            released = run.step
        else:
            released = max(released, self._planned_through)
        self.released_through = max(self.released_through, released)

    def planned(self, step: int) -> None:
        """Step ``step``'s stores (if any) were issued: with none in flight, all are released."""
        self._planned_through = max(self._planned_through, step)
        if not self.runs:
            self.released_through = max(self.released_through, step)

    def _finish(
        self, run: StoreRun, report: WorkerReport, writes: DiskWrites, g4: RemoteExecutor | None
    ) -> None:
        failed = set(run.failed)
        if run.host is not None and run.host.error is not None:
            logger.warning("kvtier: G2 store of step %d failed: %s", run.step, run.host.error)
            failed.update(run.hashes)
        if failed:
            report.host_store_failed.extend(h for h in run.hashes if h in failed)
        report.host_stored.extend(h for h in run.hashes if h not in failed)
        staging_ok = run.staging_copy is not None and run.staging_copy.error is None
        writes.queue(run.writes, failed, run.staging if staging_ok else None, report)
        if g4 is not None:
            g4.write_behind(run.remote_writes, self.host, failed)

    def take_pinned(self) -> int:
        """The pinned-row count when it changed since the last call, else -1."""
        pinner = self.plane.pinner
        if pinner is None:
            return -1
        n = pinner.pinned_rows
        if n == self._reported_pinned:
            return -1
        self._reported_pinned = n
        return n
