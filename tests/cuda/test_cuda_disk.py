"""Disk -> device through pinned bounce rows: exact bytes, a corrupt file reported, not served."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cuda_helpers import gpu_device, needs_cuda

from kvtier.config import ModelConfig
from kvtier.storage.disk import DiskStorage
from kvtier.transfer.cuda import CudaCopyEngine
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader

pytestmark = [pytest.mark.cuda, needs_cuda]

MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)  # 16 KiB blocks


def test_disk_to_device_double_buffered(tmp_path: Path) -> None:
    dev = gpu_device("outer_first", MODEL, 40, seed=31)
    disk = DiskStorage(tmp_path, dev.layout.fingerprint, dev.layout.block_bytes)
    disk.open()
    n = 23  # 6 groups of 4: both bounce slots reused several times, a short last group
    rows = [torch.randint(0, 256, (dev.layout.block_bytes,), dtype=torch.uint8) for _ in range(n)]
    hashes = [1000 + i for i in range(n)]
    for h, r in zip(hashes, rows, strict=True):
        disk.write(h, r)
    # Corrupt block 7's payload on disk: it must be reported and never reach the device.
    path = disk.path(hashes[7])
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    targets = list(range(40 - n, 40))
    before = [dev.read_block(t) for t in targets]
    io = DiskIo(disk, threads=3)
    io.start()
    with CudaCopyEngine() as eng:
        loader = DiskToDeviceLoader(io, eng, DiskLoadConfig(group_blocks=4), pin_memory=True)
        loader.start()
        try:
            handle = loader.load(dev, [*hashes, 999999], [*targets, 0])
            handle.wait(30)
            failed = handle.failed
        finally:
            loader.close()
            io.close()
    assert set(failed) == {targets[7], 0}
    assert "checksum" in failed[targets[7]]
    assert targets[7] not in handle.loaded
    for i, t in enumerate(targets):
        want = before[i] if i == 7 else rows[i]
        assert torch.equal(dev.read_block(t), want), i
