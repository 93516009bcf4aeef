"""KV cache layouts: how an engine's tensors hold blocks, detected from the tensors themselves.

Why this exists: attention backends allocate the KV cache in different shapes, and kvtier must copy
a block out of any of them and put it back bit for bit. Three layouts cover vLLM's backends:

- ``FULLY_CONTIGUOUS``: one tensor ``[num_blocks, num_layers, ...]``; one block is one region.
- ``BLOCK_FIRST``: one tensor per layer, ``[num_blocks, ...]`` (e.g. ``[num_blocks, 2, T, H, D]``,
  or vLLM 0.32's CPU backend ``[num_blocks, H, T, 2 * D]``); a (block, layer) is one region.
- ``OUTER_FIRST``: one tensor per layer, ``[outer, num_blocks, ...]`` (e.g. ``[2, num_blocks, T, H,
  D]``); a (block, layer) is ``outer`` regions, one per K/V.

Host and disk tiers always store a block in one canonical form, a row of ``block_bytes`` holding the
layers in order, each layer's piece holding its outer indices in order, each piece the engine's own
interior bytes. The interior order (e.g. tokens-major or heads-major) is the engine's and is part of
the fingerprint, so bytes are only ever served to a layout that reads them the same way.

vLLM's GPU backends hand over *permuted views*: FlashAttention and Triton allocate the logical
shape ``(num_blocks, H, T, 2 * D)`` in the memory order ``(num_blocks, T, H, 2 * D)`` for NHD
(strides ``(T*H*2D, 2D, H*2D, 1)``), so the tensor is not contiguous, yet each block is still one
dense region. kvtier reads such a tensor in its memory order (``physical_view``): the interior it
records (``interior_shape``) is the physical one, and ``physical_order`` (the logical dims in memory
order) goes into the fingerprint, so bytes stored under one order are never read under another. The
cross-layer tensor of vLLM 0.26 (``register_cross_layers_kv_cache``: one dense region per block
across all layers, e.g. ``(num_blocks, L, T, H, 2D)`` for NHD or ``(num_blocks, H, L, T, 2D)`` for
HND) is ``FULLY_CONTIGUOUS`` with its physical ``block_shape`` in the fingerprint. MLA
backends (FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA) hand one tensor per layer ``(num_blocks, T,
head_dim)`` with no K/V axis (``outer_dim`` 1), or a cross-layer ``(num_blocks, L, T, head_dim)``.
When the backend's kernel block is smaller than the scheduler's (FlashMLA: 64 tokens), vLLM's GPU
model runner splits each block into ``k`` kernel blocks: the block dim has ``k * num_blocks`` rows
and block ``b`` is rows ``k*b .. k*b + k - 1``, still one dense region; ``kernel_blocks`` (``k``)
goes into the fingerprint (``kernel_split``). A tensor that is not a dense region per block
(overlapping or gapped strides, padded or packed pages, or a block dim that is not outermost in
memory) is refused with an error naming its shape, strides and the backend.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import xxhash

from kvtier.config import ModelConfig

__all__ = [
    "KvLayout",
    "LayoutKind",
    "byte_view",
    "default_layout",
    "detect_layout",
    "kernel_split",
    "layout_fingerprint",
    "physical_view",
]

FORMAT_VERSION = 1
"""Version of the canonical block byte format; part of every fingerprint."""


class LayoutKind(enum.Enum):
    """How the device tensors hold blocks (see the module docstring)."""

    FULLY_CONTIGUOUS = "fully_contiguous"
    BLOCK_FIRST = "block_first"
    OUTER_FIRST = "outer_first"


@dataclass(frozen=True)
class KvLayout:
    """A validated description of the device KV tensors.

    ``layer_names`` lists the layers in canonical order (the order of the engine's dict, or
    ``layer_0..`` for one fully contiguous tensor); ``interior_shape`` is the shape of one
    (block, layer) piece without the block dim (and, for ``OUTER_FIRST``, with the outer dim first).
    """

    kind: LayoutKind
    model: ModelConfig
    num_blocks: int
    layer_names: tuple[str, ...]
    interior_shape: tuple[int, ...]
    physical_order: tuple[int, ...] = ()
    """The tensor's logical dims in memory order when that differs from the logical order (a
    permuted view); ``()`` when the tensor is contiguous as handed over."""
    block_shape: tuple[int, ...] = ()
    """``FULLY_CONTIGUOUS`` only: one block's physical shape (every dim after the block dim)."""
    kernel_blocks: int = 1
    """Kernel blocks per block: vLLM split each block into this many rows of its tensors (see
    ``kernel_split``); 1 when the tensors' block dim is the block count."""
    backend: str = ""
    """The attention backend that allocated the tensors, when known (for error messages)."""

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if len(self.layer_names) != self.model.num_layers:
            raise ValueError(
                f"layout has {len(self.layer_names)} layers, model has {self.model.num_layers}"
            )
        k = self.kernel_blocks
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or self.model.block_size % k:
            raise ValueError(
                f"kernel_blocks must be a positive int dividing block_size "
                f"{self.model.block_size}, got {k!r}"
            )
        if len(set(self.layer_names)) != len(self.layer_names):
            raise ValueError(f"duplicate layer names in {self.layer_names}")
        want = self.model.layer_block_bytes // self.model.itemsize
        if math.prod(self.interior_shape) != want:
            raise ValueError(
                f"interior shape {self.interior_shape} holds {math.prod(self.interior_shape)} "
                f"elements, a (block, layer) of this model holds {want}"
            )

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (all layers) in the canonical host/disk row."""
        return self.model.block_bytes

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one (block, layer) piece."""
        return self.model.layer_block_bytes

    @property
    def fingerprint(self) -> int:
        """64-bit namespace of stored bytes: model geometry, dtype, block size, layout, format."""
        return layout_fingerprint(self)


