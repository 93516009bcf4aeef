"""Where each (block, layer) piece of a device layout lives, and the launches that move them.

Why this exists: the CUDA engine moves pieces between three places (engine-owned device tensors,
a device staging buffer of canonical rows, pinned host rows). A ``Segment`` describes one group of
pieces (one layer of a layer-separate layout, or whole blocks of a fully contiguous one) as word
offsets, so one Triton launch (``kernels.copy_pieces_kernel``) moves a segment for a whole
batch. When Triton is missing, or a geometry is not 4-byte aligned, ``torch_move`` does the
same with indexing ops (two device passes, still far faster than PCIe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.storage.device import DeviceStorage
from kvtier.storage.layout import LayoutKind, byte_view

__all__ = [
    "Segment",
    "segments_of",
    "tile_words",
    "torch_move",
    "triton_available",
    "words",
]

WORD = 4
"""Bytes per kernel element: pieces are moved as int32 words (16-byte vector loads)."""


def triton_available() -> bool:
    """Whether Triton can be imported (it is optional; the torch path needs nothing more)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat int32 tensor (raise if not 4-byte sized/aligned)."""
    flat = byte_view(t)
    if flat.numel() % WORD or flat.data_ptr() % WORD:
        raise ValueError(f"tensor of {flat.numel()} bytes is not 4-byte sized and aligned")
    return flat.view(torch.int32)


@dataclass(frozen=True)
class Segment:
    """One launch's worth of pieces, in int32 words.

    Piece ``(block b, outer o)`` is ``chunk`` words at
    ``base + b * block_stride + o * outer_stride`` of ``tensor``; in a canonical row it sits at
    ``row_offset + o * chunk``. ``last_layer`` is the highest layer whose bytes are complete once
    this segment (and those before it) moved.
    """

    tensor: torch.Tensor
    base: int
    block_stride: int
    outer_stride: int
    n_outer: int
    chunk: int
    row_offset: int
    last_layer: int


def segments_of(device: DeviceStorage) -> list[Segment] | None:
    """The segments of ``device``'s layout, or None when its sizes are not 4-byte multiples."""
    layout = device.layout
    m = layout.model
    lbb = layout.layer_block_bytes
    if lbb % (WORD * m.outer_dim) or layout.block_bytes % WORD:
        return None
    nb = layout.num_blocks
    try:
        if layout.kind is LayoutKind.FULLY_CONTIGUOUS:
            assert isinstance(device.tensors, torch.Tensor)
            row = layout.block_bytes // WORD
            return [Segment(words(device.tensors), 0, row, 0, 1, row, 0, m.num_layers - 1)]
        assert not isinstance(device.tensors, torch.Tensor)
        out: list[Segment] = []
        for i, name in enumerate(layout.layer_names):
            w = words(device.tensors[name])
            if layout.kind is LayoutKind.OUTER_FIRST:
                piece = lbb // m.outer_dim // WORD
                out.append(Segment(w, 0, piece, nb * piece, m.outer_dim, piece, i * lbb // WORD, i))
            else:
                out.append(Segment(w, 0, lbb // WORD, 0, 1, lbb // WORD, i * lbb // WORD, i))
        return out
    except ValueError:
        return None


def tile_words(chunk: int, max_tile: int = 4096) -> int:
    """Largest power of two <= ``max_tile`` dividing ``chunk`` (the kernel's words per step)."""
    t = 1
    while t * 2 <= max_tile and chunk % (t * 2) == 0:
        t *= 2
    return t


def _staging_layer(
    staging: torch.Tensor, device: DeviceStorage, layer: int, n: int
) -> torch.Tensor:
    lay = device.layout
    lbb = lay.layer_block_bytes
    view = staging[:n].view(n, lay.model.num_layers, lbb)[:, layer]
    if lay.kind is LayoutKind.OUTER_FIRST:
        return view.reshape(n, lay.model.outer_dim, lbb // lay.model.outer_dim)
    return view


def torch_move(
    device: DeviceStorage, idx: torch.Tensor, staging: torch.Tensor, *, to_rows: bool
) -> None:
    """Gather (``to_rows``) blocks ``idx`` of ``device`` into the first rows of ``staging``
    (canonical rows), or scatter those rows into blocks ``idx``."""
    n = idx.numel()
    outer_first = device.layout.kind is LayoutKind.OUTER_FIRST
    dim = 1 if outer_first else 0  # the block axis of a layer's bytes
    for layer in range(device.layout.model.num_layers):
        dev = device.layer_bytes(layer)
        rows = _staging_layer(staging, device, layer, n)
        if to_rows:
            picked = dev.index_select(dim, idx)
            rows.copy_(picked.transpose(0, 1) if outer_first else picked)
        else:
            dev.index_copy_(dim, idx, rows.transpose(0, 1) if outer_first else rows)
