"""Layout detection, fingerprints and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dataplane_helpers import LAYOUT_KINDS, MODEL, engine_tensors

from kvtier.config import KvTierConfig, ModelConfig, blocks_in
from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import LayoutKind, default_layout, detect_layout
from kvtier.transfer.engine import TorchCopyEngine


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
    gapped = {k: torch.zeros(5, 2, 4, 2, 128, dtype=torch.bfloat16)[..., :64] for k in good}
    with pytest.raises(ValueError, match="not contiguous"):
        detect_layout(gapped, MODEL)
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
    assert blocks_in(0.006144, MODEL.block_bytes) == 1000


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


# -- vLLM's GPU layouts (permuted views of dense memory), built on CPU with the same strides --

GPU_MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")
"""make_tiny.py's geometry: FlashAttention hands over (nb, 2, 16, 128) with strides (4096, 128,
256, 1) for it (logical (B, H, T, 2D), memory (B, T, H, 2D): NHD)."""


def _fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return t


def flash_nhd(model: ModelConfig, nb: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """FlashAttention / Triton with the NHD cache layout: logical (B, H, T, 2D), memory (B, T, H,
    2D), as vLLM 0.26 allocates it (``get_kv_cache_stride_order`` (0, 2, 1, 3))."""
    t, h, d2 = model.block_size, model.num_kv_heads, model.outer_dim * model.head_dim
    return {
        f"model.layers.{i}.self_attn.attn": _fill(
            torch.empty(nb, t, h, d2, dtype=torch.bfloat16).permute(0, 2, 1, 3), seed + i
        )
        for i in range(model.num_layers)
    }


def flash_hnd(model: ModelConfig, nb: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same backends with ``VLLM_KV_CACHE_LAYOUT=HND``: logical == memory (B, H, T, 2D)."""
    t, h, d2 = model.block_size, model.num_kv_heads, model.outer_dim * model.head_dim
    return {
        f"model.layers.{i}.self_attn.attn": _fill(
            torch.empty(nb, h, t, d2, dtype=torch.bfloat16), seed + i
        )
        for i in range(model.num_layers)
    }


def test_flash_attention_nhd_permuted_view_is_accepted() -> None:
    tensors = flash_nhd(GPU_MODEL, 8)
    first = next(iter(tensors.values()))
    assert tuple(first.shape) == (8, 2, 16, 128) and first.stride() == (4096, 128, 256, 1)
    assert not first.is_contiguous()
    layout = detect_layout(tensors, GPU_MODEL, backend="FLASH_ATTN")
    assert layout.kind is LayoutKind.BLOCK_FIRST
    assert layout.num_blocks == 8
    assert layout.interior_shape == (16, 2, 128)  # memory order: tokens, heads, 2 * head_dim
    assert layout.physical_order == (0, 2, 1, 3)
    storage = DeviceStorage(layout, tensors)
    # a block's canonical row is its dense region, byte for byte, in memory order
    for b in (0, 5, 7):
        region = first.permute(0, 2, 1, 3)[b].contiguous().view(torch.uint8).reshape(-1)
        assert torch.equal(storage.read_block(b)[: GPU_MODEL.layer_block_bytes], region)


def test_permuted_layout_round_trips_through_a_copy_engine() -> None:
    src = flash_nhd(GPU_MODEL, 6, seed=1)
    dst = flash_nhd(GPU_MODEL, 6, seed=99)
    layout = detect_layout(src, GPU_MODEL)
    assert detect_layout(dst, GPU_MODEL).fingerprint == layout.fingerprint
    a, b = DeviceStorage(layout, src), DeviceStorage(layout, dst)
    host = HostStorage(4, layout.block_bytes)
    host.allocate()
    engine = TorchCopyEngine()
    engine.start()
    try:
        assert engine.device_to_host(a, host, [5, 0, 3], [0, 1, 2]).wait(5) is None
        assert engine.host_to_device(host, b, [0, 1, 2], [1, 2, 4]).wait(5) is None
    finally:
        engine.close()
    for name in src:  # the engine's own (logical) values came back exactly
        assert torch.equal(dst[name][1].view(torch.int16), src[name][5].view(torch.int16))
        assert torch.equal(dst[name][2].view(torch.int16), src[name][0].view(torch.int16))
        assert torch.equal(dst[name][4].view(torch.int16), src[name][3].view(torch.int16))
    untouched = flash_nhd(GPU_MODEL, 6, seed=99)
    for name in src:
        for blk in (0, 3, 5):
            assert torch.equal(dst[name][blk], untouched[name][blk])


def test_fingerprint_records_the_memory_order() -> None:
    square = ModelConfig(num_layers=2, block_size=16, num_kv_heads=16, head_dim=64)
    nhd = detect_layout(flash_nhd(square, 3), square)
    hnd = detect_layout(flash_hnd(square, 3), square)
    # same physical interior shape (T == H), different meaning: different namespaces
    assert nhd.interior_shape == hnd.interior_shape == (16, 16, 128)
    assert nhd.physical_order != hnd.physical_order
    assert nhd.fingerprint != hnd.fingerprint
    assert hnd.physical_order == ()


