"""A disk -> device load that fails partway quiesces before it completes.

Why on CPU: the defect is in the loader's bookkeeping, not in CUDA. A failed load used to complete
while its reads were still writing into the shared bounce rows, so the next load could copy a late
read's bytes to the device. Here the real CPU copy engine refuses one copy (an injected fault) while
a read of the same load is held open, and the checks are exact: the failed load stays pending until
that read ends, its queued reads never run, blocks that landed before the failure count as loaded,
and the next load's bytes are exact.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kvtier.config import ModelConfig
from kvtier.storage.block_file import BlockHeader
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.layout import detect_layout
from kvtier.transfer.copy_api import CopyBatch, CopyFuture
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader
from kvtier.transfer.engine import TorchCopyEngine

MODEL = ModelConfig(num_layers=2, block_size=8, num_kv_heads=2, head_dim=64)  # 8 KiB blocks
NUM_BLOCKS = 24


class _HeldDisk(DiskStorage):
    """A real ``DiskStorage`` whose read of ``held`` starts, says so, and waits for ``release``
    (a slow disk); every read is logged in order."""

    def __init__(self, root: Path, fingerprint: int, block_bytes: int, held: int) -> None:
        super().__init__(root, fingerprint, block_bytes)
        self.held = held
        self.held_started = threading.Event()
        self.release = threading.Event()
        self.reads: list[int] = []
        self._lock = threading.Lock()

    def read(self, sequence_hash: int, row: torch.Tensor) -> BlockHeader:
        with self._lock:
            self.reads.append(sequence_hash)
        if sequence_hash == self.held:
            self.held_started.set()
            assert self.release.wait(20), "test never released the held read"
        return super().read(sequence_hash, row)


class _RefusingEngine(TorchCopyEngine):
    """The real CPU engine, except that host->device call number ``refuse_call`` raises (once
    ``before`` is set, if given), as a copy that cannot be issued does."""

    def __init__(self, refuse_call: int, before: threading.Event | None) -> None:
        super().__init__()
        self.refuse_call = refuse_call
        self.before = before
        self.h2d_calls = 0

    def _submit(self, batch: CopyBatch) -> CopyFuture:
        if not batch.to_host:
            self.h2d_calls += 1
            if self.h2d_calls == self.refuse_call:
                if self.before is not None:
                    assert self.before.wait(20)
                raise RuntimeError("injected: copy could not be issued")
        return super()._submit(batch)


def _device(seed: int) -> DeviceStorage:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (NUM_BLOCKS * MODEL.num_layers * 2 * 8 * 2 * 64 * 2,),
        dtype=torch.uint8,
        generator=g,
    )
    tensors = raw.view(torch.bfloat16).view(NUM_BLOCKS, MODEL.num_layers, 2, 8, 2, 64)
    return DeviceStorage(detect_layout(tensors, MODEL), tensors)


def _stored(disk: DiskStorage, hashes: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randint(0, 256, (disk.block_bytes,), dtype=torch.uint8, generator=g) for _ in hashes
    ]
    for h, r in zip(hashes, rows, strict=True):
        disk.write(h, r)
    return rows


def test_failed_load_waits_for_its_reads_and_next_load_is_exact(tmp_path: Path) -> None:
    dev = _device(seed=5)
    a_hashes = [100 + i for i in range(8)]  # two groups of 4; a_hashes[4] is held open
    b_hashes = [200 + i for i in range(8)]
    disk = _HeldDisk(tmp_path, dev.layout.fingerprint, dev.layout.block_bytes, held=a_hashes[4])
    disk.open()
    _stored(disk, a_hashes, seed=6)
    b_rows = _stored(disk, b_hashes, seed=7)
    before = [dev.read_block(i) for i in range(NUM_BLOCKS)]
    a_targets, b_targets = list(range(8)), list(range(8, 16))
    # The first copy (group 0 of A) is refused once A's group 1 read of a_hashes[4] is running.
    eng = _RefusingEngine(refuse_call=1, before=disk.held_started)
    eng.start()
    io = DiskIo(disk, threads=1)
    io.start()
    loader = DiskToDeviceLoader(io, eng, DiskLoadConfig(group_blocks=4))
    loader.start()
    try:
        a = loader.load(dev, a_hashes, a_targets)
        b = loader.load(dev, b_hashes, b_targets)
        assert disk.held_started.wait(20)
        # A's copy was refused, but its held read still writes a bounce row: A must not end.
        with pytest.raises(TimeoutError):
            a.wait(0.5)
        assert not b.done()
        disk.release.set()
        a.wait(20)
        b.wait(20)
        failed_a, failed_b = a.failed, b.failed
    finally:
        disk.release.set()
        loader.close()
        io.close()
        eng.close()
    assert sorted(failed_a) == a_targets
    assert all("injected: copy could not be issued" in why for why in failed_a.values())
    assert a.loaded == ()
    assert failed_b == {}
    assert b.loaded == tuple(b_targets)
    # A's queued reads (a_hashes[5:]) were cancelled, never run; B read each block once.
    assert disk.reads == [*a_hashes[:5], *b_hashes]
    for i in range(NUM_BLOCKS):
        want = b_rows[i - 8] if i in b_targets else before[i]
        assert torch.equal(dev.read_block(i), want), i


def test_blocks_landed_before_a_failure_count_as_loaded(tmp_path: Path) -> None:
    dev = _device(seed=8)
    hashes = [300 + i for i in range(8)]
    disk = _HeldDisk(tmp_path, dev.layout.fingerprint, dev.layout.block_bytes, held=-1)
    disk.open()
    rows = _stored(disk, hashes, seed=9)
    before = [dev.read_block(i) for i in range(NUM_BLOCKS)]
    targets = [23, 1, 2, 3, 4, 5, 6, 7]
    # Group 0's copy is issued; group 1's is refused while group 0's may still be in flight.
    eng = _RefusingEngine(refuse_call=2, before=None)
    eng.start()
    io = DiskIo(disk, threads=2)
    io.start()
    loader = DiskToDeviceLoader(io, eng, DiskLoadConfig(group_blocks=4))
    loader.start()
    try:
        handle = loader.load(dev, hashes, targets)
        handle.wait(20)
        failed = handle.failed
    finally:
        loader.close()
        io.close()
        eng.close()
    assert sorted(failed) == sorted(targets[4:])
    assert handle.loaded == tuple(targets[:4])
    assert all("injected: copy could not be issued" in why for why in failed.values())
    for i, t in enumerate(targets):
        want = rows[i] if i < 4 else before[t]
        assert torch.equal(dev.read_block(t), want), (i, t)
    assert eng.h2d_calls == 2
