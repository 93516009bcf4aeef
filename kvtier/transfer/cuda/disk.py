"""Disk -> device through pinned bounce rows, double-buffered: read group k+1 while k crosses PCIe.

Why this exists: a disk onboard is bounded by the disk (about 2 GB/s on the lent machine, against
55 GB/s of PCIe), so the copy to the device must hide entirely behind the reads. Blocks are read
and verified (header, fingerprint, checksum: ``DiskStorage.read``) by a pool of I/O threads into
one of two slots of page-locked rows; as soon as a slot is complete its blocks go to the device
through the ``CudaCopyEngine`` while the other slot fills. A block that fails to read is reported
in the handle's ``failed`` map (the connector turns it into a load error, so vLLM recomputes it);
it is never copied to the device.

A load that fails partway (a copy that cannot be issued, say) still ends cleanly: before its
handle completes, and so before the next load may reuse the bounce rows, every read it started has
finished or been cancelled and every copy it issued has completed. Otherwise a late read of the
failed load could overwrite rows the next load already filled, and wrong bytes would reach the
device.

GPUDirect Storage (kvikio) is not used: the lent machine has no GDS (kvikio runs in compatibility
mode there at 1.9 GB/s, below plain O_DIRECT reads), and reading straight into device memory would
skip the host-side checksum that keeps a corrupt file from being served.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage
from kvtier.transfer.engine import CopyEngine, CopyHandle

__all__ = ["DiskLoadConfig", "DiskLoadHandle", "DiskToDeviceLoader"]


@dataclass(frozen=True)
class DiskLoadConfig:
    """``group_blocks`` blocks per bounce slot (two slots); ``io_threads`` reads in flight."""

    group_blocks: int = 16
    io_threads: int = 8

    def __post_init__(self) -> None:
        for name in ("group_blocks", "io_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass
class DiskLoadHandle:
    """Completion of one disk -> device load. ``failed`` maps device block id -> reason."""

    device_ids: tuple[int, ...]
    failed: dict[int, str] = field(default_factory=dict)
    _done: threading.Event = field(default_factory=threading.Event)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict[int, str]:
        """Block until every block landed or failed; return ``failed``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"disk load not finished after {timeout} s")
        return self.failed

    @property
    def loaded(self) -> tuple[int, ...]:
        """Device block ids whose bytes landed exactly (valid once ``done()``)."""
        return tuple(d for d in self.device_ids if d not in self.failed)


@dataclass
class _Job:
    device: DeviceStorage
    hashes: tuple[int, ...]
    device_ids: tuple[int, ...]
    handle: DiskLoadHandle
    gate: object | None = None
    """Passed to every host->device copy of the job (e.g. an event after pending reads of the
    target blocks)."""
    landed: set[int] = field(default_factory=set)
    """Device ids whose copy completed without error (kept when the job fails later)."""


_Copy = tuple[CopyHandle, tuple[int, ...]]
"""A host -> device copy of one bounce slot and the device ids it writes."""


