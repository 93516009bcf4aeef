"""``detect_layout`` on the exact KV tensors vLLM 0.26's CUDA attention backends hand a connector.

The tensors are built on CPU the way vLLM 0.26's GPU model runner builds them on the GPU:
``_reshape_attention_kv_cache`` (``vllm/v1/worker/gpu/attn_utils.py``: a flat int8 buffer viewed
in the backend's memory order, then permuted back to its logical shape, or ``as_strided`` over
padded pages), ``allocate_uniform_kv_caches`` (``kv_connector_model_runner_mixin.py``: the
cross-layer tensor) and ``prepare_kernel_block_sizes`` / ``select_common_block_size``
(``vllm/v1/worker/utils.py``: the kernel block a backend supports, a scheduler block split into
``k`` kernel blocks). Each backend's ``get_kv_cache_shape``, ``get_kv_cache_stride_order`` and
supported kernel block sizes are copied below from vLLM 0.26.0's source.

Accepted layouts must move every byte exactly (checked against the block's own rows); the others
must be refused naming shape, strides and backend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kvtier.config import ModelConfig
from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import LayoutKind, detect_layout, kernel_split
from kvtier.transfer.engine import TorchCopyEngine

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Backend:
    """One vLLM 0.26 CUDA attention backend: its KV shape, stride orders and kernel blocks."""

    name: str
    shape: Callable[[int, int, int, int], Shape]  # (num_blocks, block_size, kv_heads, head_size)
    order: Shape  # get_kv_cache_stride_order()
    cross_order: Shape  # get_kv_cache_stride_order(include_num_layers_dimension=True)
    kernel_sizes: tuple[int, ...] = ()  # int-format supported kernel block sizes
    multiple_of: int = 0  # MultipleOf(n) supported kernel block sizes (0: none)

    @property
    def label(self) -> str:
        """The backend's name, with its cache layout for the per-head ones (test ids)."""
        if len(self.order) == 4:
            return f"{self.name}-{'HND' if self.order == (0, 1, 2, 3) else 'NHD'}"
        return self.name

    def kernel_block(self, block_size: int) -> int:
        """``select_common_block_size`` for a group of this backend alone."""
        if self.multiple_of and block_size % self.multiple_of == 0:
            return block_size
        if block_size in self.kernel_sizes:
            return block_size
        for size in sorted(self.kernel_sizes, reverse=True):
            if block_size % size == 0:
                return size
        raise ValueError(f"{self.name}: no kernel block size for {block_size}")


def _flash_shape(nb: int, t: int, h: int, d: int) -> Shape:
    return (nb, h, t, 2 * d)  # flash_attn.py / triton_attn.py: logical (B, H, N, 2*D)


def _mla_shape(nb: int, t: int, h: int, d: int) -> Shape:
    return (nb, t, d)  # MLACommonBackend: (num_blocks, block_size, head_size), no K/V axis


FLASH_NHD = Backend("FLASH_ATTN", _flash_shape, (0, 2, 1, 3), (1, 0, 3, 2, 4), multiple_of=16)
FLASH_HND = Backend("FLASH_ATTN", _flash_shape, (0, 1, 2, 3), (1, 2, 0, 3, 4), multiple_of=16)
TRITON_NHD = Backend("TRITON_ATTN", _flash_shape, (0, 2, 1, 3), (1, 0, 3, 2, 4), multiple_of=16)
TRITON_HND = Backend("TRITON_ATTN", _flash_shape, (0, 1, 2, 3), (1, 2, 0, 3, 4), multiple_of=16)
FLASH_ATTN_MLA = Backend("FLASH_ATTN_MLA", _mla_shape, (0, 1, 2), (1, 0, 2, 3), multiple_of=16)
FLASHMLA = Backend("FLASHMLA", _mla_shape, (0, 1, 2), (1, 0, 2, 3), kernel_sizes=(64,))
TRITON_MLA = Backend("TRITON_MLA", _mla_shape, (0, 1, 2), (1, 0, 2, 3), multiple_of=16)
PER_HEAD = (FLASH_NHD, FLASH_HND, TRITON_NHD, TRITON_HND)
MLA = (FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA)


def model_for(backend: Backend, block_size: int, layers: int = 2) -> ModelConfig:
    """vLLM's KV spec of the tests' models: a Llama-like (2 KV heads of 64) or DeepSeek-V2 MLA
    (one latent of kv_lora_rank 512 + rope 64 = 576, ``outer_dim`` 1)."""
    if backend in MLA:
        return ModelConfig(layers, block_size, 1, 576, dtype="bfloat16", outer_dim=1)
    return ModelConfig(layers, block_size, 2, 64, dtype="bfloat16")


