"""Disk -> device: verified reads into slots of bounce rows, each copied while the next ones fill.

Why this exists: it is the one disk -> device path (the vLLM worker on CPU and CUDA, and the
transfer manager's ``DISK_TO_DEVICE``). A disk onboard is bounded by the disk (about 2 GB/s on the
lent machine, against 55 GB/s of PCIe), so the copy to the device must hide behind the reads.
``DiskIo`` threads read and verify blocks (header, fingerprint, checksum: ``DiskStorage.read``)
into a ring of slots of host rows; as soon as a slot is complete its blocks go to the device
through the ``CopyEngine`` while the next slots fill. Two slots hide the copies; more keep more
reads queued, so the disk stays busy when the loader's thread is slow to run (a busy CPU). A block
whose file is missing or bad is reported in the handle (``failed``, ``bad_files``; the caller
turns it into a load error, so it is recomputed), never copied to the device. The handle is a
``CopyHandle``: ``wait_layer(l)`` returns once layer ``l`` of every readable block landed.

A load that fails partway (a copy that cannot be issued, say) still ends cleanly: before its
handle completes (so before the next load may reuse the bounce rows), every read it started has
finished or been cancelled and every copy it issued completed; else a late read could overwrite
rows the next load already filled, and wrong bytes would reach the device.

GPUDirect Storage (kvikio) is not used: the lent machine has no GDS (kvikio runs in compatibility
mode there at 1.9 GB/s, below plain O_DIRECT reads), and reading straight into device memory would
skip the host-side checksum that keeps a corrupt file from being served.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from kvtier.storage.block_file import BlockHeader
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskBlockError
from kvtier.storage.host import HostStorage
from kvtier.transfer.copy_api import CopyEngine, CopyHandle
from kvtier.transfer.disk_io import DiskIo

__all__ = ["DiskLoadConfig", "DiskLoadHandle", "DiskToDeviceLoader"]


@dataclass(frozen=True)
class DiskLoadConfig:
    """``slots`` bounce slots (at least two) of ``group_blocks`` blocks each."""

    group_blocks: int = 16
    slots: int = 2

    def __post_init__(self) -> None:
        for name, least in (("group_blocks", 1), ("slots", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an int >= {least}, got {v!r}")

    @classmethod
    def for_staging(cls, staging_blocks: int) -> DiskLoadConfig:
        """``staging_blocks`` bounce rows as slots of the default size at most (the last slot's
        copy is not hidden behind reads); more slots keep more reads queued."""
        group = min(cls.group_blocks, max(1, staging_blocks // 2))
        return cls(group, slots=max(2, staging_blocks // group))


class DiskLoadHandle:
    """Completion of one disk -> device load: a ``CopyHandle`` with per-block outcomes.

    ``failed``: device block id -> why it did not land. ``bad_files``: the subset whose file could
    not be read, -> True when it was corrupt (and removed). ``error``: set when a block failed for
    another reason (a copy failed or could not be issued); ``wait_layer`` is then False.
    ``copies``: the host -> device copies, one per bounce slot filled.
    """

    def __init__(self, device_ids: tuple[int, ...], num_layers: int) -> None:
        self.device_ids = device_ids
        self.num_layers = num_layers
        self.failed: dict[int, str] = {}
        self.bad_files: dict[int, bool] = {}
        self.error: BaseException | None = None
        self.copies: list[CopyHandle] = []
        self._issued = threading.Event()  # ``copies`` is final
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> BaseException | None:
        """Block until every block landed or failed; return ``error``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"disk load not finished after {timeout} s")
        return self.error

    def layer_done(self, layer: int) -> bool:
        return self._issued.is_set() and all(c.layer_done(layer) for c in self.copies)

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """Block until layer ``layer`` of every block that could be read landed; True when some
        did and no copy failed."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if not self._issued.wait(timeout):
            raise TimeoutError(f"disk reads not finished after {timeout} s")
        landed = all([c.wait_layer(layer, timeout) for c in self.copies])
        return landed and bool(self.copies) and self.error is None

    @property
    def loaded(self) -> tuple[int, ...]:
        """Device block ids whose bytes landed exactly (valid once ``done()``)."""
        return tuple(d for d in self.device_ids if d not in self.failed)

    def _fail(self, device_ids: Sequence[int], why: str, exc: BaseException) -> None:
        for d in device_ids:
            self.failed.setdefault(d, why)
        if self.error is None:
            self.error = exc


@dataclass
class _Job:
    device: DeviceStorage
    hashes: tuple[int, ...]
    handle: DiskLoadHandle
    gate: object | None = None  # of each host->device copy (e.g. after pending reads of targets)
    landed: set[int] = field(default_factory=set)  # ids copied without error (kept on failure)


_Copy = tuple[CopyHandle, tuple[int, ...]]
"""A host -> device copy of one bounce slot and the device ids it writes."""


class DiskToDeviceLoader:
    """Loads verified block files into device blocks (see the module docstring).

    ``disk_io`` and ``engine`` are started by their owner and outlive the loader. ``start()``
    allocates the bounce rows (page-locked when ``pin_memory``, which the CUDA engine needs) and
    the loader's thread; ``close()`` finishes queued loads and frees them.
    """

    def __init__(
        self,
        disk_io: DiskIo,
        engine: CopyEngine,
        config: DiskLoadConfig | None = None,
        *,
        pin_memory: bool = False,
    ) -> None:
        self.disk_io = disk_io
        self.engine = engine
        self.config = config or DiskLoadConfig()
        self.pin_memory = pin_memory
        self._bounce: HostStorage | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        rows = self.config.slots * self.config.group_blocks
        bb = self.disk_io.storage.block_bytes
        self._bounce = HostStorage(rows, bb, pin_memory=self.pin_memory)
        with torch.inference_mode(False):  # rows written outside vLLM's inference mode
            self._bounce.allocate()
        self._thread = threading.Thread(target=self._run, name="kvtier-disk2dev", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
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
        if device.layout.block_bytes != self.disk_io.storage.block_bytes:
            raise ValueError(
                f"device blocks are {device.layout.block_bytes} bytes, disk blocks "
                f"{self.disk_io.storage.block_bytes}"
            )
        if len(set(device_ids)) != len(device_ids):
            raise ValueError("a device block id appears twice in one load")
        handle = DiskLoadHandle(tuple(int(d) for d in device_ids), device.layout.model.num_layers)
        self._queue.put(_Job(device, tuple(int(h) for h in sequence_hashes), handle, gate))
        return handle

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._load(job)
            except Exception as exc:  # every block not yet landed is reported failed
                rest = [d for d in job.handle.device_ids if d not in job.landed]
                job.handle._fail(rest, f"disk load failed: {exc}", exc)
            finally:
                job.handle._issued.set()
                job.handle._done.set()

    def _read_group(self, job: _Job, start: int, slot: int) -> list[Future[BlockHeader | None]]:
        assert self._bounce is not None
        g = self.config.group_blocks
        hashes = job.hashes[start : start + g]
        return self.disk_io.read(hashes, list(self._bounce.rows[slot * g : slot * g + len(hashes)]))

    def _load(self, job: _Job) -> None:
        in_slot: list[_Copy | None] = [None] * self.config.slots
        reads: dict[int, list[Future[BlockHeader | None]]] = {}
        try:
            self._load_groups(job, in_slot, reads)
        except BaseException:
            # Quiesce before the job may complete: its reads and copies use the shared bounce rows.
            self._quiesce(job, in_slot, reads)
            raise

    def _load_groups(
        self,
        job: _Job,
        in_slot: list[_Copy | None],
        reads: dict[int, list[Future[BlockHeader | None]]],
    ) -> None:
        """The slot ring; ``in_slot``/``reads`` hold what is in flight at any time."""
        assert self._bounce is not None
        g, s = self.config.group_blocks, self.config.slots
        handle = job.handle
        starts = list(range(0, len(job.hashes), g))
        for k in range(min(s - 1, len(starts))):
            reads[k] = self._read_group(job, starts[k], k)
        for k, start in enumerate(starts):
            nxt = k + s - 1
            if nxt < len(starts):
                # Slot nxt % s held group k - 1: its copy must have read the rows first.
                self._settle(job, in_slot[nxt % s])
                in_slot[nxt % s] = None
                reads[nxt] = self._read_group(job, starts[nxt], nxt % s)
            rows, dids = [], []
            for i, fut in enumerate(reads[k]):
                d = handle.device_ids[start + i]
                exc = fut.exception()
                if exc is not None:
                    handle.failed[d] = str(exc)
                    handle.bad_files[d] = isinstance(exc, DiskBlockError) and exc.corrupt
                    continue
                rows.append((k % s) * g + i)
                dids.append(d)
            del reads[k]
            if dids:
                copy = self.engine.host_to_device(
                    self._bounce, job.device, rows, dids, gate=job.gate
                )
                handle.copies.append(copy)
                in_slot[k % s] = (copy, tuple(dids))
        handle._issued.set()
        for slot in range(s):
            self._settle(job, in_slot[slot])
            in_slot[slot] = None

    @staticmethod
    def _quiesce(
        job: _Job, in_slot: list[_Copy | None], reads: dict[int, list[Future[BlockHeader | None]]]
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
            job.handle._fail(dids, f"host->device copy failed: {err}", err)
        else:
            job.landed.update(dids)