class DiskToDeviceLoader:
    """Loads verified block files into device blocks (see the module docstring).

    ``engine`` is a started ``CopyEngine`` for the device (normally ``CudaCopyEngine``). The
    constructor records; ``start()`` allocates the pinned bounce rows and threads; ``close()``
    finishes queued loads and frees them.
    """

    def __init__(
        self, disk: DiskStorage, engine: CopyEngine, config: DiskLoadConfig | None = None
    ) -> None:
        self.disk = disk
        self.engine = engine
        self.config = config or DiskLoadConfig()
        self._bounce: HostStorage | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        g = self.config.group_blocks
        # Page-locked whenever CUDA exists (the CUDA engine refuses anything else); plain memory
        # only on a machine without CUDA, where the engine is the CPU one.
        pin = torch.cuda.is_available()
        self._bounce = HostStorage(2 * g, self.disk.block_bytes, pin_memory=pin)
        self._bounce.allocate()
        self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="kvtier-dread")
        self._thread = threading.Thread(target=self._run, name="kvtier-disk2dev", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        self._pool = None
        self._bounce = None

    def load(
        self,
        device: DeviceStorage,
        sequence_hashes: Sequence[int],
        device_ids: Sequence[int],
        gate: object | None = None,
    ) -> DiskLoadHandle:
        """Queue loading files ``sequence_hashes[i]`` into device blocks ``device_ids[i]``;
        ``gate`` orders each copy to the device (the ``CopyEngine`` gate)."""
        if self._thread is None:
            raise RuntimeError("DiskToDeviceLoader is not started")
        if len(sequence_hashes) != len(device_ids):
            raise ValueError(f"{len(sequence_hashes)} hashes but {len(device_ids)} device ids")
        if device.layout.block_bytes != self.disk.block_bytes:
            raise ValueError(
                f"device blocks are {device.layout.block_bytes} bytes, disk blocks "
                f"{self.disk.block_bytes}"
            )
        if len(set(device_ids)) != len(device_ids):
            raise ValueError("a device block id appears twice in one load")
        handle = DiskLoadHandle(tuple(int(d) for d in device_ids))
        job = _Job(device, tuple(int(h) for h in sequence_hashes), handle.device_ids, handle, gate)
        self._queue.put(job)
        return handle

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._load(job)
            except Exception as exc:  # every block not yet landed is reported failed
                for d in job.device_ids:
                    if d not in job.landed:
                        job.handle.failed.setdefault(d, f"disk load failed: {exc}")
            finally:
                job.handle._done.set()

    def _read_group(self, job: _Job, start: int, slot: int) -> list[Future[object]]:
        assert self._pool is not None and self._bounce is not None
        g = self.config.group_blocks
        end = min(len(job.hashes), start + g)
        rows = self._bounce.rows
        return [
            self._pool.submit(self.disk.read, job.hashes[i], rows[slot * g + (i - start)])
            for i in range(start, end)
        ]

    def _load(self, job: _Job) -> None:
        assert self._bounce is not None
        in_slot: list[_Copy | None] = [None, None]
        reads: dict[int, list[Future[object]]] = {}
        try:
            self._load_groups(job, in_slot, reads)
        except BaseException:
            # Quiesce before the job may complete: its reads and copies use the shared bounce rows.
            self._quiesce(job, in_slot, reads)
            raise

    def _load_groups(
        self, job: _Job, in_slot: list[_Copy | None], reads: dict[int, list[Future[object]]]
    ) -> None:
        """The double-buffered loop; ``in_slot``/``reads`` hold what is in flight at any time."""
        assert self._bounce is not None
        g = self.config.group_blocks
        n = len(job.hashes)
        starts = list(range(0, n, g))
        if starts:
            reads[0] = self._read_group(job, 0, 0)
        for k, start in enumerate(starts):
            nxt = k + 1
            if nxt < len(starts):
                # Slot nxt % 2 held group k - 1: its copy must have read the rows first.
                self._settle(job, in_slot[nxt % 2])
                in_slot[nxt % 2] = None
                reads[nxt] = self._read_group(job, starts[nxt], nxt % 2)
            rows, dids = [], []
            for i, fut in enumerate(reads[k]):
                d = job.device_ids[start + i]
                try:
                    fut.result()
                except Exception as exc:
                    job.handle.failed[d] = str(exc)
                    continue
                rows.append((k % 2) * g + i)
                dids.append(d)
            del reads[k]
            if dids:
                copy = self.engine.host_to_device(
                    self._bounce, job.device, rows, dids, gate=job.gate
                )
                in_slot[k % 2] = (copy, tuple(dids))
        for slot in (0, 1):
            self._settle(job, in_slot[slot])
            in_slot[slot] = None

    @staticmethod
    def _quiesce(
        job: _Job, in_slot: list[_Copy | None], reads: dict[int, list[Future[object]]]
    ) -> None:
        """Cancel the job's reads not yet started, wait for the running ones and its copies."""
        pending = [f for group in reads.values() for f in group]
        for fut in reversed(pending):  # a running read cannot be cancelled: it is awaited
            fut.cancel()
        wait_futures(pending)
        for entry in in_slot:
            if entry is not None:
                # A copy never raises into the caller (CopyEngine contract); its blocks are
                # reported failed by ``_run`` unless it landed here.
                copy, dids = entry
                if copy.wait() is None:
                    job.landed.update(dids)

    @staticmethod
    def _settle(job: _Job, entry: _Copy | None) -> None:
        if entry is None:
            return
        copy, dids = entry
        err = copy.wait()
        if err is not None:
            for d in dids:
                job.handle.failed[d] = f"host->device copy failed: {err}"
        else:
            job.landed.update(dids)
