"""Layout detection, fingerprints and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dataplane_helpers import LAYOUT_KINDS, MODEL, engine_tensors

from kvtier.config import KvTierConfig, ModelConfig
from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import LayoutKind, default_layout, detect_layout


def test_model_sizes() -> None:
    assert MODEL.itemsize == 2
    assert MODEL.inner_elems == 4 * 2 * 64
    assert MODEL.layer_block_bytes == 2 * 4 * 2 * 64 * 2
    assert MODEL.block_bytes == 3 * 2048


@pytest.mark.parametrize(
    ("kind", "expected", "interior"),
    [
        ("fully_contiguous", LayoutKind.FULLY_CONTIGUOUS, (1024,)),
        ("block_first", LayoutKind.BLOCK_FIRST, (2, 4, 2, 64)),
        ("outer_first", LayoutKind.OUTER_FIRST, (2, 4, 2, 64)),
        ("vllm_cpu", LayoutKind.BLOCK_FIRST, (2, 4, 128)),
    ],
)
def test_detect(kind: str, expected: LayoutKind, interior: tuple[int, ...]) -> None:
    layout = detect_layout(engine_tensors(kind, MODEL, 5), MODEL)
    assert layout.kind is expected
    assert layout.num_blocks == 5
    assert layout.interior_shape == interior
    assert layout.block_bytes == 6144
    if kind != "fully_contiguous":
        assert layout.layer_names == tuple(f"model.layers.{i}.attn" for i in range(3))


def test_detect_mla() -> None:
    mla = ModelConfig(num_layers=2, block_size=4, num_kv_heads=1, head_dim=96, outer_dim=1)
    layout = detect_layout(
        {f"l{i}": torch.zeros(7, 4, 96, dtype=torch.bfloat16) for i in range(2)}, mla
    )
    assert layout.kind is LayoutKind.BLOCK_FIRST
    assert layout.interior_shape == (4, 96)
    assert layout.layer_block_bytes == 4 * 96 * 2


def test_ambiguous_layout_needs_kind() -> None:
    tensors = {f"l{i}": torch.zeros(2, 2, 4, 2, 64, dtype=torch.bfloat16) for i in range(3)}
    with pytest.raises(ValueError, match="pass kind= explicitly"):
        detect_layout(tensors, MODEL)
    assert detect_layout(tensors, MODEL, kind=LayoutKind.OUTER_FIRST).kind is LayoutKind.OUTER_FIRST


def test_detect_errors_name_the_problem() -> None:
    good = engine_tensors("block_first", MODEL, 5)
    assert isinstance(good, dict)
    with pytest.raises(ValueError, match="2 KV tensors, the model has 3 layers"):
        detect_layout(dict(list(good.items())[:2]), MODEL)
    with pytest.raises(ValueError, match=r"dtype torch\.float32"):
        detect_layout({k: v.float() for k, v in good.items()}, MODEL)
    bad = dict(good)
    bad["model.layers.2.attn"] = torch.zeros(6, 2, 4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="all layers must match"):
        detect_layout(bad, MODEL)
    strided = {k: v.transpose(2, 3) for k, v in good.items()}
    with pytest.raises(ValueError, match="not contiguous"):
        detect_layout(strided, MODEL)
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        detect_layout({k: torch.zeros(5, 100, dtype=torch.bfloat16) for k in good}, MODEL)
    with pytest.raises(ValueError, match="elements per block"):
        detect_layout(torch.zeros(5, 3, 1000, dtype=torch.bfloat16), MODEL)


def test_fingerprint_namespaces_geometry_dtype_layout() -> None:
    base = detect_layout(engine_tensors("block_first", MODEL, 5), MODEL)
    assert (
        base.fingerprint
        == detect_layout(engine_tensors("block_first", MODEL, 9), MODEL).fingerprint
    )
    others = {
        detect_layout(engine_tensors("outer_first", MODEL, 5), MODEL).fingerprint,
        detect_layout(engine_tensors("vllm_cpu", MODEL, 5), MODEL).fingerprint,
        detect_layout(engine_tensors("fully_contiguous", MODEL, 5), MODEL).fingerprint,
    }
    f16 = dataclasses.replace(MODEL, dtype="float16")
    others.add(detect_layout(engine_tensors("block_first", f16, 5), f16).fingerprint)
    bs8 = dataclasses.replace(MODEL, block_size=8, num_kv_heads=1)
    others.add(detect_layout(engine_tensors("block_first", bs8, 5), bs8).fingerprint)
    assert base.fingerprint not in others
    assert len(others) == 5


@pytest.mark.parametrize("kind", list(LayoutKind))
def test_default_layout_allocates_what_it_describes(kind: LayoutKind) -> None:
    layout = default_layout(MODEL, kind, 6)
    storage = DeviceStorage.allocate(layout)
    redetected = detect_layout(storage.tensors, MODEL, kind=kind)
    assert redetected.fingerprint == layout.fingerprint
    assert redetected.num_blocks == 6


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_device_block_row_round_trip(kind: str) -> None:
    tensors = engine_tensors(kind, MODEL, 5, seed=3)
    storage = DeviceStorage(detect_layout(tensors, MODEL), tensors)
    rows = [storage.read_block(i) for i in range(5)]
    storage.write_block(0, rows[4])
    storage.write_block(4, rows[0])
    assert torch.equal(storage.read_block(0), rows[4])
    assert torch.equal(storage.read_block(4), rows[0])
    assert torch.equal(storage.read_block(2), rows[2])
    with pytest.raises(IndexError, match="device block 5 out of range"):
        storage.read_block(5)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelConfig(num_layers=1, block_size=16, num_kv_heads=1, head_dim=64, dtype="float64")
    with pytest.raises(ValueError, match="outer_dim must be 2"):
        ModelConfig(num_layers=1, block_size=16, num_kv_heads=1, head_dim=64, outer_dim=3)
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        ModelConfig(num_layers=0, block_size=16, num_kv_heads=1, head_dim=64)
    with pytest.raises(ValueError, match="disk_blocks > 0 needs disk_dir"):
        KvTierConfig(model=MODEL, disk_blocks=4)
    with pytest.raises(ValueError, match="device_layout must be one of"):
        KvTierConfig(model=MODEL, device_layout="weird")
    with pytest.raises(ValueError, match="io_threads must be a positive int"):
        KvTierConfig(model=MODEL, io_threads=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        KvTierConfig(model=MODEL).host_blocks = 3  # type: ignore[misc]
    for field in ("disk_o_direct", "disk_filter", "disk_fsync"):
        with pytest.raises(TypeError, match=f"{field} must be a bool, got 'false'"):
            KvTierConfig(model=MODEL, **{field: "false"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="host_pinned must be a bool or None, got 1"):
        KvTierConfig(model=MODEL, host_pinned=1)  # type: ignore[arg-type]
    assert KvTierConfig(model=MODEL, host_pinned=None).host_pinned is None
    assert KvTierConfig.blocks_for_bytes(MODEL, 0.006144) == 1000


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_views_of_a_block_and_a_block_layer(kind: str) -> None:
    tensors = engine_tensors(kind, MODEL, 5, seed=4)
    storage = DeviceStorage(detect_layout(tensors, MODEL), tensors)
    row = storage.read_block(3)
    lbb = MODEL.layer_block_bytes
    views = storage.block_view(3)
    assert len(views) == 3
    for layer, v in enumerate(views):
        assert v.dtype == torch.bfloat16 and v.numel() * 2 == lbb
        assert torch.equal(
            v.contiguous().view(torch.uint8).reshape(-1), row[layer * lbb : (layer + 1) * lbb]
        )
    storage.layer_view(3, 1).fill_(1.0)  # a view: writes reach the engine tensor
    assert torch.equal(storage.read_block(3)[:lbb], row[:lbb])
    assert not torch.equal(storage.read_block(3)[lbb : 2 * lbb], row[lbb : 2 * lbb])
    host = HostStorage(2, MODEL.block_bytes)
    host.allocate()
    host.rows[1] = row
    assert torch.equal(host.layer_view(1, 2, lbb), row[2 * lbb :])
    with pytest.raises(IndexError, match="outside the row"):
        host.layer_view(1, 3, lbb)
