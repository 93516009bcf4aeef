"""Transfer batches as callers hold them: ``TransferPath``, ``TransferHandle``, ``TransferError``.

Why apart from ``TransferManager``: callers (``kvtier/manager/``) read these and need none of its
queueing.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.transfer.copy_api import CopyFuture, CopyHandle

__all__ = ["TransferError", "TransferHandle", "TransferPath"]


class TransferPath(enum.Enum):
    """The five paths; values match ``kvtier.ops.metrics.PATHS``."""

    DEVICE_TO_HOST = "device_to_host"
    HOST_TO_DISK = "host_to_disk"
    DEVICE_TO_DISK = "device_to_disk"
    HOST_TO_DEVICE = "host_to_device"
    DISK_TO_DEVICE = "disk_to_device"


class TransferError(RuntimeError):
    """A batch failed. ``failed_hashes`` / ``failed_device_block_ids`` are the blocks that did not
    arrive (for an onboard: device blocks holding no valid data; the engine must recompute them);
    ``corrupt_hashes`` are disk blocks whose files were bad and have been removed."""

    def __init__(
        self,
        path: TransferPath,
        message: str,
        failed_hashes: Sequence[int],
        failed_device_block_ids: Sequence[int] = (),
        corrupt_hashes: Sequence[int] = (),
    ) -> None:
        names = ", ".join(f"{h:016x}" for h in failed_hashes[:8])
        more = f" (+{len(failed_hashes) - 8} more)" if len(failed_hashes) > 8 else ""
        super().__init__(f"{path.value} of blocks [{names}{more}] failed: {message}")
        self.path = path
        self.failed_hashes = tuple(failed_hashes)
        self.failed_device_block_ids = tuple(failed_device_block_ids)
        self.corrupt_hashes = tuple(corrupt_hashes)


@dataclass
class _Request:
    path: TransferPath
    hashes: tuple[int, ...]
    src_ids: tuple[int, ...]
    dst_ids: tuple[int, ...]
    parents: tuple[int | None, ...]
    priorities: tuple[int, ...]
    gate: object | None


class TransferHandle:
    """One submitted batch.

    Owner's thread: ``done()`` (True once ``poll`` has settled it), ``ok``, ``error``, ``seconds``.
    Any thread: ``data_done()``, ``wait_data()``, ``wait_layer(l)`` (True when layer ``l`` of the
    blocks that could be loaded has landed; check ``error`` for blocks that could not).
    """

    def __init__(self, request: _Request, num_layers: int) -> None:
        self.path = request.path
        self.block_hashes = request.hashes
        src, dst = request.path.value.split("_to_")
        ids = request.dst_ids if dst == "device" else request.src_ids if src == "device" else ()
        self.device_block_ids = ids
        self.num_blocks = len(request.hashes)
        self.num_layers = num_layers
        self.request = request
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.error: TransferError | None = None
        self._settled = False
        self._started = threading.Event()
        self._data: CopyHandle | None = None

    # -- owner's thread -------------------------------------------------------------------------

    def done(self) -> bool:
        return self._settled

    @property
    def ok(self) -> bool:
        return self._settled and self.error is None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    # -- any thread -----------------------------------------------------------------------------

    def data_done(self) -> bool:
        data = self._data
        return data is not None and data.done()

    def wait_data(self, timeout: float | None = None) -> bool:
        """Block until the bytes moved (or failed); True when nothing failed."""
        if not self._started.wait(timeout):
            raise TimeoutError(f"{self.path.value} batch not started after {timeout} s")
        assert self._data is not None
        return self._data.wait(timeout) is None and self.error is None

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """Block until layer ``layer`` landed; a queued batch is waited for too."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if not self._started.wait(timeout):
            raise TimeoutError(f"{self.path.value} batch not started after {timeout} s")
        assert self._data is not None
        return self._data.wait_layer(layer, timeout)

    def _attach(self, data: CopyHandle) -> None:
        self._data = data
        self.started_at = time.perf_counter()
        self._started.set()

    def _settle(self, error: TransferError | None) -> None:
        self.error = error
        self.finished_at = time.perf_counter()
        self._settled = True
        if not self._started.is_set():
            done = CopyFuture(self.num_layers)
            done.fail(error) if error is not None else done.complete()
            self._attach(done)

    def __repr__(self) -> str:
        state = "done" if self._settled else "running" if self._started.is_set() else "queued"
        return f"TransferHandle({self.path.value}, {self.num_blocks} blocks, {state})"
