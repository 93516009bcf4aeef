"""``TorchCopyEngine``: the CPU ``CopyEngine``, ``batch_copy`` on one worker thread.

The contract is ``kvtier.transfer.copy_api``; the GPU engine is ``kvtier.transfer.cuda``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.transfer.batch_copy import copy_batch
from kvtier.transfer.copy_api import CopyBatch, CopyEngine, CopyFuture, check_ids, copy_failure


@dataclass
class _Job:
    batch: CopyBatch  # its id lists copied to tuples: the caller may reuse its lists
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


class TorchCopyEngine(CopyEngine):
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

    def _submit(self, batch: CopyBatch) -> CopyFuture:
        if self._thread is None or self._closed:
            raise RuntimeError("TorchCopyEngine is not started")
        check_ids(batch.device, batch.host, batch.device_ids, batch.host_ids)
        fut = CopyFuture(batch.device.layout.model.num_layers)
        if not batch.device_ids:
            fut.complete()
            return fut
        with self._lock:
            self._pending.add(fut)
        own = batch._replace(device_ids=tuple(batch.device_ids), host_ids=tuple(batch.host_ids))
        self._queue.put(_Job(own, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            b = job.batch
            try:
                _open_gate(b.gate, lambda: self._closed)
                copy_batch(b.to_host, b.device, b.host, b.device_ids, b.host_ids, job.future)
                job.future.complete()
            except Exception as exc:  # the handle carries the failure to the poller
                job.future.fail(copy_failure(b.to_host, b.device_ids, b.host_ids, exc))
            finally:
                with self._lock:
                    self._pending.discard(job.future)
