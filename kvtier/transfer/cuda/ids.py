"""Block ids to the GPU without a pinned allocation or a stream sync on the submit path.

Why this exists: the gather kernels read block ids from device memory. ``torch.tensor(ids)
.pin_memory()`` per batch calls ``cudaHostAlloc`` whenever the pinned cache misses, which waits
for the whole device (measured: it drained a busy compute stream, so an offload submit blocked on
the model); ``torch.tensor(ids, device=...)`` copies from pageable memory and synchronises the
stream. ``IdRing`` keeps one pinned and one device buffer per direction and hands out slices in
ring order; a host slice is reused only after the event recorded behind its upload completed.

Pending uploads are kept oldest first, and they lie in ring order ahead of the write position, so
a new slice can only overlap a run of the oldest: each submit looks at the front of the queue only
(not at every pending upload, up to thousands). When the ring wraps, the skipped tail's uploads
(the oldest, a whole ring ago) are settled first, so the front is again the next in ring order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

__all__ = ["IdRing"]


class IdRing:
    """A ring of int64 slots in page-locked host memory mirrored on the device.

    Not thread-safe: each direction of the engine owns one and uses it under its lock, on one
    stream (so device slices are reused in stream order; host slices wait on events).
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 16) -> None:
        self.device = device
        self.capacity = capacity
        self._host: torch.Tensor | None = None
        self._dev: torch.Tensor | None = None
        self._offset = 0
        self._busy: deque[tuple[int, int, torch.cuda.Event]] = deque()

    def reserve(self) -> None:
        """Allocate the buffers now (``start()``), so no submit pays for a pinned allocation."""
        self._ensure(1)

    def _ensure(self, n: int) -> None:
        if self._host is not None and n <= self.capacity:
            return
        for _, _, ev in self._busy:
            ev.synchronize()
        self._busy.clear()
        while self.capacity < n:
            self.capacity *= 2
        self._host = torch.empty(self.capacity, dtype=torch.int64, pin_memory=True)
        self._dev = torch.empty(self.capacity, dtype=torch.int64, device=self.device)
        self._offset = 0

    def upload(self, ids: Sequence[int], stream: torch.cuda.Stream) -> torch.Tensor:
        """Enqueue ``ids`` to the device on ``stream``; return the device slice holding them."""
        n = len(ids)
        self._ensure(n)
        assert self._host is not None and self._dev is not None
        if n == 0:
            return self._dev[:0]  # nothing to move, and no empty entry in the queue's order
        busy = self._busy
        if self._offset + n > self.capacity:
            # The tail [offset, capacity) is skipped this round: its uploads are the oldest and
            # would otherwise sit at the front out of ring order.
            while busy and busy[0][0] >= self._offset:
                busy.popleft()[2].synchronize()
            self._offset = 0
        lo, hi = self._offset, self._offset + n
        while busy and self._overlaps(busy[0], lo, hi):
            busy.popleft()[2].synchronize()  # rare: the ring came round onto a pending upload
        self._host[lo:hi] = torch.tensor(ids, dtype=torch.int64)
        with torch.cuda.stream(stream):
            out = self._dev[lo:hi]
            out.copy_(self._host[lo:hi], non_blocking=True)
            ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ev.record()
        self._busy.append((lo, hi, ev))
        self._offset = hi
        return out

    @staticmethod
    def _overlaps(entry: tuple[int, int, torch.cuda.Event], lo: int, hi: int) -> bool:
        return entry[0] < hi and lo < entry[1]
