"""The worker half of the connector: moves bytes exactly as the scheduler half planned.

Why this exists: the worker owns the data (vLLM's KV tensors, the G2 host rows, the G3 files) but
decides nothing; it executes each step's ``StepPlan`` on the rank's ``RankDataPlane`` (loads with
``start_load``, stores with ``store_host`` and ``DiskWrites``: ``kvtier.executor``) and reports
back what landed and what failed.

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
asynchronous stores (the scheduler half keeps a finished request's blocks until ``get_finished``
names it); the rules above hold with "wait" meaning a CUDA stream wait.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.config import KvTierConfig, ModelConfig
from kvtier.executor.jobs import LoadJob, StepPlan, WorkerReport
from kvtier.executor.loads import LoadRun, start_load
from kvtier.executor.plane import DataPlaneConfig, RankDataPlane
from kvtier.executor.remote import RemoteExecutor
from kvtier.executor.stores import DiskWrites, store_host
from kvtier.storage.layout import KvLayout, LayoutKind, detect_layout
from kvtier.storage.remote_block import remote_namespace
from kvtier.transfer.cuda.config import CudaCopyConfig

if TYPE_CHECKING:
    from kvtier.vllm.gpu_path import GpuDataPath

__all__ = ["KvTierWorker", "WorkerConfig", "attach_remote"]

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005
"""Longest a worker blocks in an idle step (no forward pass) waiting for background work."""

STORE_COPY = CudaCopyConfig(staging_bytes=512 << 20, gather_programs=32)
"""The worker's CUDA engine for stores, asynchronous loads, G3 and G4: 256 MiB staging slots; a
gather grid of 32 programs leaves most SMs to the model while still far outrunning PCIe."""


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(DataPlaneConfig):
    """What one worker needs: its rank's data plane (``DataPlaneConfig.from_config`` derives it
    from the root), on CUDA with the worker's store engine."""

    cuda_copy: CudaCopyConfig = STORE_COPY


