"""The transfer manager: per-path queues of batched block moves, bounded, completed by polling.

Why: copies and disk I/O run on other threads, but pool metadata changes only on the owner's
thread. So ``submit`` queues a batch and returns a ``TransferHandle``; workers only move bytes and
mark per-layer progress; ``poll()`` on the owner's thread starts queued batches while the in-flight
bound allows and returns those whose data finished, for ``KvBlockManager`` to apply to the pools.

Paths: device<->host on the ``CopyEngine``; host->disk on ``DiskIo``; disk->device on the owner's
``DiskToDeviceLoader`` (its own thread: layer-wise waits never depend on polling); device->disk
copies to staging rows (``stage_blocks``), then writes them (chained in ``poll``). Onboards start
first, while blocks in flight stay under ``max_inflight_blocks`` (a lone larger batch runs alone).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvtier.storage.block_file import BlockHeader
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskBlockError
from kvtier.storage.host import HostStorage
from kvtier.transfer.copy_api import CopyEngine, CopyFuture, CopyHandle
from kvtier.transfer.disk_io import DiskIo, stage_blocks
from kvtier.transfer.disk_load import DiskLoadHandle, DiskToDeviceLoader
from kvtier.transfer.handle import TransferError, TransferHandle, TransferPath, _Request

__all__ = ["TransferError", "TransferHandle", "TransferManager", "TransferPath"]


_START_ORDER = (
    TransferPath.HOST_TO_DEVICE,
    TransferPath.DISK_TO_DEVICE,
    TransferPath.DEVICE_TO_HOST,
    TransferPath.DEVICE_TO_DISK,
    TransferPath.HOST_TO_DISK,
)


@dataclass
class _Running:
    handle: TransferHandle
    staging: HostStorage | None = None
    writes: list[Future[BlockHeader | None]] = field(default_factory=list)
    stage1: CopyHandle | None = None  # device -> staging copy of a device->disk batch
    failed: list[int] = field(default_factory=list)  # indices into the request
    corrupt: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TransferManager:
    """Queues, starts and completes batches; see the module docstring.

    ``device``/``host``/``disk_io``/``loader``: None when a tier is absent (a path using it is
    refused at submit). ``loader`` (disk->device) is started and closed by its owner (e.g. the
    data plane); device->disk batches stage into rows of their own (pinned when ``pin_staging``).
    """

    def __init__(
        self,
        engine: CopyEngine,
        *,
        device: DeviceStorage | None,
        host: HostStorage | None,
        disk_io: DiskIo | None,
        loader: DiskToDeviceLoader | None,
        num_layers: int,
        max_inflight_blocks: int = 512,
        pin_staging: bool = False,
    ) -> None:
        self.engine = engine
        self.device = device
        self.host = host
        self.disk_io = disk_io
        self.num_layers = num_layers
        self.max_inflight_blocks = max_inflight_blocks
        self.pin_staging = pin_staging
        self._queues: dict[TransferPath, deque[TransferHandle]] = {p: deque() for p in TransferPath}
        self._running: list[_Running] = []
        self._inflight_blocks = 0
        self._loader = loader
        self._closed = False

    @property
    def inflight_blocks(self) -> int:
        return self._inflight_blocks

    def pending(self) -> int:
        """Batches queued or running."""
        return len(self._running) + sum(len(q) for q in self._queues.values())

    # -- submit ---------------------------------------------------------------------------------

    def submit(
        self,
        path: TransferPath,
        sequence_hashes: Sequence[int],
        src_ids: Sequence[int],
        dst_ids: Sequence[int],
        *,
        parents: Sequence[int | None] | None = None,
        priorities: Sequence[int] | None = None,
        gate: object | None = None,
    ) -> TransferHandle:
        """Queue one batch and start it at once when the in-flight bound allows.

        Ids by path: device->host (device ids, host ids), host->disk (host ids, ignored),
        host->device (host ids, device ids), disk->device (ignored, device ids), device->disk
        (device ids, ignored). Disk blocks are named by ``sequence_hashes``; ``parents`` and
        ``priorities`` go into disk block headers.
        """
        if self._closed:
            raise RuntimeError("transfer manager is closed")
        n = len(sequence_hashes)
        src = tuple(src_ids) if len(src_ids) else (-1,) * n
        dst = tuple(dst_ids) if len(dst_ids) else (-1,) * n
        if len(src) != n or len(dst) != n:
            raise ValueError(f"{n} hashes but {len(src)} source and {len(dst)} target ids")
        par = tuple(parents) if parents is not None else (None,) * n
        pri = tuple(priorities) if priorities is not None else (0,) * n
        if len(par) != n or len(pri) != n:
            raise ValueError(f"{n} hashes but {len(par)} parents and {len(pri)} priorities")
        disk = self._loader if path is TransferPath.DISK_TO_DEVICE else self.disk_io
        for what, tier in (("device", self.device), ("host", self.host), ("disk", disk)):
            if tier is None and what in path.value.split("_to_"):
                raise ValueError(f"path {path.value} needs a {what} tier, which is not configured")
        request = _Request(path, tuple(sequence_hashes), src, dst, par, pri, gate)
        handle = TransferHandle(request, self.num_layers)
        self._queues[path].append(handle)
        self._pump()
        return handle

    # -- progress -------------------------------------------------------------------------------

    def poll(self) -> list[TransferHandle]:
        """Start what fits, advance two-stage batches, return the batches settled now."""
        finished: list[TransferHandle] = []
        still: list[_Running] = []
        for run in self._running:
            if self._advance(run):
                self._finish(run)
                finished.append(run.handle)
            else:
                still.append(run)
        self._running = still
        self._pump()
        return finished

    def _pump(self) -> None:
        for path in _START_ORDER:
            queue = self._queues[path]
            while queue:
                n = queue[0].num_blocks
                if self._inflight_blocks and self._inflight_blocks + n > self.max_inflight_blocks:
                    return
                run = _Running(queue.popleft())
                self._inflight_blocks += n
                self._start(run)
                self._running.append(run)

    def _start(self, run: _Running) -> None:
        h = run.handle
        req = h.request
        n = h.num_blocks
        if n == 0:
            done = CopyFuture(self.num_layers)
            done.complete()
            h._attach(done)
            return
        dev, host, src, dst = self.device, self.host, req.src_ids, req.dst_ids  # checked at submit
        try:
            if req.path is TransferPath.DEVICE_TO_HOST:
                assert dev is not None and host is not None
                h._attach(self.engine.device_to_host(dev, host, src, dst, req.gate))
            elif req.path is TransferPath.HOST_TO_DEVICE:
                assert dev is not None and host is not None
                h._attach(self.engine.host_to_device(host, dev, src, dst, req.gate))
            elif req.path is TransferPath.HOST_TO_DISK:
                assert host is not None
                self._start_writes(run, host, list(src))
            elif req.path is TransferPath.DEVICE_TO_DISK:
                assert dev is not None
                run.staging, run.stage1 = stage_blocks(
                    self.engine, dev, src, req.gate, pin_memory=self.pin_staging
                )
                h._attach(CopyFuture(self.num_layers))  # completed when its writes finish
            else:
                assert self._loader is not None and dev is not None
                h._attach(self._loader.load(dev, req.hashes, dst, req.gate))
        except Exception as exc:
            failed = CopyFuture(self.num_layers)
            failed.fail(exc)
            run.failed = list(range(n))
            run.messages.append(str(exc))
            if not h._started.is_set():
                h._attach(failed)

    def _start_writes(self, run: _Running, source: HostStorage, rows: list[int]) -> None:
        assert self.disk_io is not None
        req = run.handle.request
        staged = run.handle._data  # a device->disk batch's future, attached at stage 1
        data = staged if isinstance(staged, CopyFuture) else CopyFuture(1)
        tensors = [source.rows[r] for r in rows]
        futures = self.disk_io.write(req.hashes, tensors, req.parents, req.priorities)
        run.writes = futures
        remaining = [len(futures)]

        def one_done(_: Future[BlockHeader | None]) -> None:
            with run.lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                data.complete()

        if data is not staged:
            run.handle._attach(data)
        for f in futures:
            f.add_done_callback(one_done)

    def _advance(self, run: _Running) -> bool:
        """True when the batch's data is final (moved or failed)."""
        h = run.handle
        if run.stage1 is not None:
            if not run.stage1.done():
                return False
            err = run.stage1.error
            run.stage1 = None
            if err is None:
                assert run.staging is not None
                try:
                    self._start_writes(run, run.staging, list(range(h.num_blocks)))
                    return False
                except Exception as exc:
                    err = exc
            # Stage 1 failed, or its writes could not start: fail the batch and its waiters.
            run.failed = list(range(h.num_blocks))
            run.messages.append(str(err))
            assert isinstance(h._data, CopyFuture)
            h._data.fail(err)
            return True
        data = h._data
        return data is not None and data.done()

    def _finish(self, run: _Running) -> None:
        h = run.handle
        req = h.request
        data = h._data
        if isinstance(data, DiskLoadHandle):  # per block: what did not land, which files were bad
            index = {d: i for i, d in enumerate(req.dst_ids)}
            for d, why in data.failed.items():
                run.failed.append(index[d])
                run.messages.append(why)
                if data.bad_files.get(d):
                    run.corrupt.append(index[d])
        elif not run.failed and data is not None and data.error is not None and not run.writes:
            run.failed = list(range(h.num_blocks))
            run.messages.append(str(data.error))
        for i, f in enumerate(run.writes):
            exc = f.exception()
            if exc is not None:
                run.failed.append(i)
                run.messages.append(str(exc))
                if isinstance(exc, DiskBlockError) and exc.corrupt:
                    run.corrupt.append(i)
        error = None
        if run.failed:
            failed = sorted(set(run.failed))
            dev_ids = [h.device_block_ids[i] for i in failed] if h.device_block_ids else []
            error = TransferError(
                h.path,
                "; ".join(dict.fromkeys(run.messages)) or "unknown error",
                [req.hashes[i] for i in failed],
                dev_ids,
                [req.hashes[i] for i in sorted(set(run.corrupt))],
            )
        self._inflight_blocks -= h.num_blocks
        h._settle(error)

    def close(self, timeout: float = 30.0) -> list[TransferHandle]:
        """Wait (up to ``timeout`` s) for running batches; fail queued ones; return all settled."""
        self._closed = True
        settled: list[TransferHandle] = []
        for path in _START_ORDER:
            while self._queues[path]:
                h = self._queues[path].popleft()
                h._settle(
                    TransferError(
                        path, "cancelled: manager closed", h.block_hashes, h.device_block_ids
                    )
                )
                settled.append(h)
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            settled.extend(self.poll())
            if self._running:
                time.sleep(0.001)
        return settled
