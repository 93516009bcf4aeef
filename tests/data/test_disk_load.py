"""The one disk -> device loader on the CPU engine: exact bytes, bad files reported, layer waits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dataplane_helpers import MODEL, engine_tensors, random_rows

from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.layout import detect_layout
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader
from kvtier.transfer.engine import TorchCopyEngine


@pytest.mark.parametrize(("kind", "slots"), [("block_first", 2), ("outer_first", 3)])
def test_slot_ring_load_on_cpu(kind: str, slots: int, tmp_path: Path) -> None:
    tensors = engine_tensors(kind, MODEL, 40, seed=3)
    dev = DeviceStorage(detect_layout(tensors, MODEL), tensors)
    disk = DiskStorage(tmp_path, dev.layout.fingerprint, dev.layout.block_bytes)
    disk.open()
    n = 23  # 6 groups of 4: every bounce slot reused, a short last group
    rows = random_rows(n, dev.layout.block_bytes, seed=4)
    hashes = [1000 + i for i in range(n)]
    for h, r in zip(hashes, rows, strict=True):
        disk.write(h, r)
    path = disk.path(hashes[7])  # corrupt block 7's payload: reported, never copied
    data = bytearray(path.read_bytes())
    data[4096 + 10] ^= 0xFF  # a payload byte (the header is 4096 bytes)
    path.write_bytes(bytes(data))
    targets = list(range(40 - n, 40))
    before = [dev.read_block(t) for t in [*targets, 0]]
    io = DiskIo(disk, threads=3)
    io.start()
    engine = TorchCopyEngine()
    engine.start()
    loader = DiskToDeviceLoader(io, engine, DiskLoadConfig(group_blocks=4, slots=slots))
    loader.start()
    try:
        handle = loader.load(dev, [*hashes, 999999], [*targets, 0])  # 999999: no such file
        assert all(handle.wait_layer(layer, timeout=30) for layer in range(MODEL.num_layers))
        assert handle.wait(30) is None  # bad files are per-block failures, not a failed copy
    finally:
        loader.close()
        engine.close()
        io.close()
    assert set(handle.failed) == {targets[7], 0}
    assert "checksum" in handle.failed[targets[7]]
    assert handle.bad_files == {targets[7]: True, 0: False}  # corrupt (removed) / missing
    assert not disk.path(hashes[7]).exists()
    assert len(handle.copies) == 6 and handle.loaded == tuple(t for t in targets if t != targets[7])
    for i, t in enumerate(targets):
        want = before[i] if i == 7 else rows[i]
        assert torch.equal(dev.read_block(t), want), i
    assert torch.equal(dev.read_block(0), before[-1])