def test_flash_attention_hnd_and_mla() -> None:
    hnd = detect_layout(flash_hnd(GPU_MODEL, 4), GPU_MODEL, backend="TRITON_ATTN")
    assert hnd.kind is LayoutKind.BLOCK_FIRST and hnd.interior_shape == (2, 16, 128)
    mla = ModelConfig(num_layers=2, block_size=16, num_kv_heads=1, head_dim=576, outer_dim=1)
    lay = detect_layout(
        {f"l{i}": torch.zeros(9, 16, 576, dtype=torch.bfloat16) for i in range(2)}, mla
    )
    assert lay.kind is LayoutKind.BLOCK_FIRST and lay.interior_shape == (16, 576)
    # an MLA cache kept head-dim-major in memory is still one dense region per block
    permuted = {
        f"l{i}": torch.zeros(9, 576, 16, dtype=torch.bfloat16).permute(0, 2, 1) for i in range(2)
    }
    play = detect_layout(permuted, mla)
    assert play.interior_shape == (576, 16) and play.fingerprint != lay.fingerprint


def test_outer_first_permuted_views() -> None:
    o, t, h, d = 2, 4, 2, 64
    # logical (2, nb, T, H, D) whose memory is (nb, 2, T, H, D): a block is one region
    blockwise = {
        f"l{i}": torch.zeros(5, o, t, h, d, dtype=torch.bfloat16).transpose(0, 1) for i in range(3)
    }
    lay = detect_layout(blockwise, MODEL)
    assert lay.kind is LayoutKind.BLOCK_FIRST and lay.physical_order == (1, 0, 2, 3, 4)
    # logical (2, nb, H, T, D) over memory (2, nb, T, H, D): outer-first, heads/tokens swapped
    inner = {
        f"l{i}": torch.zeros(o, 5, t, h, d, dtype=torch.bfloat16).transpose(2, 3) for i in range(3)
    }
    lay2 = detect_layout(inner, MODEL)
    assert lay2.kind is LayoutKind.OUTER_FIRST and lay2.interior_shape == (2, 4, 2, 64)
    assert (
        lay2.fingerprint
        != detect_layout(engine_tensors("outer_first", MODEL, 5), MODEL).fingerprint
    )


def test_cross_layer_tensor_is_one_region_per_block() -> None:
    m = GPU_MODEL
    nb, nl, t, h, d2 = 6, m.num_layers, m.block_size, m.num_kv_heads, 2 * m.head_dim
    # vLLM 0.26 allocates the cross-layer cache in memory order and hands that tensor over
    nhd = torch.zeros(nb, nl, t, h, d2, dtype=torch.bfloat16)
    hnd = torch.zeros(nb, h, nl, t, d2, dtype=torch.bfloat16)
    a = detect_layout(nhd, m, backend="FLASH_ATTN")
    b = detect_layout(hnd, m, backend="FLASH_ATTN")
    assert a.kind is b.kind is LayoutKind.FULLY_CONTIGUOUS
    assert a.num_blocks == b.num_blocks == nb
    assert a.block_shape == (nl, t, h, d2) and b.block_shape == (h, nl, t, d2)
    assert a.fingerprint != b.fingerprint
    _fill(nhd, 5)
    storage = DeviceStorage(a, nhd)
    assert torch.equal(storage.read_block(4), nhd[4].contiguous().view(torch.uint8).reshape(-1))
    # the per-layer views vLLM builds from it (block stride spans all layers) are refused
    per_layer = {f"l{i}": nhd.permute(1, 0, 3, 2, 4)[i] for i in range(nl)}
    with pytest.raises(ValueError, match=r"strides \(4096, 256, 128, 1\)|not a permutation"):
        detect_layout(per_layer, m)


def test_unmovable_layout_is_refused_naming_shape_strides_backend() -> None:
    gapped = {
        f"l{i}": torch.zeros(4, 16, 2, 256, dtype=torch.bfloat16)[..., :128].permute(0, 2, 1, 3)
        for i in range(2)
    }
    with pytest.raises(ValueError) as err:
        detect_layout(gapped, GPU_MODEL, backend="FLASH_ATTN")
    msg = str(err.value)
    assert "(4, 2, 16, 128)" in msg and "(8192, 256, 512, 1)" in msg and "FLASH_ATTN" in msg
    # the block dim inside the region: a block would be many pieces
    interleaved = {
        f"l{i}": torch.zeros(16, 4, 2, 128, dtype=torch.bfloat16).permute(1, 2, 0, 3)
        for i in range(2)
    }
    with pytest.raises(ValueError, match=r"more than one region.*TRITON_ATTN|TRITON_ATTN.*more"):
        detect_layout(interleaved, GPU_MODEL, backend="TRITON_ATTN")
