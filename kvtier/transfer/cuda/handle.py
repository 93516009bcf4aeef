"""``CudaCopyHandle``: completion of one CUDA batch copy, polled through per-layer events.

Why a file of its own: the handle is what callers hold (the ``CopyHandle`` protocol plus
``source_released`` and ``stream_wait_layer``); it knows nothing of how the batch was issued.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from kvtier.transfer.cuda.events import query

__all__ = ["CudaCopyHandle"]


class CudaCopyHandle:
    """Completion of one batch: per-layer CUDA events, polled with ``query()``.

    Until the batch is enqueued (a ``threading.Event`` gate not yet set) nothing is done. After a
    failure every layer reports done and ``error`` says why. ``source_released()`` tells when the
    source blocks may be overwritten (device->host: after the device gather, well before PCIe).
    """

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._enqueued = threading.Event()
        self._layer_events: list[torch.cuda.Event] = []
        self._released: torch.cuda.Event | None = None
        self._error: BaseException | None = None
        self._keep: list[Any] = []  # tensors the GPU still reads; dropped once done

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _set(
        self, layer_events: list[torch.cuda.Event], released: torch.cuda.Event, keep: list[Any]
    ) -> None:
        self._layer_events = layer_events
        self._released = released
        self._keep = keep
        self._enqueued.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._enqueued.set()

    def layer_done(self, layer: int) -> bool:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self._num_layers - 1}")
        if self._error is not None:
            return True
        if not self._enqueued.is_set():
            return False
        return bool(query(self._layer_events[layer]))

    def done(self) -> bool:
        if self._error is not None:
            return True
        if not self._enqueued.is_set() or not query(self._layer_events[-1]):
            return False
        self._keep = []
        return True

    def source_released(self) -> bool:
        if self._error is not None:
            return True
        return self._released is not None and bool(query(self._released))

    @property
    def released_event(self) -> torch.cuda.Event | None:
        """The event after which the source blocks may be overwritten (None until enqueued, or
        after a failure): another stream waits on it to order a write after this copy's read."""
        if self._error is not None or not self._enqueued.is_set():
            return None
        return self._released

    def _wait_event(self, ev_of: Any, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.perf_counter() + timeout
        if not self._enqueued.wait(timeout):
            return False
        if self._error is not None:
            return True
        ev: torch.cuda.Event = ev_of()
        if deadline is None:
            ev.synchronize()
            return True
        pause = 20e-6
        while not query(ev):
            if time.perf_counter() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    def wait(self, timeout: float | None = None) -> BaseException | None:
        if not self._wait_event(lambda: self._layer_events[-1], timeout):
            raise TimeoutError(f"copy not finished after {timeout} s")
        self.done()
        return self._error

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self._num_layers - 1}")
        if not self._wait_event(lambda: self._layer_events[layer], timeout):
            raise TimeoutError(f"layer {layer} not landed after {timeout} s")
        return self._error is None

    def stream_wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: current) wait for layer ``layer`` without blocking the CPU.

        This is how attention on a compute stream is gated on an onboard; it blocks the CPU only
        until the batch is enqueued (a threading gate).
        """
        self._enqueued.wait()
        if self._error is not None:
            raise self._error
        s = stream if stream is not None else torch.cuda.current_stream()
        s.wait_event(self._layer_events[layer])
