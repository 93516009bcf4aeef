"""The copy-engine contract (``CopyEngine``, ``CopyHandle``) and what every engine shares.

Why apart: ``TorchCopyEngine`` (CPU) and ``kvtier.transfer.cuda`` implement it, and everything
above the seam (transfer manager, disk loader, the worker) is written against it alone.

Contract for implementers (``CopyEngine``):
- ``start()`` takes resources (threads, streams); ``close()`` waits for submitted copies and frees
  them. The constructor takes none.
- ``device_to_host(device, host, device_ids, host_ids, gate=None)`` copies device block
  ``device_ids[i]`` into host row ``host_ids[i]`` for every i; ``host_to_device`` the other way.
  Ids are plain ints, equal in number, each target id at most once. The canonical row of a block is
  its layers in order (``device.layer_bytes(l)`` gives each layer's bytes), each layer piece its
  outer indices in order. Both may be called from any thread; they must not block on the copy.
- ``gate``: something that must have happened before the *source* is read. ``None``: read at once.
  A ``threading.Event``: wait for it to be set (CPU). A ``torch.cuda.Event``: the copy stream waits
  on it (the CUDA engine), or the worker thread synchronises it (the torch engine). A gate that
  never opens leaves the handle pending; ``close()`` then fails the handle instead of hanging.
- The returned ``CopyHandle`` is pollable from any thread: ``done()`` never blocks; ``wait()``
  blocks until every layer landed (or failed) and returns ``error`` (None on success);
  ``layer_done(l)``/``wait_layer(l)`` report that layer ``l`` of every block in the batch landed in
  the target, so layer-wise onboarding can start attention on layer ``l`` while later layers still
  copy. Layers complete in order. A failure sets ``error`` (an exception naming the blocks) and
  completes all layers; the copy never raises into the caller's thread. ``CopyFuture`` below is a
  ready-made thread-safe handle an engine may complete from its own thread.
- An engine subclasses ``CopyEngine``, which maps both verbs onto one ``_submit(CopyBatch)`` (both
  directions validate, queue and complete alike; only the direction flag differs);
  ``copy_failure`` builds the ``CopyError`` (direction and blocks named) a failed handle carries.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage

__all__ = [
    "CopyEngine",
    "CopyError",
    "CopyFuture",
    "CopyHandle",
    "check_ids",
    "copy_failure",
]


class CopyError(RuntimeError):
    """A batch copy failed; ``device_ids``/``host_ids`` name the blocks of the batch."""

    def __init__(self, message: str, device_ids: Sequence[int], host_ids: Sequence[int]) -> None:
        super().__init__(message)
        self.device_ids = tuple(device_ids)
        self.host_ids = tuple(host_ids)


@runtime_checkable
class CopyHandle(Protocol):
    """Completion of one submitted batch copy (see the module docstring)."""

    @property
    def num_layers(self) -> int: ...

    @property
    def error(self) -> BaseException | None: ...

    def done(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> BaseException | None: ...

    def layer_done(self, layer: int) -> bool: ...

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool: ...


class CopyBatch(NamedTuple):
    """One call of either verb, as ``CopyEngine._submit`` gets it."""

    to_host: bool
    device: DeviceStorage
    host: HostStorage
    device_ids: Sequence[int]
    host_ids: Sequence[int]
    gate: object | None


@runtime_checkable
class CopyEngine(Protocol):
    """Moves batches of blocks between device storage and host rows (see the module docstring)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def device_to_host(
        self,
        device: DeviceStorage,
        host: HostStorage,
        device_ids: Sequence[int],
        host_ids: Sequence[int],
        gate: object | None = None,
    ) -> CopyHandle:
        return self._submit(CopyBatch(True, device, host, device_ids, host_ids, gate))

    def host_to_device(
        self,
        host: HostStorage,
        device: DeviceStorage,
        host_ids: Sequence[int],
        device_ids: Sequence[int],
        gate: object | None = None,
    ) -> CopyHandle:
        return self._submit(CopyBatch(False, device, host, device_ids, host_ids, gate))

    def _submit(self, batch: CopyBatch) -> CopyHandle: ...


class CopyFuture:
    """A thread-safe ``CopyHandle`` completed layer by layer by whoever does the copy.

    ``complete_layer(l)`` marks layer ``l`` (and all before it) landed; ``fail(exc)`` sets the error
    and completes everything. ``wait_layer`` returns True when the layer landed without error.
    """

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._cond = threading.Condition()
        self._landed = 0
        self._error: BaseException | None = None

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def error(self) -> BaseException | None:
        return self._error

    def complete_layer(self, layer: int) -> None:
        with self._cond:
            self._landed = max(self._landed, layer + 1)
            self._cond.notify_all()

    def complete(self) -> None:
        self.complete_layer(self._num_layers - 1)

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._landed = self._num_layers
            self._cond.notify_all()

    def done(self) -> bool:
        return self._landed >= self._num_layers

    def layer_done(self, layer: int) -> bool:
        return self._landed > layer

    def wait(self, timeout: float | None = None) -> BaseException | None:
        with self._cond:
            if not self._cond.wait_for(self.done, timeout):
                raise TimeoutError(f"copy not finished after {timeout} s")
        return self._error

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self._num_layers - 1}")
        with self._cond:
            if not self._cond.wait_for(lambda: self._landed > layer, timeout):
                raise TimeoutError(f"layer {layer} not landed after {timeout} s")
        return self._error is None


def copy_failure(
    to_host: bool, device_ids: Sequence[int], host_ids: Sequence[int], exc: BaseException
) -> CopyError:
    """The ``CopyError`` a handle carries when a batch fails: names the direction and blocks."""
    direction = "device->host" if to_host else "host->device"
    err = CopyError(
        f"{direction} copy of device blocks {list(device_ids)} / host blocks {list(host_ids)} "
        f"failed: {exc}",
        device_ids,
        host_ids,
    )
    err.__cause__ = exc
    return err


def check_ids(
    device: DeviceStorage, host: HostStorage, device_ids: Sequence[int], host_ids: Sequence[int]
) -> None:
    """Validate a batch before anything moves; raise ValueError naming the offending id."""
    if len(device_ids) != len(host_ids):
        raise ValueError(f"{len(device_ids)} device ids but {len(host_ids)} host ids")
    if host.block_bytes != device.layout.block_bytes:
        raise ValueError(
            f"host rows are {host.block_bytes} bytes, device blocks {device.layout.block_bytes}"
        )
    nb = device.layout.num_blocks
    for d in device_ids:
        if not 0 <= d < nb:
            raise ValueError(f"device block id {d} out of range 0..{nb - 1}")
    for h in host_ids:
        if not 0 <= h < host.num_blocks:
            raise ValueError(f"host block id {h} out of range 0..{host.num_blocks - 1}")
