"""CudaCopyEngine on a real GPU: every layout x mode, chunked staging, gates, layers, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from cuda_helpers import KINDS, MODEL, ODD_MODEL, all_blocks, gpu_device, needs_cuda, pinned_host

from kvtier.config import ModelConfig
from kvtier.storage.host import HostStorage
from kvtier.storage.pinned import PinningError
from kvtier.transfer.copy_api import CopyEngine, CopyError, CopyHandle
from kvtier.transfer.cuda import CudaCopyConfig, CudaCopyEngine

pytestmark = [pytest.mark.cuda, needs_cuda]

CONFIGS = {
    "dma-triton": CudaCopyConfig(mode="dma", gather="triton", staging_bytes=6 * 32 * 1024),
    "dma-copy": CudaCopyConfig(dma_batch=False, dma_streams=3, staging_bytes=6 * 32 * 1024),
    "dma-torch": CudaCopyConfig(mode="dma", gather="torch", staging_bytes=6 * 32 * 1024),
    "kernel": CudaCopyConfig(mode="kernel", kernel_programs=3),
}
"""Staging of 6 rows = two slots of 3: a 10-block batch takes 4 chunks and reuses both slots."""


def _round_trip(cfg: CudaCopyConfig, kind: str, model: ModelConfig, seed: int) -> None:
    dev = gpu_device(kind, model, 24, seed)
    before = all_blocks(dev)
    host = pinned_host(16, dev.layout.block_bytes)
    src = [17, 3, 0, 9, 23, 5, 11, 12, 13, 2]
    rows = [4, 5, 6, 15, 0, 7, 1, 2, 3, 10]  # runs (4..7) and (1..3) coalesce, others do not
    with CudaCopyEngine(cfg) as eng:
        assert isinstance(eng, CopyEngine)
        h = eng.device_to_host(dev, host, src, rows)
        assert isinstance(h, CopyHandle)
        assert h.wait(10) is None
        for s, r in zip(src, rows, strict=True):
            assert torch.equal(host.rows[r], before[s]), (s, r)
        untouched = [r for r in range(16) if r not in rows]
        assert all(bool((host.rows[r] == 0xA5).all()) for r in untouched)
        targets = [1, 4, 6, 7, 8, 10, 14, 15, 16, 18]
        h = eng.host_to_device(host, dev, rows, targets)
        assert h.wait(10) is None
        assert all(h.layer_done(layer) for layer in range(model.num_layers))
    after = all_blocks(dev)
    for s, t in zip(src, targets, strict=True):
        assert torch.equal(after[t], before[s]), (s, t)
    for i in range(24):
        if i not in targets:
            assert torch.equal(after[i], before[i]), i


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_bit_exact(name: str, kind: str) -> None:
    _round_trip(CONFIGS[name], kind, MODEL, seed=10 * len(name) + KINDS.index(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_unaligned_geometry_falls_back_to_torch_gather(kind: str) -> None:
    _round_trip(CONFIGS["dma-triton"], kind, ODD_MODEL, seed=5)
    _round_trip(CONFIGS["kernel"], kind, ODD_MODEL, seed=6)


def test_cuda_event_gate_orders_the_copy_after_the_writer() -> None:
    dev = gpu_device("outer_first", MODEL, 8, seed=3)
    host = pinned_host(8, dev.layout.block_bytes)
    comp = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    a = torch.randn(4096, 4096, device="cuda")
    with CudaCopyEngine() as eng:
        with torch.cuda.stream(comp):
            for _ in range(30):  # keep the compute stream busy for tens of ms
                a = torch.tanh(a @ a)
            for t in dev.tensors.values():  # type: ignore[union-attr]
                t.view(torch.uint8).fill_(0x3C)
            written = torch.cuda.Event()  # type: ignore[no-untyped-call]
            written.record()
        h = eng.device_to_host(dev, host, [0, 5], [1, 2], gate=written)
        assert h.wait(30) is None
    assert bool((host.rows[1] == 0x3C).all()) and bool((host.rows[2] == 0x3C).all())


def test_threading_gate_holds_the_copy_until_set() -> None:
    dev = gpu_device("block_first", MODEL, 4, seed=4)
    host = pinned_host(4, dev.layout.block_bytes)
    gate = threading.Event()
    with CudaCopyEngine() as eng:
        h = eng.device_to_host(dev, host, [1], [3], gate=gate)
        time.sleep(0.1)
        assert not h.done() and not h.layer_done(0)
        gate.set()
        assert h.wait(10) is None
    assert torch.equal(host.rows[3], dev.read_block(1))


def test_gate_that_never_opens_fails_on_close() -> None:
    dev = gpu_device("block_first", MODEL, 4, seed=4)
    host = pinned_host(4, dev.layout.block_bytes)
    eng = CudaCopyEngine()
    eng.start()
    h = eng.device_to_host(dev, host, [1], [3], gate=threading.Event())
    eng.close()
    assert h.done()
    assert isinstance(h.error, RuntimeError) and "gate" in str(h.error)


def test_kernel_mode_lands_layers_in_order_and_gates_a_stream() -> None:
    dev = gpu_device("outer_first", MODEL, 64, seed=7)
    host = pinned_host(64, dev.layout.block_bytes)
    host.rows.copy_(torch.randint(0, 256, host.rows.shape, dtype=torch.uint8))
    expect = host.rows.clone()
    with CudaCopyEngine(CudaCopyConfig(mode="kernel", kernel_programs=1)) as eng:
        ids = list(range(64))
        h = eng.host_to_device(host, dev, ids, ids[::-1])
        seen = [h.layer_done(i) for i in range(MODEL.num_layers)]
        assert seen == sorted(seen, reverse=True)  # a landed layer never follows a pending one
        assert h.wait_layer(0, 10)
        comp = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        h.stream_wait_layer(MODEL.num_layers - 1, comp)  # type: ignore[attr-defined]
        with torch.cuda.stream(comp):
            got = [dev.read_block(63 - i) for i in range(64)]  # ordered after the last layer
        assert h.wait(10) is None
    for i in range(64):
        assert torch.equal(got[i], expect[i]), i


def test_pageable_host_rows_are_refused_not_copied_slowly() -> None:
    dev = gpu_device("block_first", MODEL, 4, seed=8)
    host = HostStorage(4, dev.layout.block_bytes)  # plain pageable memory
    host.allocate()
    host.rows.zero_()
    with CudaCopyEngine() as eng:
        h = eng.device_to_host(dev, host, [0, 1], [0, 1])
        err = h.wait(10)
    assert isinstance(err, CopyError)
    assert isinstance(err.__cause__, PinningError) or "page-locked" in str(err)
    assert err.device_ids == (0, 1) and err.host_ids == (0, 1)
    assert bool((host.rows == 0).all())


def test_bad_batches_are_refused_at_submit() -> None:
    dev = gpu_device("block_first", MODEL, 4, seed=9)
    host = pinned_host(4, dev.layout.block_bytes)
    with CudaCopyEngine() as eng:
        with pytest.raises(ValueError, match="out of range"):
            eng.device_to_host(dev, host, [4], [0])
        with pytest.raises(ValueError, match="twice"):
            eng.device_to_host(dev, host, [0, 1], [2, 2])
        with pytest.raises(ValueError, match="device ids but"):
            eng.host_to_device(host, dev, [0, 1], [2])
        with pytest.raises(TypeError, match="gate"):
            eng.device_to_host(dev, host, [0], [0], gate="now")
        empty = eng.device_to_host(dev, host, [], [])
        assert empty.wait(5) is None


def test_not_started_engine_refuses() -> None:
    dev = gpu_device("block_first", MODEL, 3, seed=1)
    host = pinned_host(3, dev.layout.block_bytes)
    with pytest.raises(RuntimeError, match="not started"):
        CudaCopyEngine().device_to_host(dev, host, [0], [0])


def test_batched_dma_is_used_when_the_driver_offers_it() -> None:
    from kvtier.transfer.cuda.batch import BatchCopier

    if BatchCopier.load() is None:
        pytest.skip("cuda-bindings with cuMemcpyBatchAsync is not installed")
    with CudaCopyEngine() as eng:
        dev = gpu_device("outer_first", MODEL, 16, seed=40)
        before = all_blocks(dev)
        host = pinned_host(16, dev.layout.block_bytes)
        assert eng.device_to_host(dev, host, [3, 9, 1], [7, 2, 12]).wait(10) is None
        assert eng.batch_error is None and eng.uses_batch_copies
    for s, r in ((3, 7), (9, 2), (1, 12)):
        assert torch.equal(host.rows[r], before[s])
