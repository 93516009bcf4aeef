"""G2 host storage: one block-major byte array, 4096-aligned, one row of ``block_bytes`` per block.

Why this exists: the host tier is the copy target of every offload and the source of every fast
onboard, and the disk tier reads and writes its rows directly with O_DIRECT, which needs 4096-byte
aligned buffers. Rows are plain pageable memory unless pinned memory is asked for; the CUDA path
pins (or registers) the same array in chunks after start-up (``kvtier.storage.pinned``).
"""

from __future__ import annotations

import torch

__all__ = ["ALIGN", "HostStorage", "aligned_empty"]

ALIGN = 4096
"""Alignment of host buffers (O_DIRECT needs 4096 on the filesystems kvtier targets)."""


def aligned_empty(nbytes: int, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes`` whose first byte is ``ALIGN``-aligned."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
    offset = (-raw.data_ptr()) % ALIGN
    return raw[offset : offset + nbytes]


class HostStorage:
    """``num_blocks`` rows of ``block_bytes`` in one contiguous, aligned uint8 tensor.

    The constructor only records sizes; ``allocate()`` (called by the data plane's ``open``)
    takes the memory.
    """

    def __init__(self, num_blocks: int, block_bytes: int, *, pin_memory: bool = False) -> None:
        if num_blocks <= 0 or block_bytes <= 0:
            raise ValueError(
                f"host storage needs num_blocks > 0 and block_bytes > 0, got {num_blocks}, "
                f"{block_bytes}"
            )
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.pin_memory = pin_memory
        self._rows: torch.Tensor | None = None

    def allocate(self) -> None:
        """Take the memory (idempotent)."""
        if self._rows is None:
            flat = aligned_empty(self.num_blocks * self.block_bytes, pin_memory=self.pin_memory)
            self._rows = flat.view(self.num_blocks, self.block_bytes)

    def release(self) -> None:
        """Drop the memory (the storage can be allocated again)."""
        self._rows = None

    @property
    def rows(self) -> torch.Tensor:
        """The ``[num_blocks, block_bytes]`` uint8 tensor."""
        if self._rows is None:
            raise RuntimeError("host storage is not allocated; start the manager first")
        return self._rows

    def layer_view(self, block_id: int, layer: int, layer_block_bytes: int) -> torch.Tensor:
        """One (block, layer) piece of a row: bytes ``[layer * lbb, (layer + 1) * lbb)``."""
        start = layer * layer_block_bytes
        if layer < 0 or start + layer_block_bytes > self.block_bytes:
            raise IndexError(f"layer {layer} of {layer_block_bytes} bytes is outside the row")
        return self.row(block_id)[start : start + layer_block_bytes]

    def row(self, block_id: int) -> torch.Tensor:
        """One block's bytes (a view)."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"host block {block_id} out of range 0..{self.num_blocks - 1}")
        return self.rows[block_id]