def _reshape(raw: torch.Tensor, shape: Shape, order: Shape) -> torch.Tensor:
    """``_reshape_attention_kv_cache`` without padding or packing: memory order, then permuted."""
    physical = tuple(shape[i] for i in order)
    inv = [order.index(i) for i in range(len(order))]
    return raw.view(torch.bfloat16).view(physical).permute(*inv)


def _fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, t.shape, generator=g))
    return t


def per_layer(
    backend: Backend, model: ModelConfig, nb: int, seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """One tensor per layer as vLLM 0.26 registers them, and the kernel blocks per block."""
    kernel = backend.kernel_block(model.block_size)
    k = model.block_size // kernel
    shape = backend.shape(nb * k, kernel, model.num_kv_heads, model.head_dim)
    out = {}
    for i in range(model.num_layers):
        raw = torch.zeros(nb * model.layer_block_bytes, dtype=torch.int8)
        out[f"model.layers.{i}.self_attn.attn"] = _fill(
            _reshape(raw, shape, backend.order), seed * 100 + i
        )
    return out, k


def cross_layer(backend: Backend, model: ModelConfig, nb: int, seed: int = 0) -> torch.Tensor:
    """``allocate_uniform_kv_caches``: the one tensor ``register_cross_layers_kv_cache`` gets."""
    kernel = backend.kernel_block(model.block_size)
    k = model.block_size // kernel
    shape = (
        model.num_layers,
        *backend.shape(nb * k, kernel, model.num_kv_heads, model.head_dim),
    )
    physical = tuple(shape[i] for i in backend.cross_order)
    raw = torch.zeros(nb * model.block_bytes, dtype=torch.int8)
    return _fill(raw.view(torch.bfloat16).view(physical), seed)


def _rows_of(t: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """The bytes of a block's ``k`` kernel rows (logical dim 0), in the tensor's memory order."""
    from kvtier.storage.layout import physical_view

    rows = physical_view(t)[block * k : (block + 1) * k]
    return rows.contiguous().view(torch.uint8).reshape(-1)


CASES = [
    (FLASH_NHD, 16, (8, 2, 16, 128), (4096, 128, 256, 1), (16, 2, 128)),
    (FLASH_HND, 16, (8, 2, 16, 128), (4096, 2048, 128, 1), (2, 16, 128)),
    (TRITON_NHD, 16, (8, 2, 16, 128), (4096, 128, 256, 1), (16, 2, 128)),
    (TRITON_HND, 16, (8, 2, 16, 128), (4096, 2048, 128, 1), (2, 16, 128)),
    (FLASH_ATTN_MLA, 16, (8, 16, 576), (9216, 576, 1), (16, 576)),
    (FLASHMLA, 64, (8, 64, 576), (36864, 576, 1), (64, 576)),
    (TRITON_MLA, 16, (8, 16, 576), (9216, 576, 1), (16, 576)),
    # FlashMLA's kernel block is 64 tokens: a 128-token scheduler block is 2 kernel rows
    (FLASHMLA, 128, (16, 64, 576), (36864, 576, 1), (2, 64, 576)),
    (FLASHMLA, 256, (32, 64, 576), (36864, 576, 1), (4, 64, 576)),
]


@pytest.mark.parametrize(
    ("backend", "block_size", "shape", "strides", "interior"),
    CASES,
    ids=[f"{c[0].label}-{c[1]}" for c in CASES],
)
def test_per_layer_tensors_are_exact(
    backend: Backend, block_size: int, shape: Shape, strides: Shape, interior: Shape
) -> None:
    model = model_for(backend, block_size)
    tensors, k = per_layer(backend, model, 8)
    first = next(iter(tensors.values()))
    assert (tuple(first.shape), first.stride()) == (shape, strides), "not vLLM 0.26's tensor"
    layout = detect_layout(tensors, model, backend=backend.name)
    assert layout.kind is LayoutKind.BLOCK_FIRST
    assert (layout.num_blocks, layout.kernel_blocks, layout.interior_shape) == (8, k, interior)
    assert layout.backend == backend.name
    storage = DeviceStorage(layout, tensors)
    lbb = model.layer_block_bytes
    for b in (0, 3, 7):
        row = storage.read_block(b)
        for i, t in enumerate(tensors.values()):
            assert torch.equal(row[i * lbb : (i + 1) * lbb], _rows_of(t, b, k)), (backend, b, i)


FLASH_NHD_32 = Backend("FLASH_ATTN", _flash_shape, (0, 2, 1, 3), (1, 0, 3, 2, 4), (32,))
"""NHD with a 32-token kernel block (as a group whose other backend supports only 32 would get):
a 128-token block is 4 permuted kernel rows."""


@pytest.mark.parametrize(("backend", "k"), [(FLASHMLA, 2), (FLASH_NHD_32, 4)], ids=["mla", "nhd"])
def test_kernel_split_blocks_round_trip_through_a_copy_engine(backend: Backend, k: int) -> None:
    """Blocks of k kernel rows go device -> host -> device and land as the same kernel rows."""
    model = model_for(backend, 128)
    src, got_k = per_layer(backend, model, 6, seed=1)
    dst, _ = per_layer(backend, model, 6, seed=50)
    untouched, _ = per_layer(backend, model, 6, seed=50)
    assert got_k == k
    layout = detect_layout(src, model, backend=backend.name)
    assert layout.kernel_blocks == k and layout.num_blocks == 6
    a, b = DeviceStorage(layout, src), DeviceStorage(detect_layout(dst, model), dst)
    host = HostStorage(3, layout.block_bytes)
    host.allocate()
    engine = TorchCopyEngine()
    engine.start()
    try:
        assert engine.device_to_host(a, host, [5, 0, 3], [0, 1, 2]).wait(5) is None
        assert engine.host_to_device(host, b, [0, 1, 2], [1, 2, 4]).wait(5) is None
    finally:
        engine.close()
    for name in src:
        for s, d in ((5, 1), (0, 2), (3, 4)):
            got = dst[name][d * k : (d + 1) * k].view(torch.int16)
            assert torch.equal(got, src[name][s * k : (s + 1) * k].view(torch.int16)), (s, d)
        for blk in (0, 3, 5):  # blocks not written keep every kernel row
            rows = slice(blk * k, (blk + 1) * k)
            assert torch.equal(
                dst[name][rows].view(torch.int16), untouched[name][rows].view(torch.int16)
            ), blk


CROSS = [
    (FLASH_NHD, 16, (6, 2, 16, 2, 128)),  # (blocks, layers, tokens, heads, 2*head_dim)
    (FLASH_HND, 16, (6, 2, 2, 16, 128)),  # (blocks, heads, layers, tokens, 2*head_dim)
    (TRITON_NHD, 16, (6, 2, 16, 2, 128)),
    (FLASH_ATTN_MLA, 16, (6, 2, 16, 576)),  # (blocks, layers, tokens, 576)
    (FLASHMLA, 64, (6, 2, 64, 576)),
    (TRITON_MLA, 16, (6, 2, 16, 576)),
    (FLASHMLA, 128, (12, 2, 64, 576)),  # 2 kernel blocks, each across all layers
]


@pytest.mark.parametrize(
    ("backend", "block_size", "shape"), CROSS, ids=[f"{c[0].label}-{c[1]}" for c in CROSS]
)
def test_cross_layer_tensor_is_exact(backend: Backend, block_size: int, shape: Shape) -> None:
    model = model_for(backend, block_size)
    t = cross_layer(backend, model, 6, seed=3)
    assert tuple(t.shape) == shape and t.is_contiguous()
    layout = detect_layout(t, model, backend=backend.name)
    k = shape[0] // 6
    assert layout.kind is LayoutKind.FULLY_CONTIGUOUS
    assert (layout.num_blocks, layout.kernel_blocks) == (6, k)
    assert layout.block_shape == ((k,) if k > 1 else ()) + shape[1:]
    storage = DeviceStorage(layout, t)
    for b in (0, 2, 5):
        want = t[b * k : (b + 1) * k].contiguous().view(torch.uint8).reshape(-1)
        assert torch.equal(storage.read_block(b), want), b
    # the per-layer views vLLM binds to attention from it (block stride spans every layer)
    inv = [backend.cross_order.index(i) for i in range(t.dim())]
    views = {f"l{i}": t.permute(*inv)[i] for i in range(model.num_layers)}
    with pytest.raises(ValueError, match=backend.name):
        detect_layout(views, model, backend=backend.name)


def test_fingerprint_records_the_kernel_split() -> None:
    model = model_for(FLASHMLA, 128)
    split, k = per_layer(FLASHMLA, model, 4)
    assert k == 2
    # the same bytes per block handed over unsplit, (num_blocks, 2, 64, 576): another namespace
    unsplit = {n: t.reshape(4, 2, 64, 576) for n, t in split.items()}
    whole = {n: t.reshape(4, 128, 576) for n, t in split.items()}
    a = detect_layout(split, model, backend="FLASHMLA")
    b = detect_layout(unsplit, model)
    c = detect_layout(whole, model)
    assert a.interior_shape == b.interior_shape == (2, 64, 576)
    assert (a.kernel_blocks, b.kernel_blocks, c.kernel_blocks) == (2, 1, 1)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    four, _ = per_layer(FLASHMLA, model_for(FLASHMLA, 256), 4)
    assert detect_layout(four, model_for(FLASHMLA, 256)).kernel_blocks == 4


def test_kernel_split_rule() -> None:
    m = model_for(FLASHMLA, 128)
    assert kernel_split(8, 8, m, (128, 576)) == 1
    assert kernel_split(16, 8, m, (64, 576)) == 2
    assert kernel_split(16, 8, m, (32, 2, 576)) == 0  # 2 kernel rows must hold 64 tokens each
    assert kernel_split(24, 8, m, (42, 576)) == 0  # 3 does not divide 128
    assert kernel_split(12, 8, m, (64, 576)) == 0  # not a whole number per block
    layout = detect_layout(per_layer(FLASHMLA, m, 2)[0], m)
    for bad in (0, 3, True):  # 3 does not divide 128; a bool is not a count
        with pytest.raises(ValueError, match="kernel_blocks must be a positive int dividing"):
            dataclasses.replace(layout, kernel_blocks=bad)


def _refused(tensors: object, model: ModelConfig, backend: str, *parts: str) -> str:
    with pytest.raises(ValueError) as err:
        detect_layout(tensors, model, backend=backend)  # type: ignore[arg-type]
    msg = str(err.value)
    for part in (*parts, f"attention backend {backend}"):
        assert part in msg, (part, msg)
    return msg


def test_padded_pages_are_refused_naming_shape_strides_backend() -> None:
    """``page_size_padded``: vLLM reads each page through a block stride past its bytes."""
    model = model_for(FLASHMLA, 64)
    page = model.layer_block_bytes // 2 + 64  # elements of one padded page
    raw = torch.zeros(5 * page, dtype=torch.bfloat16)
    t = torch.as_strided(raw, (5, 64, 576), (page, 576, 1))
    tensors = {f"l{i}": t for i in range(2)}
    _refused(tensors, model, "FLASHMLA", "(5, 64, 576)", f"({page}, 576, 1)", "not contiguous")


def test_packed_pages_are_refused() -> None:
    """``_get_kv_cache_config_packed`` (DeepSeek-V4, several groups): a layer's pages sit
    inside a per-block stride that holds every layer."""
    model = model_for(TRITON_MLA, 16)
    lbb = model.layer_block_bytes
    raw = torch.zeros(4 * 2 * lbb, dtype=torch.int8)
    views = {
        f"l{i}": raw.view(-1, 2 * lbb)[:, i * lbb : (i + 1) * lbb]
        .view(torch.bfloat16)
        .view(4, 16, 576)
        for i in range(2)
    }
    _refused(views, model, "TRITON_MLA", "(4, 16, 576)", "(18432, 576, 1)")


def test_kv_first_and_mismatched_splits_are_refused() -> None:
    model = model_for(FLASH_NHD, 16)
    # a kernel block split inside K/V-first memory: (2, k*nb, ...) whose block is 2k pieces
    kv_first = {
        f"l{i}": torch.zeros(2, 16, 2, 8, 64, dtype=torch.bfloat16).transpose(0, 1)
        for i in range(2)
    }
    _refused(kv_first, model, "FLASH_ATTN", "(16, 2, 2, 8, 64)", "more than one region")
    # rows that are not whole kernel blocks of this block size
    mla = model_for(TRITON_MLA, 64)
    odd = {f"l{i}": torch.zeros(8, 32 * 576, dtype=torch.bfloat16) for i in range(2)}
    _refused(odd, mla, "TRITON_MLA", "(8, 18432)", "neither")
    # a cross-layer tensor with its layer dim outermost (MLACommonBackend's "unsupported")
    layers_first = torch.zeros(2, 8, 64, 576, dtype=torch.bfloat16)
    _refused(layers_first, mla, "TRITON_MLA", "(2, 8, 64, 576)", "elements per block")


def test_every_case_is_what_vllm_allocates() -> None:
    """The helpers above reproduce vLLM's arithmetic: bytes per layer, kernel blocks."""
    for backend in (*PER_HEAD, *MLA):
        for bs in (16, 64, 128) if backend is not FLASHMLA else (64, 128, 256):
            model = model_for(backend, bs)
            tensors, k = per_layer(backend, model, 3)
            first = next(iter(tensors.values()))
            assert first.numel() * 2 == 3 * model.layer_block_bytes
            assert first.shape[0] == 3 * k
            assert k == (bs // 64 if backend is FLASHMLA else 1)
            assert math.prod(first.shape[1:]) * k == model.layer_block_bytes // 2