class KvTierWorker:
    """Worker half (see the module docstring). Called from the model runner's thread."""

    def __init__(self, config: WorkerConfig) -> None:
        """Record the config only; ``register_kv_caches`` opens the data plane."""
        self.config = config
        self.plane = RankDataPlane(config)
        self.layout: KvLayout | None = None
        self._gpu: GpuDataPath | None = None
        self._landing: list[LoadRun] = []  # CUDA: layer-wise loads whose copy may still run
        self._delayed: list[tuple[int, list[str]]] = []  # CUDA: (step, delayed-free requests)
        self._layer_index: dict[str, int] = {}
        self._plan: StepPlan | None = None
        self._sync_runs: list[LoadRun] = []
        self._async_runs: list[LoadRun] = []
        self._writes = DiskWrites(self.plane)
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
        tensor), open the data plane (G2, G3, threads) and report G3's index."""
        layout = detect_layout(kv_caches, model, backend=backend)
        self.layout = layout
        if layout.kind is not LayoutKind.FULLY_CONTIGUOUS:
            self._layer_index = {name: i for i, name in enumerate(layout.layer_names)}
        plane = self.plane
        plane.open(layout, kv_caches)
        if plane.on_cuda:
            from kvtier.vllm.gpu_path import GpuDataPath

            self._gpu = GpuDataPath(plane)
            self._gpu.start()
            self._report.host_pinned_rows = self._gpu.take_pinned()
        if plane.disk is not None:  # a large tier lists nothing: found by file name
            self._report.disk_folder = str(plane.disk.directory)
        self._report.restored = [s.sequence_hash for s in plane.found]
        self._report.restored_parents = [s.parent_hash for s in plane.found]

    def close(self) -> None:
        """Finish in-flight copies and disk writes (files end complete or absent); stop threads."""
        for run in self._sync_runs + self._async_runs + self._landing:
            run.wait()
        if self._gpu is not None:
            self._gpu.poll(self._report, self._writes, self.remote, wait=True)
        if self.remote is not None:
            self.remote.close()
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        self.plane.close()

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
        if self.plane.disk is not None:
            for h in plan.disk_deletes:
                self.plane.disk.remove(h)
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
        """Finish layer-wise loads, copy this step's stores out, queue its G3 writes. On CUDA a
        load's failures are known now (a refused copy, a bad G3 block, a G4 miss) while its
        copies land on the GPU's own time, and stores are issued behind an event, not awaited."""
        plan, gpu = self._plan, self._gpu
        step_failed = False
        for run in self._sync_runs:
            if gpu is None:
                run.wait()
            if run.failed_now() or run.done():
                step_failed = run.record(self._report, self._load_errors) or step_failed
            else:
                self._landing.append(run)
        self._sync_runs = []
        if plan is None:
            return
        if gpu is not None:
            gpu.store(plan, step_failed)  # a failed step's stores are reported failed by poll
            gpu.planned(plan.step)
            gpu.poll(self._report, self._writes, self.remote)
            self._report.stores_read_step = gpu.released_through
            return
        failed_hashes = store_host(self.plane, plan, step_failed, self._report)
        self._writes.queue_from_step(plan, step_failed, failed_hashes, self._report)
        if self.remote is not None and plan.remote_writes is not None:
            self.remote.write_behind(plan.remote_writes, self.plane.host, failed_hashes)
        self._report.stores_read_step = plan.step

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose delayed-free stores are done, requests whose async loads are done)."""
        if self._plan is not None and self._plan.idle:
            self._idle_wait()
        if self._gpu is not None:
            return self._get_finished_gpu(self._gpu)
        self._async_runs, recving = self._record_done(self._async_runs)
        self._writes.collect(self._report)
        # Stores read GPU memory synchronously inside ``wait_for_save``, so a request whose
        # blocks were kept for them is done as soon as the scheduler names it.
        sending = set(self._plan.delayed_free) if self._plan is not None else set()
        return (sending or None), (recving or None)

    def _record_done(self, runs: list[LoadRun]) -> tuple[list[LoadRun], set[str]]:
        """Record the loads of ``runs`` that finished: (the others, the finished ones' requests)."""
        still: list[LoadRun] = []
        done: set[str] = set()
        for run in runs:
            if run.done():
                run.record(self._report, self._load_errors)
                done.add(run.job.req_id)
            else:
                still.append(run)
        return still, done

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
        else:
            self._writes.wait_any(IDLE_WAIT_S)

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

    def _start_load(self, job: LoadJob) -> LoadRun:
        """Every part of ``job``; on CUDA behind the last store's gather, G2 layer-wise on the
        kernel engine when the load runs inside the forward pass."""
        gpu = self._gpu
        if gpu is None:
            return start_load(self.plane, job, self.remote, host_engine=self.plane.engine)
        engine = gpu.load_engine(layerwise=not job.is_async)
        return start_load(self.plane, job, self.remote, host_engine=engine, gate=gpu.gate())

    # -- CUDA ---------------------------------------------------------------------------------

    def _get_finished_gpu(self, gpu: GpuDataPath) -> tuple[set[str] | None, set[str] | None]:
        plan = self._plan
        if plan is not None:
            gpu.planned(plan.step - 1)
            if plan.delayed_free:
                self._delayed.append((plan.step, list(plan.delayed_free)))
        gpu.poll(self._report, self._writes, self.remote)
        self._report.stores_read_step = max(self._report.stores_read_step, gpu.released_through)
        pinned = gpu.take_pinned()
        if pinned >= 0:
            self._report.host_pinned_rows = pinned
        self._async_runs, recving = self._record_done(self._async_runs)
        self._landing, _ = self._record_done(self._landing)
        self._writes.collect(self._report)
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


def attach_remote(worker: KvTierWorker, config: KvTierConfig) -> RemoteExecutor:
    """Start a G4 executor for a worker whose KV tensors are registered, and attach it (its
    namespace: this model's identity, the detected layout's fingerprint, this rank)."""
    if worker.layout is None:
        raise RuntimeError("kvtier: G4 needs the worker's KV layout (register_kv_caches first)")
    if config.remote is None:
        raise ValueError("kvtier: attach_remote needs a configuration with a G4 tier (remote)")
    layout, identity = worker.layout, worker.plane.namespace  # G3's key space
    executor = RemoteExecutor(
        config.remote,
        remote_namespace(identity, layout.fingerprint, config.rank, config.num_workers),
        layout.fingerprint,
        layout.block_bytes,
        max_write_queue_bytes=config.remote_write_queue_bytes,
    ).start()
    worker.remote = executor
    return executor
