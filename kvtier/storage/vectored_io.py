"""Vectored file I/O on a list of buffers (``os.preadv`` / ``os.pwritev`` release the GIL).

Why apart: G3's block files are written and read as header + payload in one call, looping over
short transfers; O_DIRECT needs 4096-aligned buffers (``aligned``).
"""

from __future__ import annotations

import errno
import mmap
import os

import torch

ALIGN = 4096


def bytes_of(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous uint8 CPU tensor (no copy)."""
    view: memoryview = t.numpy().data
    return view


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0 and t.numel() % ALIGN == 0


def write_all(fd: int, bufs: list[memoryview | mmap.mmap]) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    offset = 0
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        _consume(views, n)


def read_all(fd: int, bufs: list[memoryview | bytearray]) -> int:
    views = [memoryview(b).cast("B") for b in bufs]
    offset = 0
    while views:
        n = os.preadv(fd, views, offset)
        if n <= 0:
            break
        offset += n
        _consume(views, n)
    return offset


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from ``views`` (what one vectored call moved)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]
