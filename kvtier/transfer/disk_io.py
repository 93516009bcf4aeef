"""Disk I/O on a thread pool: many block files read or written at once; and ``stage_blocks``.

Why this exists: one thread doing one 2 MiB O_DIRECT request at a time leaves an NVMe mostly idle;
several requests in flight reach its bandwidth. ``os.preadv``/``os.pwritev`` (inside
``DiskStorage``) release the GIL, so plain threads give real parallelism. Results are futures
(``concurrent.futures``) the transfer manager polls; nothing here touches pool metadata.

A block file is written from host memory, so a block going from the device straight to disk (no G2
copy) first crosses into host rows: ``stage_blocks``, the one device -> staging copy, used by the
vLLM worker and the transfer manager alike (each queues its writes once the copy landed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch

from kvtier.storage.block_file import BlockHeader
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage
from kvtier.transfer.copy_api import CopyEngine, CopyHandle

__all__ = ["DiskIo", "stage_blocks"]


def stage_blocks(
    engine: CopyEngine,
    device: DeviceStorage,
    device_ids: Sequence[int],
    gate: object | None = None,
    *,
    pin_memory: bool = False,
) -> tuple[HostStorage, CopyHandle]:
    """Rows for ``device_ids`` (row i holds ``device_ids[i]``; page-locked with ``pin_memory``,
    which the CUDA engine needs) and the copy into them, ordered after ``gate``."""
    rows = HostStorage(len(device_ids), device.layout.block_bytes, pin_memory=pin_memory)
    with torch.inference_mode(False):  # the copy thread runs outside vLLM's inference mode
        rows.allocate()
    ids = list(range(len(device_ids)))
    return rows, engine.device_to_host(device, rows, device_ids, ids, gate)


class DiskIo:
    """A pool of ``threads`` I/O threads bound to one ``DiskStorage``."""

    def __init__(self, storage: DiskStorage, threads: int = 4) -> None:
        if threads <= 0:
            raise ValueError(f"threads must be positive, got {threads}")
        self.storage = storage
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kvtier-disk")

    def close(self) -> None:
        """Wait for submitted I/O to finish (files are then complete or absent), stop threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _submit(self, fn: Callable[[], BlockHeader | None]) -> Future[BlockHeader | None]:
        if self._pool is None:
            raise RuntimeError("DiskIo is not started")
        return self._pool.submit(fn)

    def write(
        self,
        sequence_hashes: Sequence[int],
        rows: Sequence[torch.Tensor],
        parent_hashes: Sequence[int | None],
        priorities: Sequence[int],
    ) -> list[Future[BlockHeader | None]]:
        """Write each ``rows[i]`` as block ``sequence_hashes[i]``; one future per block."""
        st = self.storage
        items = zip(sequence_hashes, rows, parent_hashes, priorities, strict=True)
        return [
            self._submit(partial(st.write, h, r, parent_hash=p, priority=q)) for h, r, p, q in items
        ]

    def read(
        self, sequence_hashes: Sequence[int], rows: Sequence[torch.Tensor]
    ) -> list[Future[BlockHeader | None]]:
        """Read and verify block ``sequence_hashes[i]`` into ``rows[i]``; one future per block."""
        st = self.storage
        items = zip(sequence_hashes, rows, strict=True)
        return [self._submit(partial(st.read, h, r)) for h, r in items]