def layout_fingerprint(layout: KvLayout) -> int:
    """xxh3_64 of the compact JSON of everything that decides how a stored block's bytes read."""
    m = layout.model
    desc = {
        "format": FORMAT_VERSION,
        "num_layers": m.num_layers,
        "block_size": m.block_size,
        "num_kv_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "outer_dim": m.outer_dim,
        "dtype": m.dtype,
        "layout": layout.kind.value,
        "interior_shape": list(layout.interior_shape),
    }
    # Added only when set, so that the fingerprints of contiguous layouts stay what they were.
    if layout.physical_order:
        desc["physical_order"] = list(layout.physical_order)
    if layout.block_shape:
        desc["block_shape"] = list(layout.block_shape)
    if layout.kernel_blocks != 1:
        desc["kernel_blocks"] = layout.kernel_blocks
    return xxhash.xxh3_64_intdigest(json.dumps(desc, separators=(",", ":")).encode(), 0)


def memory_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The tensor's dims ordered from the largest stride to the smallest, when the tensor is one
    dense region under that order (a permutation of a contiguous tensor), else None.

    Size-1 dims carry no bytes and keep their logical place relative to each other.
    """
    shape, strides = tuple(tensor.shape), tensor.stride()
    if tensor.is_contiguous():
        return tuple(range(tensor.dim()))
    order = sorted(range(tensor.dim()), key=lambda d: (-strides[d] if shape[d] > 1 else 0, d))
    # size-1 dims: put each right after the dim before it in logical order (no bytes either way)
    big = [d for d in order if shape[d] > 1]
    expect = 1
    for d in reversed(big):
        if strides[d] != expect:
            return None
        expect *= shape[d]
    small = [d for d in range(tensor.dim()) if shape[d] == 1]
    out = list(big)
    for d in small:
        prev = [i for i, x in enumerate(out) if x < d]
        out.insert(prev[-1] + 1 if prev else 0, d)
    return tuple(out)


def physical_view(tensor: torch.Tensor, *, backend: str = "") -> torch.Tensor:
    """The same memory as a contiguous tensor whose dims are in memory order (a view, no copy).

    Raises naming shape, strides and backend when the tensor is not one dense region.
    """
    order = memory_order(tensor)
    if order is None:
        raise ValueError(
            f"{_what(tensor, backend)} is not contiguous and not a permutation of one dense "
            "region; kvtier cannot move its blocks exactly"
        )
    view = tensor.permute(order)
    assert view.is_contiguous()
    return view


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same storage seen as flat uint8 in memory order (bit-exact copies of any dtype, fp8
    included). A permuted view of dense memory is read in its memory order (``physical_view``)."""
    return physical_view(tensor).reshape(-1).view(torch.uint8)


