"""Running one step's planned stores on a rank's data plane: G1 -> G2 rows, and G3 writes.

Why this exists: a store reads GPU blocks that vLLM may reuse after the step, so its copy out of
the device must land within the step (the CPU path waits for it here; the CUDA path issues it
behind an event, ``kvtier.vllm.gpu_path``). G3 writes are queued from a landed G2 row, or from
staging rows filled by the one device -> disk stager (``kvtier.transfer.disk_io``), and run
on the plane's ``DiskIo`` threads; ``DiskWrites`` follows them and reports each once it is done.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch

from kvtier.executor.jobs import DiskWrite, StepPlan, WorkerReport
from kvtier.executor.plane import RankDataPlane
from kvtier.storage.block_file import BlockHeader
from kvtier.storage.host import HostStorage
from kvtier.transfer.batch_copy import copy_batch
from kvtier.transfer.copy_api import check_ids
from kvtier.transfer.disk_io import stage_blocks

__all__ = ["DiskWrites", "store_host"]

logger = logging.getLogger(__name__)


class DiskWrites:
    """The G3 writes in flight on the plane's ``DiskIo`` threads, reported as they finish."""

    def __init__(self, plane: RankDataPlane) -> None:
        self.plane = plane
        self._writes: list[tuple[int, Future[BlockHeader | None]]] = []

    def __len__(self) -> int:
        return len(self._writes)

    def queue(
        self,
        writes: list[DiskWrite],
        failed: set[int],
        staging: HostStorage | None,
        report: WorkerReport,
    ) -> None:
        """Queue a step's writes: each from its G2 row unless its store ``failed``, or from its
        ``staging`` row (row i: the step's i-th write from the GPU; None: that copy failed). A
        write whose source copy failed is reported failed."""
        host, io, gpu_row = self.plane.host, self.plane.disk_io, 0
        for w in writes:
            row: torch.Tensor | None = None
            if w.host_slot >= 0:
                if w.seq_hash not in failed and host is not None:
                    row = host.row(w.host_slot)
            else:
                if staging is not None:
                    row = staging.row(gpu_row)
                gpu_row += 1
            if row is None or io is None:
                logger.warning("kvtier: G3 write of %016x skipped: source copy failed", w.seq_hash)
                report.disk_store_failed.append(w.seq_hash)
                continue
            (fut,) = io.write([w.seq_hash], [row], [w.parent_hash], [0])
            self._writes.append((w.seq_hash, fut))

    def queue_from_step(
        self, plan: StepPlan, step_failed: bool, failed: set[int], report: WorkerReport
    ) -> None:
        """CPU: queue a step's G3 writes, the ones from the device copied into staging rows
        first (and waited for)."""
        plane, staging = self.plane, None
        from_gpu = [w.gpu_block for w in plan.disk_writes if w.gpu_block >= 0]
        if from_gpu and plane.disk_io is not None and not step_failed:
            rows, handle = stage_blocks(plane.engine, plane.device, from_gpu)
            err = handle.wait()
            if err is None:
                staging = rows
            else:
                logger.warning("kvtier: staging copy for G3 writes failed: %s", err)
        self.queue(plan.disk_writes, failed, staging, report)

    def collect(self, report: WorkerReport) -> None:
        """Report the writes that finished."""
        disk = self.plane.disk
        pending: list[tuple[int, Future[BlockHeader | None]]] = []
        for h, fut in self._writes:
            if not fut.done():
                pending.append((h, fut))
                continue
            err = fut.exception()
            if err is None:
                report.disk_stored.append(h)
            else:
                if disk is None or disk.writable:  # read-only: said at start
                    logger.warning("kvtier: G3 write of block %016x failed: %s", h, err)
                report.disk_store_failed.append(h)
        self._writes = pending

    def wait_any(self, timeout: float) -> None:
        """Block up to ``timeout`` s for one write to finish."""
        if self._writes:
            wait([f for _, f in self._writes], timeout=timeout, return_when=FIRST_COMPLETED)


def store_host(
    plane: RankDataPlane, plan: StepPlan, step_failed: bool, report: WorkerReport
) -> set[int]:
    """CPU: copy this step's G2 stores out of the device now; returns the hashes that failed."""
    batch = plan.stores
    if not batch.gpu_blocks:
        return set()
    host = plane.host
    if step_failed or host is None:
        report.host_store_failed.extend(batch.hashes)
        return set(batch.hashes)
    # In this thread: the copy is waited for here anyway, and a hand-off to the copy thread
    # and back cost more than the memcpy of a decode step's few blocks.
    try:
        check_ids(plane.device, host, batch.gpu_blocks, batch.host_slots)
        copy_batch(True, plane.device, host, batch.gpu_blocks, batch.host_slots)
    except Exception as exc:
        logger.warning("kvtier: G2 store of step %d failed: %s", plan.step, exc)
        report.host_store_failed.extend(batch.hashes)
        return set(batch.hashes)
    report.host_stored.extend(batch.hashes)
    return set()
