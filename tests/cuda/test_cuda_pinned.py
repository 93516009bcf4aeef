"""ChunkedPinner on a real GPU: background progress, DMA across registrations, failures reported."""

from __future__ import annotations

import pytest
import torch
from cuda_helpers import MODEL, gpu_device, needs_cuda

from kvtier.storage.host import HostStorage
from kvtier.storage.pinned import ChunkedPinner, PinningConfig, PinningError
from kvtier.transfer.copy_api import CopyError
from kvtier.transfer.cuda import CudaCopyConfig, CudaCopyEngine

pytestmark = [pytest.mark.cuda, needs_cuda]

ROW = MODEL.block_bytes  # 32 KiB


def _host(rows: int) -> HostStorage:
    host = HostStorage(rows, ROW)  # pageable, lazily mapped: pinned below, chunk by chunk
    host.allocate()
    host.rows.fill_(0x5A)
    return host


def test_pins_in_chunks_and_reports_progress() -> None:
    host = _host(40)
    pinner = ChunkedPinner(host.rows, PinningConfig(chunk_bytes=3 * ROW))
    assert pinner.chunk_rows == 3 and pinner.pinned_rows == 0
    assert pinner.progress().pinned_bytes == 0
    with pinner:
        assert pinner.wait_rows(40, timeout=30)
        p = pinner.progress()
        assert p.done and p.pinned_rows == 40 and p.pinned_bytes == 40 * ROW
        assert p.total_bytes == 40 * ROW and p.error is None and p.fraction == 1.0
    assert pinner.pinned_rows == 0  # closed: unregistered


@pytest.mark.parametrize("mode", ["dma", "kernel"])
def test_copies_across_registrations_are_exact(mode: str) -> None:
    dev = gpu_device("outer_first", MODEL, 32, seed=11)
    before = [dev.read_block(i) for i in range(32)]
    host = _host(20)
    with ChunkedPinner(host.rows, PinningConfig(chunk_bytes=3 * ROW)) as pinner:
        pinner.wait_rows(20, timeout=30)
        with CudaCopyEngine(CudaCopyConfig(mode=mode)) as eng:
            eng.attach_pinner(host, pinner)
            src = list(range(4, 16))
            rows = list(range(2, 14))  # one run over four registrations
            assert eng.device_to_host(dev, host, src, rows).wait(10) is None
            for s, r in zip(src, rows, strict=True):
                assert torch.equal(host.rows[r], before[s])
            assert eng.host_to_device(host, dev, rows, list(range(20, 32))).wait(10) is None
    for s, t in zip(src, range(20, 32), strict=True):
        assert torch.equal(dev.read_block(t), before[s])


def test_rows_not_yet_pinned_are_refused() -> None:
    dev = gpu_device("block_first", MODEL, 4, seed=12)
    host = _host(8)
    pinner = ChunkedPinner(host.rows, PinningConfig(chunk_bytes=4 * ROW))  # never started
    with CudaCopyEngine() as eng:
        eng.attach_pinner(host, pinner)
        err = eng.device_to_host(dev, host, [0], [5]).wait(10)
    assert isinstance(err, CopyError) and isinstance(err.__cause__, PinningError)
    assert "host row 5 is not page-locked" in str(err) and "still running" in str(err)
    assert bool((host.rows == 0x5A).all())


def test_pinning_failure_is_reported_not_degraded() -> None:
    host = _host(8)
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    # Someone else already registered rows 4..7: the pinner's second chunk must fail loudly.
    rc = cudart.cudaHostRegister(host.rows[4].data_ptr(), 4 * ROW, 0)
    assert int(getattr(rc, "value", rc)) == 0
    try:
        pinner = ChunkedPinner(host.rows, PinningConfig(chunk_bytes=4 * ROW))
        with pinner:
            with pytest.raises(PinningError, match=r"rows 4\.\.7"):
                pinner.wait_rows(8, timeout=30)
            p = pinner.progress()
            assert p.pinned_rows == 4 and not p.done and p.error is not None
            assert pinner.wait_rows(4, timeout=1)  # what did pin stays usable
    finally:
        cudart.cudaHostUnregister(host.rows[4].data_ptr())


def test_pinner_checks_its_buffer() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        ChunkedPinner(torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="page boundary"):
        ChunkedPinner(torch.zeros(4097, dtype=torch.uint8)[1:].view(1, 4096))
