"""One direction of the CUDA engine: its streams, its two device staging slots, its id ring.

Why a file of its own: device->host and host->device each own a ``Lane`` so that the two
directions never wait on each other's streams or slots; ``chunk_bounds`` says how a batch is cut
into slot-sized chunks so that gathering chunk k+1 overlaps the DMA of chunk k.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvtier.transfer.cuda.ids import IdRing

__all__ = ["Lane", "chunk_bounds"]


def chunk_bounds(n: int, slot_rows: int) -> list[tuple[int, int]]:
    """Split ``n`` rows into chunks of at most ``slot_rows``, the first and last ones small.

    The device gather of the first chunk delays the first DMA, and the device scatter of the last
    chunk runs after the last DMA: an eighth of a slot at both ends shortens those bubbles.
    """
    small = max(1, slot_rows // 8)
    if n <= small:
        return [(0, n)]
    bounds = [(0, small)]
    start = small
    while start < n:
        end = min(n, start + slot_rows)
        if end == n and end - start > small:
            bounds += [(start, end - small), (end - small, end)]
        else:
            bounds.append((start, end))
        start = end
    return bounds


@dataclass
class Lane:
    """One direction's streams, staging slots and the events that free them."""

    kernel_stream: torch.cuda.Stream
    dma_streams: list[torch.cuda.Stream]
    lock: threading.Lock
    ids: IdRing
    staging: torch.Tensor | None = None  # [2, slot_rows, row_bytes] uint8 on the device
    slot_rows: int = 0
    slot_free: list[torch.cuda.Event | None] | None = None
    next_slot: int = 0

    def drain(self) -> None:
        """Block until everything enqueued on this lane's streams has run."""
        self.kernel_stream.synchronize()
        for ds in self.dma_streams:
            ds.synchronize()

    def staging_slots(
        self, row_bytes: int, staging_bytes: int, device: torch.device | None
    ) -> tuple[torch.Tensor, int]:
        """The two staging slots for rows of ``row_bytes`` (reallocated, after draining, when
        the row size changes) and the rows each slot holds."""
        if self.staging is None or self.staging.shape[2] != row_bytes:
            if self.staging is not None:
                self.drain()
            rows = max(1, staging_bytes // 2 // row_bytes)
            self.staging = torch.empty((2, rows, row_bytes), dtype=torch.uint8, device=device)
            self.slot_rows = rows
            self.slot_free = [None, None]
            self.next_slot = 0
        return self.staging, self.slot_rows
