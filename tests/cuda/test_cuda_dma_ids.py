"""``RowDma`` falls back to row copies within the refused batch; ``IdRing`` wraps exactly.

RowDma: both directions share one ``RowDma`` from their own threads. The batcher here refuses,
and while refusing switches its owner's batching off, as the other direction's refusal does at
that moment: the batch must still land exactly, through one ``copy_`` per run.

IdRing: a small ring under a stream held busy by a sleep kernel, so every upload is still pending
when the CPU comes round to its host slice: a reused slice must wait for its upload, and each
upload's ids must reach the device exactly.
"""

from __future__ import annotations

import random

import pytest
import torch
from cuda_helpers import needs_cuda, pinned_host

from kvtier.transfer.cuda.batch import BatchCopier
from kvtier.transfer.cuda.dma import RowDma
from kvtier.transfer.cuda.events import new_stream
from kvtier.transfer.cuda.ids import IdRing

pytestmark = [pytest.mark.cuda, needs_cuda]


class _RefusingBatcher(BatchCopier):
    """Refuses every batch; while refusing, switches ``owner``'s batching off (the other
    direction's refusal, landing in the middle of this copy)."""

    def __init__(self, owner: RowDma) -> None:
        super().__init__(None, None)
        self.owner = owner
        self.calls = 0

    def copy(
        self, stream: torch.cuda.Stream, dsts: list[int], srcs: list[int], sizes: list[int]
    ) -> bool:
        self.calls += 1
        self.owner._batcher = None
        self.error = "refused (injected)"
        return False


@pytest.mark.parametrize("to_host", [False, True])
def test_refused_batch_lands_through_row_copies(to_host: bool) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    rb = 4096
    g = torch.Generator().manual_seed(11 + int(to_host))
    host = pinned_host(12, rb)
    staging = torch.zeros((8, rb), dtype=torch.uint8, device=dev)
    runs = [(4, 0, 3), (0, 3, 2), (9, 5, 3)]  # (host row, staging row, count)
    if to_host:
        src = torch.randint(0, 256, (8, rb), dtype=torch.uint8, generator=g)
        staging.copy_(src.to(dev))
    else:
        src = torch.randint(0, 256, (12, rb), dtype=torch.uint8, generator=g)
        host.rows.copy_(src)
    torch.cuda.synchronize()
    dma = RowDma()
    batcher = _RefusingBatcher(dma)
    dma._batcher = batcher
    dma.copy([new_stream(dev), new_stream(dev)], runs, host.rows, staging, to_host=to_host)
    torch.cuda.synchronize()
    got_staging = staging.cpu()
    for h, j, c in runs:
        if to_host:
            assert torch.equal(host.rows[h : h + c], src[j : j + c]), (h, j, c)
        else:
            assert torch.equal(got_staging[j : j + c], src[h : h + c]), (h, j, c)
    if to_host:  # rows outside the runs untouched
        assert bool((host.rows[[2, 3, 7, 8]] == 0xA5).all())
    assert batcher.calls == 1  # stream 1's runs went straight to row copies
    assert dma.batch_error == "refused (injected)"
    assert not dma.uses_batches


def test_id_ring_wraps_exactly_under_a_busy_stream() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    ring = IdRing(dev, capacity=16)
    ring.reserve()
    stream = new_stream(dev)
    rng = random.Random(5)
    # Wraps with and without a skipped tail, a whole-ring upload, slices overlapping several.
    sizes = [5, 5, 5, 5, 3, 9, 16, 1, 7, 7, 2, 11, 4, 4, 4, 4, 13, 0, 6, 15, 3]
    want: list[list[int]] = []
    got: list[torch.Tensor] = []
    with torch.cuda.stream(stream):
        torch.cuda._sleep(20_000_000)  # type: ignore[no-untyped-call]  # uploads wait behind it
    for n in sizes:
        ids = [rng.randrange(1 << 40) for _ in range(n)]
        out = ring.upload(ids, stream)
        with torch.cuda.stream(stream):
            got.append(out.clone())  # stream order: before a later upload reuses the slice
        want.append(ids)
    torch.cuda.synchronize()
    for i, (g, ids) in enumerate(zip(got, want, strict=True)):
        assert g.tolist() == ids, (i, sizes[i])
    assert ring.capacity == 16
    spans = [(lo, hi) for lo, hi, _ in ring._busy]
    assert all(0 <= lo < hi <= 16 for lo, hi in spans)
    assert all(a[1] <= b[0] or b[1] <= a[0] for i, a in enumerate(spans) for b in spans[i + 1 :])