def _what(tensor: torch.Tensor, backend: str) -> str:
    """``KV tensor of shape .. and strides ..`` (and the backend): how every refusal starts."""
    by = f" (attention backend {backend})" if backend else ""
    return f"KV tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()}{by}"


def _check_tensor(name: str, tensor: torch.Tensor, model: ModelConfig, backend: str = "") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"KV tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.element_size() != model.itemsize:
        raise ValueError(
            f"KV tensor {name!r} has dtype {tensor.dtype} ({tensor.element_size()} bytes), the "
            f"model config says {model.dtype} ({model.itemsize} bytes)"
        )
    physical_view(tensor, backend=backend)  # raises with the shape, strides and backend


def kernel_split(rows: int, num_blocks: int, model: ModelConfig, inner: tuple[int, ...]) -> int:
    """Kernel blocks per block when a block dim of ``rows`` entries holds ``num_blocks`` blocks
    (1: no split), or 0 when it cannot.

    vLLM's GPU model runner splits each scheduler block into ``k`` kernel blocks when the
    attention backend supports only a smaller block (FlashMLA: 64 tokens; a 128-token block is
    two): the tensor then has ``k * num_blocks`` rows of ``block_size / k`` tokens, and block
    ``b`` is rows ``k*b .. k*b + k - 1`` (``BlockTable.map_to_kernel_blocks``), one dense region
    when the block dim is outermost in memory. ``inner`` (the other dims) must hold the kernel
    block's token count.
    """
    if rows == num_blocks:
        return 1
    if num_blocks <= 0 or rows % num_blocks:
        return 0
    k = rows // num_blocks
    if model.block_size % k or model.block_size // k not in inner:
        return 0
    return k


def detect_layout(
    tensors: Mapping[str, torch.Tensor] | torch.Tensor,
    model: ModelConfig,
    *,
    kind: LayoutKind | None = None,
    backend: str = "",
) -> KvLayout:
    """Work out the layout of an engine's KV tensors, or raise naming what does not fit.

    A single tensor is fully contiguous ``[num_blocks, ...]`` in memory order (vLLM's cross-layer
    tensor). A dict holds one tensor per layer (in layer order) of one shape: block-first when
    dim 0 is the block count, outer-first when dim 0 is ``outer_dim`` and dim 1 the block count.
    A block dim of ``k * num_blocks`` kernel blocks is read as ``num_blocks`` blocks of ``k``
    (see ``kernel_split``). When both readings fit (``num_blocks == outer_dim``) pass ``kind``.
    Permuted views are read in memory order (see the module docstring); ``backend`` names the
    attention backend in errors.
    """
    layer_elems = model.layer_block_bytes // model.itemsize
    if isinstance(tensors, torch.Tensor):
        return _detect_cross_layer(tensors, model, kind, backend)

    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError("KV tensors must be one tensor or a non-empty dict layer_name -> tensor")
    if len(tensors) != model.num_layers:
        raise ValueError(f"got {len(tensors)} KV tensors, the model has {model.num_layers} layers")
    names = tuple(tensors)
    first = tensors[names[0]]
    for name, t in tensors.items():
        _check_tensor(name, t, model, backend)
        if (
            tuple(t.shape) != tuple(first.shape)
            or t.dtype != first.dtype
            or t.stride() != first.stride()
        ):
            raise ValueError(
                f"KV tensor {name!r} is {tuple(t.shape)} {t.dtype} strides {t.stride()}, layer "
                f"{names[0]!r} is {tuple(first.shape)} {first.dtype} strides {first.stride()}; "
                "all layers must match"
            )
    shape = tuple(first.shape)
    if first.numel() % layer_elems or first.dim() < 2:
        raise ValueError(
            f"{_what(first, backend)} is not a whole number of blocks of {layer_elems} elements"
        )
    nb = first.numel() // layer_elems
    outer = model.outer_dim
    k_block = kernel_split(shape[0], nb, model, shape[1:])
    k_outer = (
        kernel_split(shape[1], nb, model, shape[2:])
        if shape[0] == outer and first.dim() >= 3
        else 0
    )
    if kind is None:
        if k_block and k_outer and outer != 1:
            raise ValueError(
                f"{_what(first, backend)} reads both as block-first and outer-first "
                f"({nb} blocks, outer dim {outer}); pass kind= explicitly"
            )
        if k_block:
            kind = LayoutKind.BLOCK_FIRST
        elif k_outer:
            kind = LayoutKind.OUTER_FIRST
        else:
            raise ValueError(
                f"{_what(first, backend)} is neither [num_blocks={nb}, ...] nor "
                f"[{outer}, num_blocks={nb}, ...] (nor a block dim of whole kernel blocks)"
            )
    k = {LayoutKind.BLOCK_FIRST: k_block, LayoutKind.OUTER_FIRST: k_outer}.get(kind, 0)
    if not k:
        raise ValueError(f"{_what(first, backend)} does not fit layout {kind}")
    split = (k,) if k > 1 else ()
    contiguous = first.is_contiguous()
    order = memory_order(first)
    assert order is not None  # _check_tensor refused the rest
    phys = () if contiguous else order
    mem_shape = tuple(shape[d] for d in order)
    block_dim = 0 if kind is LayoutKind.BLOCK_FIRST else 1
    big = [d for d in order if shape[d] > 1]
    if kind is LayoutKind.OUTER_FIRST and (contiguous or big[:2] == [0, 1]):
        interior = (outer, *split, *mem_shape[2:])
        return KvLayout(kind, model, nb, names, interior, phys, kernel_blocks=k, backend=backend)
    if shape[block_dim] == 1 or big[0] == block_dim:
        # One dense region per block, whatever the logical order: block-first in memory.
        at = order.index(block_dim)
        inner = (*split, *mem_shape[:at], *mem_shape[at + 1 :])
        return KvLayout(
            LayoutKind.BLOCK_FIRST, model, nb, names, inner, phys, kernel_blocks=k, backend=backend
        )
    raise ValueError(
        f"{_what(first, backend)} holds a block in more than one region (memory order "
        f"{order}: the block dim {block_dim} is not outermost); kvtier cannot move such blocks "
        "exactly"
    )


