"""Triton kernels that move KV pieces between device tensors and mapped pinned host memory.

Why a kernel: vLLM's layer-separate layout scatters each block over one 8-64 KiB piece per layer
(two with an outer-first layout). One DMA per piece is launch-bound (about 4.6 GB/s on an H200);
one launch of a kernel with a small grid that reads or writes the pinned host pages directly over
PCIe moves all pieces of a layer at close to the PCIe limit while occupying only a few SMs.

The same kernel gathers device pieces into a device staging buffer (then one DMA crosses PCIe),
so both candidates share one tested piece of index arithmetic.

Addressing, all in 4-byte words: piece ``(i, o)`` (block ``i`` of the batch, outer index ``o``,
K or V) is ``CHUNK`` contiguous words at
``src_base + src_ids[i] * src_block_stride + o * src_outer_stride`` in ``src`` and goes to
``dst_base + dst_ids[i] * dst_block_stride + o * dst_outer_stride`` in ``dst``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtier.transfer.cuda.plan import Segment, tile_words

__all__ = ["copy_pieces_kernel", "copy_segments_kernel", "launch_segment", "launch_segments"]


@triton.jit(do_not_specialize=["n_blocks"])  # type: ignore[misc, untyped-decorator]
def copy_pieces_kernel(  # type: ignore[no-untyped-def]
    src_ptr,
    dst_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    n_blocks,
    src_base,
    src_block_stride,
    src_outer_stride,
    dst_base,
    dst_block_stride,
    dst_outer_stride,
    N_OUTER: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
):
    """Copy ``n_blocks * N_OUTER`` pieces of ``CHUNK`` words, ``TILE`` words per step.

    A persistent grid: each program strides over (block, outer, tile) items, so the grid size
    alone bounds how many SMs the copy takes from the model.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles_per_chunk: tl.constexpr = CHUNK // TILE
    n_items = n_blocks * (N_OUTER * tiles_per_chunk)
    offs = tl.arange(0, TILE)
    for w in range(pid, n_items, nprog):
        t = w % tiles_per_chunk
        c = w // tiles_per_chunk
        o = (c % N_OUTER).to(tl.int64)
        i = c // N_OUTER
        sb = tl.load(src_ids_ptr + i).to(tl.int64)
        db = tl.load(dst_ids_ptr + i).to(tl.int64)
        s = src_base + sb * src_block_stride + o * src_outer_stride + t * TILE
        d = dst_base + db * dst_block_stride + o * dst_outer_stride + t * TILE
        x = tl.load(src_ptr + s + offs)
        tl.store(dst_ptr + d + offs, x)


def launch_segment(
    seg: Segment,
    rows: torch.Tensor,
    row_words: int,
    device_ids: torch.Tensor,
    row_ids: torch.Tensor,
    *,
    to_rows: bool,
    programs: int,
    num_warps: int = 8,
    max_tile: int = 4096,
) -> None:
    """Move segment ``seg`` of blocks ``device_ids`` to (or from) canonical rows ``row_ids``.

    ``rows`` is the int32 view of a row buffer (device staging or mapped pinned host memory) whose
    rows are ``row_words`` long. Enqueued on the current stream; ``programs`` bounds the SMs used.
    """
    n = int(device_ids.numel())
    if n == 0:
        return
    tile = tile_words(seg.chunk, max_tile)
    dev_side = (seg.tensor, device_ids, seg.base, seg.block_stride, seg.outer_stride)
    row_side = (rows, row_ids, seg.row_offset, row_words, seg.chunk)
    src, dst = (dev_side, row_side) if to_rows else (row_side, dev_side)
    copy_pieces_kernel[(programs,)](
        src[0],
        dst[0],
        src[1],
        dst[1],
        n,
        src[2],
        src[3],
        src[4],
        dst[2],
        dst[3],
        dst[4],
        N_OUTER=seg.n_outer,
        CHUNK=seg.chunk,
        TILE=tile,
        num_warps=num_warps,
    )


@triton.jit(do_not_specialize=["n_blocks", "n_segs"])  # type: ignore[misc, untyped-decorator]
def copy_segments_kernel(  # type: ignore[no-untyped-def]
    table_ptr,
    rows_ptr,
    dev_ids_ptr,
    row_ids_ptr,
    n_blocks,
    n_segs,
    block_stride,
    outer_stride,
    row_words,
    seg_row_words,
    TO_ROWS: tl.constexpr,
    N_OUTER: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
):
    """All segments (layers) of a batch in one launch: ``table_ptr`` holds each layer tensor's
    address; piece (layer l, block i, outer o) of the device sits at
    ``table[l] + dev_ids[i] * block_stride + o * outer_stride`` (words), and at
    ``row_ids[i] * row_words + l * seg_row_words + o * CHUNK`` in the rows.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles: tl.constexpr = CHUNK // TILE
    n_items = n_segs * n_blocks * (N_OUTER * tiles)
    offs = tl.arange(0, TILE)
    for w in range(pid, n_items, nprog):
        t = w % tiles
        c = w // tiles
        o = (c % N_OUTER).to(tl.int64)
        c2 = c // N_OUTER
        i = c2 % n_blocks
        layer = (c2 // n_blocks).to(tl.int64)
        dev = tl.load(table_ptr + layer).to(tl.pointer_type(tl.int32))
        db = tl.load(dev_ids_ptr + i).to(tl.int64)
        rb = tl.load(row_ids_ptr + i).to(tl.int64)
        doff = db * block_stride + o * outer_stride + t * TILE
        roff = rb * row_words + layer * seg_row_words + o * CHUNK + t * TILE
        if TO_ROWS:
            x = tl.load(dev + doff + offs)
            tl.store(rows_ptr + roff + offs, x)
        else:
            x = tl.load(rows_ptr + roff + offs)
            tl.store(dev + doff + offs, x)


def launch_segments(
    table: torch.Tensor,
    segs: list[Segment],
    seg_row_words: int,
    rows: torch.Tensor,
    row_words: int,
    device_ids: torch.Tensor,
    row_ids: torch.Tensor,
    *,
    to_rows: bool,
    programs: int,
    num_warps: int = 8,
    max_tile: int = 4096,
) -> None:
    """One launch moving every segment of ``segs`` (equal strides; ``table`` holds their
    addresses on the device) between blocks ``device_ids`` and rows ``row_ids``."""
    n = int(device_ids.numel())
    if n == 0:
        return
    s0 = segs[0]
    copy_segments_kernel[(programs,)](
        table,
        rows,
        device_ids,
        row_ids,
        n,
        len(segs),
        s0.block_stride,
        s0.outer_stride,
        row_words,
        seg_row_words,
        TO_ROWS=to_rows,
        N_OUTER=s0.n_outer,
        CHUNK=s0.chunk,
        TILE=tile_words(s0.chunk, max_tile),
        num_warps=num_warps,
    )
