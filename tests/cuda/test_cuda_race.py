"""Race tests on the GPU, under a busy compute stream (issue 6, item 4).

Offload: the compute stream writes pattern A into device blocks late (behind a long matmul
chain); the offload is gated on the event after that write; the moment the offload reports
complete, the compute stream overwrites the blocks with pattern B. The host must hold exactly A.

Onboard: the compute stream still has a pending write of junk into the target blocks when the
onboard is issued (gated on the event after it), and attention (a read on the compute stream) is
ordered only by the handle's per-layer events. The loaded bytes must be exactly the host rows:
the junk must land before the load, and the read must see the load, never the junk or a mix.
"""

from __future__ import annotations

import pytest
import torch
from cuda_helpers import (
    MODEL,
    gpu_device,
    needs_cuda,
    pinned_host,
    read_layer_async,
    write_rows_async,
)

from kvtier.transfer.cuda import CudaCopyConfig, CudaCopyEngine
from kvtier.transfer.cuda.events import query

pytestmark = [pytest.mark.cuda, needs_cuda]

N = 48
TARGETS = list(range(8, 8 + N))


def _busy(stream: torch.cuda.Stream, a: torch.Tensor, rounds: int) -> torch.Tensor:
    with torch.cuda.stream(stream):
        for _ in range(rounds):
            a = torch.tanh(a @ a)
    return a


@pytest.mark.parametrize("mode", ["dma", "kernel"])
@pytest.mark.parametrize("kind", ["outer_first", "block_first", "fully_contiguous"])
def test_offload_overwritten_right_after_completion(mode: str, kind: str) -> None:
    dev = gpu_device(kind, MODEL, 64, seed=21)
    host = pinned_host(N, dev.layout.block_bytes)
    comp = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    a = torch.randn(4096, 4096, device="cuda")
    pattern_a = torch.randint(0, 256, (N, dev.layout.block_bytes), dtype=torch.uint8)
    pattern_b = torch.randint(0, 256, (N, dev.layout.block_bytes), dtype=torch.uint8)
    rows = list(range(N))
    idx = torch.tensor(TARGETS, device="cuda")
    a_gpu, b_gpu = pattern_a.cuda(), pattern_b.cuda()
    torch.cuda.synchronize()
    with CudaCopyEngine(CudaCopyConfig(mode=mode, staging_bytes=16 * dev.layout.block_bytes)) as e:
        assert e.device_to_host(dev, host, TARGETS, rows).wait(10) is None  # warm-up (compiles)
        for trial in range(3):
            _busy(comp, a, 20)
            with torch.cuda.stream(comp):
                write_rows_async(dev, idx, a_gpu)  # enqueued behind the matmuls
                written = torch.cuda.Event()  # type: ignore[no-untyped-call]
                written.record()
            h = e.device_to_host(dev, host, TARGETS, rows, gate=written)
            assert not query(written), "the writer finished early: no race was tested"
            while not h.done():
                pass
            with torch.cuda.stream(comp):
                write_rows_async(dev, idx, b_gpu)
            assert h.error is None
            assert torch.equal(host.rows, pattern_a), f"trial {trial}: host rows are not pattern A"
            torch.cuda.synchronize()
            assert torch.equal(dev.read_block(TARGETS[0]), pattern_b[0])


@pytest.mark.parametrize("mode", ["dma", "kernel"])
@pytest.mark.parametrize("kind", ["outer_first", "block_first", "fully_contiguous"])
def test_onboard_beats_pending_junk_and_attention_sees_the_load(mode: str, kind: str) -> None:
    dev = gpu_device(kind, MODEL, 64, seed=22)
    host = pinned_host(N, dev.layout.block_bytes)
    host.rows.copy_(torch.randint(0, 256, host.rows.shape, dtype=torch.uint8))
    comp = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    a = torch.randn(4096, 4096, device="cuda")
    nl = MODEL.num_layers
    lbb = dev.layout.layer_block_bytes
    idx = torch.tensor(TARGETS, device="cuda")
    junk = torch.full((N, dev.layout.block_bytes), 0xEE, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    with CudaCopyEngine(CudaCopyConfig(mode=mode, staging_bytes=16 * dev.layout.block_bytes)) as e:
        assert e.host_to_device(host, dev, list(range(N)), TARGETS).wait(10) is None  # warm-up
        for _ in range(3):
            _busy(comp, a, 20)
            with torch.cuda.stream(comp):
                write_rows_async(dev, idx, junk)  # still pending when the onboard is issued
                free = torch.cuda.Event()  # type: ignore[no-untyped-call]
                free.record()
            h = e.host_to_device(host, dev, list(range(N)), TARGETS, gate=free)
            assert not query(free), "the junk write finished early: no race was tested"
            seen = []
            for layer in range(nl):
                h.stream_wait_layer(layer, comp)  # type: ignore[attr-defined]
                with torch.cuda.stream(comp):  # "attention" of this layer reads the blocks
                    seen.append(read_layer_async(dev, idx, layer))
            assert h.wait(30) is None
            comp.synchronize()
            for layer in range(nl):
                want = host.rows[:, layer * lbb : (layer + 1) * lbb]
                got = seen[layer].cpu()
                assert torch.equal(got, want), f"layer {layer} read before it landed"