def _detect_cross_layer(
    tensor: torch.Tensor, model: ModelConfig, kind: LayoutKind | None, backend: str
) -> KvLayout:
    """One tensor: ``FULLY_CONTIGUOUS``, a block (all its layers) one region in memory order."""
    _check_tensor("kv", tensor, model, backend)
    if kind not in (None, LayoutKind.FULLY_CONTIGUOUS):
        raise ValueError(f"a single KV tensor is fully contiguous, not {kind}")
    layer_elems = model.layer_block_bytes // model.itemsize
    block_elems = layer_elems * model.num_layers
    shape = tuple(physical_view(tensor, backend=backend).shape)
    nb = tensor.numel() // block_elems
    k = kernel_split(shape[0], nb, model, shape[1:]) if tensor.dim() >= 2 else 0
    if not k or tensor.numel() != nb * block_elems or model.num_layers not in shape[1:]:
        raise ValueError(
            f"{_what(tensor, backend)} is not [num_blocks, ...] in memory order with "
            f"{block_elems} elements per block ({model.num_layers} layers x {layer_elems})"
        )
    order = memory_order(tensor)
    block_shape = (*((k,) if k > 1 else ()), *shape[1:])
    return KvLayout(
        LayoutKind.FULLY_CONTIGUOUS,
        model,
        nb,
        tuple(f"layer_{i}" for i in range(model.num_layers)),
        (layer_elems,),
        physical_order=() if tensor.is_contiguous() or order is None else order,
        block_shape=block_shape if block_shape != (model.num_layers, layer_elems) else (),
        kernel_blocks=k,
        backend=backend,
    )


def default_layout(model: ModelConfig, kind: LayoutKind, num_blocks: int) -> KvLayout:
    """The layout kvtier uses when it allocates a G1 of ``num_blocks`` itself.

    Interiors are ``[outer, tokens, heads, head_dim]`` (vLLM's GPU backends); a fully contiguous
    tensor is ``[num_blocks, num_layers, layer_elems]``.
    """
    names = tuple(f"layer_{i}" for i in range(model.num_layers))
    if kind is LayoutKind.FULLY_CONTIGUOUS:
        interior: tuple[int, ...] = (model.layer_block_bytes // model.itemsize,)
    else:
        interior = (model.outer_dim, model.block_size, model.num_kv_heads, model.head_dim)
    return KvLayout(kind, model, num_blocks, names, interior)
