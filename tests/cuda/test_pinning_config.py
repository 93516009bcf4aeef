"""Pure-logic parts of the CUDA path (run everywhere, no GPU needed)."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvtier.storage.host import aligned_empty
from kvtier.storage.pinned import ChunkedPinner, PinningConfig, rows_per_chunk
from kvtier.transfer.cuda import CudaCopyConfig, chunk_bounds
from kvtier.transfer.cuda.plan import tile_words


def test_rows_per_chunk_is_whole_rows_and_pages() -> None:
    assert rows_per_chunk(2 << 20, 256 << 20) == 128
    assert rows_per_chunk(6144, 1 << 20) == 170  # 6144 * 2 = 3 pages: even row counts only
    assert rows_per_chunk(6144, 4096) == 2  # at least one page-aligned step
    assert rows_per_chunk(5 << 20, 1 << 20) == 1
    with pytest.raises(ValueError, match="row_bytes"):
        rows_per_chunk(0, 4096)


def test_runs_split_at_registration_boundaries() -> None:
    rows = aligned_empty(10 * 8192).view(10, 8192)
    p = ChunkedPinner(rows, PinningConfig(chunk_bytes=3 * 8192))
    assert p.chunk_rows == 3
    assert p.runs(1, 7) == [(1, 0, 2), (3, 2, 3), (6, 5, 2)]
    assert p.runs(3, 3) == [(3, 0, 3)]
    assert p.runs(9, 1) == [(9, 0, 1)]


def test_configs_validate() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        PinningConfig(chunk_bytes=100)
    with pytest.raises(TypeError, match="chunk_bytes"):
        PinningConfig(chunk_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        CudaCopyConfig(mode="fast")
    with pytest.raises(ValueError, match="gather"):
        CudaCopyConfig(gather="cupy")
    with pytest.raises(ValueError, match="staging_bytes"):
        CudaCopyConfig(staging_bytes=0)
    with pytest.raises(ValueError, match="gather_programs"):
        CudaCopyConfig(gather_programs=-1)


def test_tile_words() -> None:
    assert tile_words(8192) == 4096
    assert tile_words(1024) == 1024
    assert tile_words(24) == 8
    assert tile_words(3) == 1


def test_pinning_without_cuda_is_an_error_not_a_pageable_pool() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rows = aligned_empty(2 * 8192).view(2, 8192)
    from kvtier.storage.pinned import PinningError

    with pytest.raises(PinningError, match="CUDA is not available"):
        ChunkedPinner(rows).start()


def test_chunk_bounds_cover_every_row_once_with_small_ends() -> None:
    assert chunk_bounds(3, 64) == [(0, 3)]
    assert chunk_bounds(8, 64) == [(0, 8)]
    assert chunk_bounds(100, 64) == [(0, 8), (8, 72), (72, 92), (92, 100)]
    assert chunk_bounds(10, 3) == [(0, 1), (1, 4), (4, 7), (7, 9), (9, 10)]
    for n in range(1, 300, 7):
        for slot in (1, 2, 5, 64):
            b = chunk_bounds(n, slot)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(x[1] == y[0] for x, y in itertools.pairwise(b))
            assert all(0 < e - s <= slot for s, e in b)
