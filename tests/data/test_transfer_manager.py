"""TransferManager on its own: bounded in-flight work, onboards first, refusals, close."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dataplane_helpers import MODEL, engine_tensors

from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import detect_layout
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader
from kvtier.transfer.engine import TorchCopyEngine
from kvtier.transfer.manager import TransferError, TransferManager, TransferPath

D2H, H2D = TransferPath.DEVICE_TO_HOST, TransferPath.HOST_TO_DEVICE


def _manager(
    *,
    seed: int,
    host: HostStorage | None,
    disk_io: DiskIo | None,
    max_inflight_blocks: int = 512,
    staging_blocks: int = 64,
) -> TransferManager:
    """A manager over 8 random device blocks, a started ``TorchCopyEngine`` and (with
    ``disk_io``) a started loader."""
    tensors = engine_tensors("block_first", MODEL, 8, seed=seed)
    device = DeviceStorage(detect_layout(tensors, MODEL), tensors)
    engine = TorchCopyEngine()
    engine.start()
    loader = None
    if disk_io is not None:
        loader = DiskToDeviceLoader(disk_io, engine, DiskLoadConfig.for_staging(staging_blocks))
        loader.start()
    return TransferManager(
        engine,
        device=device,
        host=host,
        disk_io=disk_io,
        loader=loader,
        num_layers=MODEL.num_layers,
        max_inflight_blocks=max_inflight_blocks,
    )


@pytest.fixture
def tm() -> Iterator[TransferManager]:
    host = HostStorage(8, MODEL.block_bytes)
    host.allocate()
    manager = _manager(seed=5, host=host, disk_io=None, max_inflight_blocks=2)
    yield manager
    manager.close(1.0)
    manager.engine.close()


def _drain(tm: TransferManager, handles: list) -> None:  # type: ignore[type-arg]
    for _ in range(10_000):
        tm.poll()
        if all(h.done() for h in handles):
            return
        threading.Event().wait(0.001)
    raise AssertionError("transfers did not finish")


def test_in_flight_work_is_bounded(tm: TransferManager) -> None:
    gate = threading.Event()
    a = tm.submit(D2H, [1], [0], [0], gate=gate)
    b = tm.submit(D2H, [2], [1], [1], gate=gate)
    c = tm.submit(D2H, [3], [2], [2], gate=gate)
    assert tm.inflight_blocks == 2 and tm.pending() == 3
    assert a.started_at is not None and b.started_at is not None and c.started_at is None
    assert repr(c).endswith("queued)")
    gate.set()
    _drain(tm, [a, b, c])
    assert all(h.ok for h in (a, b, c)) and tm.inflight_blocks == 0
    assert c.seconds is not None and c.seconds >= 0
    assert torch.equal(tm.host.rows[2], tm.device.read_block(2))  # type: ignore[union-attr]


def test_a_large_batch_runs_alone(tm: TransferManager) -> None:
    big = tm.submit(D2H, [1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 2, 3])
    assert big.started_at is not None  # larger than the bound, but nothing else is in flight
    _drain(tm, [big])
    assert big.ok


def test_onboards_start_before_queued_offloads(tm: TransferManager) -> None:
    gate = threading.Event()
    first = tm.submit(D2H, [1, 2], [0, 1], [0, 1], gate=gate)  # fills the bound
    offload = tm.submit(D2H, [3], [2], [2])
    onboard = tm.submit(H2D, [1], [0], [5])
    assert offload.started_at is None and onboard.started_at is None
    gate.set()
    while not first.done():
        tm.poll()
    assert onboard.started_at is not None
    assert offload.started_at is None or offload.started_at >= onboard.started_at
    _drain(tm, [offload, onboard])


def test_refusals_name_the_problem(tm: TransferManager) -> None:
    with pytest.raises(ValueError, match="needs a disk tier"):
        tm.submit(TransferPath.HOST_TO_DISK, [1], [0], [])
    with pytest.raises(ValueError, match="1 hashes but 2 source"):
        tm.submit(D2H, [1], [0, 1], [0])
    bad = tm.submit(D2H, [1], [9], [0])  # out of range: fails the handle, not the caller
    _drain(tm, [bad])
    assert isinstance(bad.error, TransferError)
    assert "device block id 9 out of range" in str(bad.error)
    assert bad.error.failed_hashes == (1,) and bad.error.failed_device_block_ids == (9,)


def test_close_cancels_queued_batches(tm: TransferManager) -> None:
    gate = threading.Event()
    running = tm.submit(D2H, [1, 2], [0, 1], [0, 1], gate=gate)
    queued = tm.submit(D2H, [3], [2], [2])
    threading.Timer(0.05, gate.set).start()
    settled = tm.close(5.0)
    assert set(settled) == {running, queued}
    assert running.ok
    assert queued.error is not None and "cancelled" in str(queued.error)
    with pytest.raises(RuntimeError, match="closed"):
        tm.submit(D2H, [4], [3], [3])


def test_disk_load_that_cannot_start_settles_as_failed(tmp_path: Path) -> None:
    """DiskIo refusing the reads (not started) fails the batch; it must not stay in flight."""
    disk = DiskStorage(tmp_path, 1, MODEL.block_bytes)
    disk.open()
    tm = _manager(seed=6, host=None, disk_io=DiskIo(disk), staging_blocks=4)  # DiskIo not started
    load = tm.submit(TransferPath.DISK_TO_DEVICE, [7, 8], [], [2, 3])
    _drain(tm, [load])
    assert load.error is not None and "DiskIo is not started" in str(load.error)
    assert load.error.failed_hashes == (7, 8) and load.error.failed_device_block_ids == (2, 3)
    assert tm.inflight_blocks == 0 and tm.pending() == 0
    assert load.wait_data(timeout=1.0) is False
    assert load.wait_layer(MODEL.num_layers - 1, timeout=1.0) is False
    tm.engine.close()


def test_device_to_disk_whose_writes_cannot_start_fails_its_waiters(tmp_path: Path) -> None:
    """Stage 1 (device -> staging) lands, then DiskIo refuses the writes: the batch settles
    failed, and a thread waiting for its data is told so instead of waiting forever."""
    disk = DiskStorage(tmp_path, 1, MODEL.block_bytes)
    disk.open()
    io = DiskIo(disk)
    io.start()
    tm = _manager(seed=6, host=None, disk_io=io, staging_blocks=4)
    gate = threading.Event()
    store = tm.submit(TransferPath.DEVICE_TO_DISK, [7], [1], [], gate=gate)
    io.close()  # the writes will be refused
    gate.set()
    _drain(tm, [store])
    assert store.error is not None and "DiskIo is not started" in str(store.error)
    assert tm.inflight_blocks == 0
    assert store.wait_data(timeout=1.0) is False
    assert store.wait_layer(0, timeout=1.0) is False
    tm.engine.close()
