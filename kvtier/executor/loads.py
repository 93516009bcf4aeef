"""Running one planned load (``LoadJob``) on a rank's data plane: its G2, G3 and G4 parts.

Why this exists: a load's parts land on their own threads (G2 rows through the copy engine, G3
files through the one disk -> device loader, G4 values through ``RemoteExecutor``); CPU and CUDA
differ only in the G2 part's engine and the gate every copy waits on. ``LoadRun`` waits for the
parts (per layer, on the host or a CUDA stream) and records every block that did not land as a
load error (vLLM recomputes it), never served.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.executor.jobs import LoadJob, WorkerReport
from kvtier.executor.plane import RankDataPlane
from kvtier.executor.remote import RemoteExecutor, RemoteFetch
from kvtier.transfer.copy_api import CopyEngine, CopyHandle
from kvtier.transfer.disk_load import DiskLoadHandle

__all__ = ["LoadRun", "start_load"]


@dataclass
class LoadRun:
    """One ``LoadJob`` in flight: its G2, G3 and G4 parts, each a handle with per-layer progress."""

    job: LoadJob
    host_handle: CopyHandle | None = None
    disk_load: DiskLoadHandle | None = None  # the G3 part (``DiskToDeviceLoader``)
    remote: RemoteFetch | None = None  # the G4 part (kvtier.executor.remote)

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
        G3 and G4 parts are waited for on the host (disk reads and G4 fetches end there)."""
        if self.disk_load is not None:
            self.disk_load.wait()
        if self.remote is not None:
            self.remote.future.wait()
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

    def _failed(self) -> tuple[list[int], list[int], list[int]]:
        """GPU blocks that did not land from (G2, G3, G4); waits (host) for the G3 and G4 parts
        (a G2 failure is a refused copy, known at once)."""
        job, dl, g4 = self.job, self.disk_load, self.remote
        if dl is not None:
            dl.wait()
        if g4 is not None:
            g4.future.wait()
        host = self.host_handle is not None and self.host_handle.error is not None
        disk = [d for d in job.disk_gpu_blocks if dl is not None and d in dl.failed]
        remote = g4.failed_gpu_blocks if g4 is not None else []
        return (list(job.host_gpu_blocks) if host else []), disk, remote

    def failed_now(self) -> bool:
        return any(self._failed())

    def record(self, report: WorkerReport, load_errors: set[int]) -> bool:
        """Record a finished load's outcome (call once ``done()``); True if any block failed."""
        host_failed, disk_failed, remote_failed = self._failed()
        job, dl = self.job, self.disk_load
        if dl is not None:
            pairs = zip(job.disk_hashes, job.disk_gpu_blocks, strict=True)
            report.disk_bad.extend(h for h, d in pairs if d in dl.bad_files)
        if self.remote is not None:  # G4 (counted in its RemoteReport); fetched blocks land in G2
            report.host_stored.extend(self.remote.host_stored)
            report.host_store_failed.extend(self.remote.host_failed)
        load_errors.update(host_failed, disk_failed, remote_failed)
        report.loads_done.append(job.job_id)
        report.host_load_failed += len(host_failed)
        report.disk_load_failed += len(disk_failed)
        return bool(host_failed or disk_failed or remote_failed)


def start_load(
    plane: RankDataPlane,
    job: LoadJob,
    remote: RemoteExecutor | None,
    *,
    host_engine: CopyEngine,
    gate: object | None = None,
) -> LoadRun:
    """Start every part of ``job`` (G2 on ``host_engine``, G3 on the plane's loader, G4 on
    ``remote``), each copy ordered after ``gate``. A part planned for a tier this rank lacks is
    refused: the plans of both halves come from one configuration, so that is a bug."""
    if job.host_slots and plane.host is None:
        raise RuntimeError("kvtier: a G2 load was planned but this worker has no G2")
    if job.disk_hashes and plane.loader is None:
        raise RuntimeError("kvtier: a G3 load was planned but this worker has no G3")
    g4 = job.remote is not None and bool(job.remote.hashes)
    if g4 and remote is None:
        raise RuntimeError("kvtier: a G4 load was planned but this worker has no G4")
    run = LoadRun(job)
    if job.host_slots:
        assert plane.host is not None
        run.host_handle = host_engine.host_to_device(
            plane.host, plane.device, job.host_slots, job.host_gpu_blocks, gate
        )
    if g4:
        assert remote is not None and job.remote is not None
        run.remote = remote.fetch(job.remote, plane, gate)
    if job.disk_hashes:
        assert plane.loader is not None
        run.disk_load = plane.loader.load(plane.device, job.disk_hashes, job.disk_gpu_blocks, gate)
    return run
