"""TorchCopyEngine: every layout, both directions, gates, layer-wise completion, failures."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from dataplane_helpers import LAYOUT_KINDS, MODEL, engine_tensors, random_rows

from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import detect_layout
from kvtier.transfer.batch_copy import runs
from kvtier.transfer.copy_api import CopyEngine, CopyError, CopyFuture, CopyHandle
from kvtier.transfer.engine import TorchCopyEngine


@pytest.fixture
def engine() -> Iterator[TorchCopyEngine]:
    e = TorchCopyEngine()
    e.start()
    yield e
    e.close()


def _device(kind: str, seed: int = 0) -> DeviceStorage:
    tensors = engine_tensors(kind, MODEL, 7, seed=seed)
    return DeviceStorage(detect_layout(tensors, MODEL), tensors)


def test_protocols_are_met(engine: TorchCopyEngine) -> None:
    assert isinstance(engine, CopyEngine)
    assert isinstance(CopyFuture(2), CopyHandle)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_round_trip_bit_exact(kind: str, engine: TorchCopyEngine) -> None:
    dev = _device(kind, seed=1)
    before = [dev.read_block(i) for i in range(7)]
    host = HostStorage(5, dev.layout.block_bytes)
    host.allocate()
    host.rows.zero_()
    h = engine.device_to_host(dev, host, [6, 0, 3], [2, 4, 0])
    assert h.wait(5) is None
    assert torch.equal(host.rows[2], before[6])
    assert torch.equal(host.rows[4], before[0])
    assert torch.equal(host.rows[0], before[3])
    assert torch.equal(host.rows[1], torch.zeros(dev.layout.block_bytes, dtype=torch.uint8))
    # canonical row = layer pieces in order
    lbb = dev.layout.layer_block_bytes
    assert torch.equal(host.rows[2][lbb : 2 * lbb], dev.read_block(6)[lbb : 2 * lbb])
    # put them back elsewhere, over random data
    new = random_rows(3, dev.layout.block_bytes, seed=9)
    for i, r in zip((1, 2, 5), new, strict=True):
        dev.write_block(i, r)
    h = engine.host_to_device(host, dev, [2, 4, 0], [1, 2, 5])
    assert h.wait(5) is None
    assert all(h.layer_done(layer) for layer in range(3))
    assert torch.equal(dev.read_block(1), before[6])
    assert torch.equal(dev.read_block(2), before[0])
    assert torch.equal(dev.read_block(5), before[3])
    for i in (0, 3, 4, 6):
        assert torch.equal(dev.read_block(i), before[i])


def test_gate_holds_the_copy_until_set(engine: TorchCopyEngine) -> None:
    dev = _device("block_first")
    host = HostStorage(2, dev.layout.block_bytes)
    host.allocate()
    gate = threading.Event()
    h = engine.device_to_host(dev, host, [0], [1], gate)
    with pytest.raises(TimeoutError):
        h.wait(0.05)
    assert not h.done() and not h.layer_done(0)
    dev.write_block(0, random_rows(1, dev.layout.block_bytes, seed=4)[0])  # written before the gate
    gate.set()
    assert h.wait(5) is None
    assert torch.equal(host.rows[1], dev.read_block(0))


def test_layers_complete_in_order() -> None:
    f = CopyFuture(3)
    f.complete_layer(0)
    assert f.layer_done(0) and not f.layer_done(1) and not f.done()
    assert f.wait_layer(0, 0)
    f.complete_layer(2)
    assert f.done() and f.wait(0) is None
    g = CopyFuture(2)
    g.fail(RuntimeError("boom"))
    assert g.done() and not g.wait_layer(1, 0)
    assert isinstance(g.error, RuntimeError)
    with pytest.raises(IndexError):
        g.wait_layer(2)


def test_bad_ids_are_refused_before_anything_moves(engine: TorchCopyEngine) -> None:
    dev = _device("outer_first")
    host = HostStorage(2, dev.layout.block_bytes)
    host.allocate()
    with pytest.raises(ValueError, match="device block id 7 out of range"):
        engine.device_to_host(dev, host, [7], [0])
    with pytest.raises(ValueError, match="host block id 2 out of range"):
        engine.host_to_device(host, dev, [2], [0])
    with pytest.raises(ValueError, match="2 device ids but 1 host ids"):
        engine.device_to_host(dev, host, [0, 1], [0])
    wrong = HostStorage(2, 4096)
    wrong.allocate()
    with pytest.raises(ValueError, match="host rows are 4096 bytes"):
        engine.device_to_host(dev, wrong, [0], [0])


def test_failure_completes_handle_with_error_naming_blocks(engine: TorchCopyEngine) -> None:
    dev = _device("block_first")
    host = HostStorage(2, dev.layout.block_bytes)
    host.allocate()
    h = engine.device_to_host(dev, host, [3], [1], gate=object())  # not a usable gate
    err = h.wait(5)
    assert isinstance(err, CopyError)
    assert err.device_ids == (3,) and err.host_ids == (1,)
    assert "device blocks [3]" in str(err)
    assert not h.wait_layer(2, 0)


def test_close_fails_a_copy_whose_gate_never_opens() -> None:
    e = TorchCopyEngine()
    e.start()
    dev = _device("block_first")
    host = HostStorage(1, dev.layout.block_bytes)
    host.allocate()
    gate = threading.Event()
    h = e.device_to_host(dev, host, [0], [0], gate)
    e.close()
    gate.set()  # let the worker thread exit
    assert h.wait(5) is not None
    assert "closed before" in str(h.error)


def test_not_started() -> None:
    dev = _device("block_first")
    host = HostStorage(1, dev.layout.block_bytes)
    with pytest.raises(RuntimeError, match="not started"):
        TorchCopyEngine().device_to_host(dev, host, [0], [0])


def test_runs_group_consecutive_pairs() -> None:
    assert runs([4, 5, 6, 9, 1, 2], [0, 1, 2, 3, 7, 9]) == [
        (4, 0, 3),
        (9, 3, 1),
        (1, 7, 1),
        (2, 9, 1),
    ]
    assert runs([], []) == []


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_round_trip_with_runs(kind: str, engine: TorchCopyEngine) -> None:
    dev = _device(kind, seed=2)
    before = [dev.read_block(i) for i in range(7)]
    host = HostStorage(6, dev.layout.block_bytes)
    host.allocate()
    assert engine.device_to_host(dev, host, [1, 2, 3, 5], [2, 3, 4, 0]).wait(5) is None
    for h, d in ((2, 1), (3, 2), (4, 3), (0, 5)):
        assert torch.equal(host.rows[h], before[d])
    assert engine.host_to_device(host, dev, [2, 3, 4], [4, 5, 6]).wait(5) is None
    for d, src in ((4, 1), (5, 2), (6, 3)):
        assert torch.equal(dev.read_block(d), before[src])
    assert torch.equal(dev.read_block(0), before[0])
