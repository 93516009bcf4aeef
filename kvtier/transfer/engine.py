"""The copy-engine seam: moving batches of blocks between device storage and host rows.

Why this exists: the transfer manager decides *what* moves; a copy engine decides *how* bytes move
between G1 (any layout, ``DeviceStorage``) and a host byte array (``HostStorage``: contiguous,
block-major, one uint8 row of ``block_bytes`` per block). ``TorchCopyEngine`` does it with torch
indexing on one worker thread and runs on CPU; ``kvtier.transfer.cuda`` implements the same protocol
with CUDA streams, events and gather/scatter kernels. Everything above this seam is identical on CPU
and GPU.

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
- ``SubmittingEngine`` maps both verbs onto one ``_submit(to_host, ...)``; ``copy_failure`` builds
  the ``CopyError`` (direction and blocks named) a failed handle carries; both engines use them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import LayoutKind

__all__ = [
    "CopyDirection",
    "CopyEngine",
    "CopyError",
    "CopyFuture",
    "CopyHandle",
    "SubmittingEngine",
    "TorchCopyEngine",
    "check_ids",
    "copy_batch",
    "copy_failure",
    "runs",
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
    ) -> CopyHandle: ...

    def host_to_device(
        self,
        host: HostStorage,
        device: DeviceStorage,
        host_ids: Sequence[int],
        device_ids: Sequence[int],
        gate: object | None = None,
    ) -> CopyHandle: ...


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
        self.finished_at: float | None = None

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def error(self) -> BaseException | None:
        return self._error

    def complete_layer(self, layer: int) -> None:
        with self._cond:
            self._landed = max(self._landed, layer + 1)
            if self._landed >= self._num_layers and self.finished_at is None:
                self.finished_at = time.perf_counter()
            self._cond.notify_all()

    def complete(self) -> None:
        self.complete_layer(self._num_layers - 1)

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._landed = self._num_layers
            if self.finished_at is None:
                self.finished_at = time.perf_counter()
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


class CopyDirection:
    """Names of the two directions, used in error messages."""

    D2H = "device->host"
    H2D = "host->device"


def copy_failure(
    to_host: bool, device_ids: Sequence[int], host_ids: Sequence[int], exc: BaseException
) -> CopyError:
    """The ``CopyError`` a handle carries when a batch fails: names the direction and blocks."""
    direction = CopyDirection.D2H if to_host else CopyDirection.H2D
    err = CopyError(
        f"{direction} copy of device blocks {list(device_ids)} / host blocks {list(host_ids)} "
        f"failed: {exc}",
        device_ids,
        host_ids,
    )
    err.__cause__ = exc
    return err


class SubmittingEngine:
    """The protocol's two verbs, as one ``_submit(to_host, ...)`` that each engine implements.

    Why: both directions validate, queue and complete alike; only the direction flag differs.
    """

    def device_to_host(
        self,
        device: DeviceStorage,
        host: HostStorage,
        device_ids: Sequence[int],
        host_ids: Sequence[int],
        gate: object | None = None,
    ) -> CopyHandle:
        return self._submit(True, device, host, device_ids, host_ids, gate)

    def host_to_device(
        self,
        host: HostStorage,
        device: DeviceStorage,
        host_ids: Sequence[int],
        device_ids: Sequence[int],
        gate: object | None = None,
    ) -> CopyHandle:
        return self._submit(False, device, host, device_ids, host_ids, gate)

    def _submit(
        self,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        device_ids: Sequence[int],
        host_ids: Sequence[int],
        gate: object | None,
    ) -> CopyHandle:
        raise NotImplementedError


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


@dataclass
class _Job:
    to_host: bool
    device: DeviceStorage
    host: HostStorage
    device_ids: tuple[int, ...]
    host_ids: tuple[int, ...]
    gate: object | None
    future: CopyFuture


def _open_gate(gate: object | None, closed: Callable[[], bool]) -> None:
    if gate is None:
        return
    if isinstance(gate, threading.Event):
        while not gate.wait(0.01):
            if closed():
                raise RuntimeError("copy engine closed before the gate opened")
        return
    sync = getattr(gate, "synchronize", None)
    if callable(sync):
        sync()
        return
    raise TypeError(f"gate must be None, a threading.Event or a CUDA event, got {type(gate)}")


class TorchCopyEngine(SubmittingEngine):
    """``CopyEngine`` with torch indexing on one worker thread (CPU, or CUDA without kernels).

    On CPU each (layer, run of consecutive ids) is one numpy slice copy (a memcpy that releases
    the GIL); on other devices each layer is one gather and one scatter (see ``copy_batch``).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._pending: set[CopyFuture] = set()

    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="kvtier-copy", daemon=True)
            self._thread.start()

    def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._closed = True
        self._queue.put(None)
        thread.join(timeout=5.0)
        self._thread = None
        with self._lock:
            stuck = list(self._pending)
        for fut in stuck:
            fut.fail(RuntimeError("copy engine closed before the copy ran (gate never opened?)"))

    def _submit(
        self,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        device_ids: Sequence[int],
        host_ids: Sequence[int],
        gate: object | None,
    ) -> CopyHandle:
        if self._thread is None or self._closed:
            raise RuntimeError("TorchCopyEngine is not started")
        check_ids(device, host, device_ids, host_ids)
        fut = CopyFuture(device.layout.model.num_layers)
        if not device_ids:
            fut.complete()
            return fut
        with self._lock:
            self._pending.add(fut)
        self._queue.put(_Job(to_host, device, host, tuple(device_ids), tuple(host_ids), gate, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                _open_gate(job.gate, lambda: self._closed)
                copy_batch(
                    job.to_host, job.device, job.host, job.device_ids, job.host_ids, job.future
                )
                job.future.complete()
            except Exception as exc:  # the handle carries the failure to the poller
                job.future.fail(copy_failure(job.to_host, job.device_ids, job.host_ids, exc))
            finally:
                with self._lock:
                    self._pending.discard(job.future)


def runs(device_ids: Sequence[int], host_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group id pairs into runs ``(first device id, first host id, length)`` where both sides
    are consecutive, so that each run is one copy per layer instead of one per block."""
    out: list[tuple[int, int, int]] = []
    for d, h in zip(device_ids, host_ids, strict=True):
        if out:
            d0, h0, k = out[-1]
            if d == d0 + k and h == h0 + k:
                out[-1] = (d0, h0, k + 1)
                continue
        out.append((d, h, 1))
    return out


def copy_batch(
    to_host: bool,
    device: DeviceStorage,
    host: HostStorage,
    device_ids: Sequence[int],
    host_ids: Sequence[int],
    future: CopyFuture | None = None,
) -> None:
    """Copy a batch synchronously, layer by layer, marking each layer in ``future`` as it lands.

    CPU device: one numpy slice assignment per (layer, run of consecutive ids), a plain memcpy
    (torch's per-call overhead on small CPU copies is ~10x numpy's). Other devices: one gather
    (``index_select``) and one scatter (``index_copy_``) per layer.
    """
    if device.device.type == "cpu":
        _copy_batch_cpu(to_host, device, host, device_ids, host_ids, future)
        return
    layout = device.layout
    lbb = layout.layer_block_bytes
    nl = layout.model.num_layers
    dev = device.device
    didx = torch.tensor(device_ids, dtype=torch.long, device=dev)
    hidx = torch.tensor(host_ids, dtype=torch.long)
    rows = host.rows.view(host.num_blocks, nl, lbb)
    outer_first = layout.kind is LayoutKind.OUTER_FIRST
    for layer in range(nl):
        view = device.layer_bytes(layer)
        host_layer = rows[:, layer]
        if to_host:
            if outer_first:
                gathered = view.index_select(1, didx).transpose(0, 1).reshape(len(didx), lbb)
            else:
                gathered = view.index_select(0, didx)
            host_layer.index_copy_(0, hidx, gathered.to("cpu"))
        else:
            pieces = host_layer.index_select(0, hidx).to(dev, non_blocking=dev.type == "cuda")
            if outer_first:
                outer = view.shape[0]
                view.index_copy_(1, didx, pieces.view(len(didx), outer, -1).transpose(0, 1))
            else:
                view.index_copy_(0, didx, pieces)
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        if future is not None:
            future.complete_layer(layer)


def _copy_batch_cpu(
    to_host: bool,
    device: DeviceStorage,
    host: HostStorage,
    device_ids: Sequence[int],
    host_ids: Sequence[int],
    future: CopyFuture | None,
) -> None:
    layout = device.layout
    nl = layout.model.num_layers
    outer = layout.model.outer_dim
    outer_first = layout.kind is LayoutKind.OUTER_FIRST
    flat = device.byte_layers()
    if flat is not None and len(device_ids) <= 8 and host.rows.is_contiguous():
        # A few blocks (a decode step's): one memoryview slice copy per (layer, block).
        hmv = host.rows.numpy().data.cast("B")
        lbb, rb = layout.layer_block_bytes, host.block_bytes
        pairs = list(zip(device_ids, host_ids, strict=True))
        for layer in range(nl):
            src, off = flat[layer], layer * lbb
            for d, h in pairs:
                ho, do = h * rb + off, d * lbb
                if to_host:
                    hmv[ho : ho + lbb] = src[do : do + lbb]
                else:
                    src[do : do + lbb] = hmv[ho : ho + lbb]
            if future is not None:
                future.complete_layer(layer)
        return
    # host rows are contiguous, so these reshapes are views; device views are never reshaped
    shape = (host.num_blocks, nl, outer, -1) if outer_first else (host.num_blocks, nl, -1)
    rows = host.rows.numpy().reshape(shape)
    spans = runs(device_ids, host_ids)
    views = device.numpy_layers()  # outer-first: [nb, outer, inner], a strided view
    if len(spans) > 2:  # scattered ids (decode): one indexed copy per layer, not one per run
        didx = np.asarray(device_ids, dtype=np.intp)
        hidx = np.asarray(host_ids, dtype=np.intp)
        for layer in range(nl):
            if to_host:
                rows[hidx, layer] = views[layer][didx]
            else:
                views[layer][didx] = rows[hidx, layer]
            if future is not None:
                future.complete_layer(layer)
        return
    for layer in range(nl):
        view = views[layer]
        for d, h, k in spans:
            if to_host:
                rows[h : h + k, layer] = view[d : d + k]
            else:
                view[d : d + k] = rows[h : h + k, layer]
        if future is not None:
            future.complete_layer(layer)
