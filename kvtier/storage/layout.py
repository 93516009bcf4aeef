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
    "layout_fingerprint",
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

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if len(self.layer_names) != self.model.num_layers:
            raise ValueError(
                f"layout has {len(self.layer_names)} layers, model has {self.model.num_layers}"
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
    return xxhash.xxh3_64_intdigest(json.dumps(desc, separators=(",", ":")).encode(), 0)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same storage seen as flat uint8 (bit-exact copies of any dtype, fp8 included)."""
    if not tensor.is_contiguous():
        raise ValueError(
            f"KV tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not "
            "contiguous; kvtier needs each KV tensor to be one dense region"
        )
    return tensor.reshape(-1).view(torch.uint8)


def _check_tensor(name: str, tensor: torch.Tensor, model: ModelConfig) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"KV tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.element_size() != model.itemsize:
        raise ValueError(
            f"KV tensor {name!r} has dtype {tensor.dtype} ({tensor.element_size()} bytes), the "
            f"model config says {model.dtype} ({model.itemsize} bytes)"
        )
    if not tensor.is_contiguous():
        byte_view(tensor)  # raises with the shape and strides


def detect_layout(
    tensors: Mapping[str, torch.Tensor] | torch.Tensor,
    model: ModelConfig,
    *,
    kind: LayoutKind | None = None,
) -> KvLayout:
    """Work out the layout of an engine's KV tensors, or raise naming what does not fit.

    A single tensor is fully contiguous ``[num_blocks, num_layers, ...]``. A dict holds one tensor
    per layer (in layer order) of one shape: block-first when dim 0 is the block count, outer-first
    when dim 0 is ``outer_dim`` and dim 1 the block count. When both readings fit (``num_blocks ==
    outer_dim``) pass ``kind``.
    """
    layer_elems = model.layer_block_bytes // model.itemsize
    if isinstance(tensors, torch.Tensor):
        _check_tensor("kv", tensors, model)
        if kind not in (None, LayoutKind.FULLY_CONTIGUOUS):
            raise ValueError(f"a single KV tensor is fully contiguous, not {kind}")
        block_elems = layer_elems * model.num_layers
        shape = tuple(tensors.shape)
        if tensors.dim() < 2 or tensors.numel() != shape[0] * block_elems:
            raise ValueError(
                f"KV tensor of shape {shape} is not [num_blocks, ...] with {block_elems} elements "
                f"per block ({model.num_layers} layers x {layer_elems})"
            )
        names = tuple(f"layer_{i}" for i in range(model.num_layers))
        interior = (layer_elems,)
        return KvLayout(LayoutKind.FULLY_CONTIGUOUS, model, shape[0], names, interior)

    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError("KV tensors must be one tensor or a non-empty dict layer_name -> tensor")
    if len(tensors) != model.num_layers:
        raise ValueError(f"got {len(tensors)} KV tensors, the model has {model.num_layers} layers")
    names = tuple(tensors)
    first = tensors[names[0]]
    for name, t in tensors.items():
        _check_tensor(name, t, model)
        if tuple(t.shape) != tuple(first.shape) or t.dtype != first.dtype:
            raise ValueError(
                f"KV tensor {name!r} is {tuple(t.shape)} {t.dtype}, layer {names[0]!r} is "
                f"{tuple(first.shape)} {first.dtype}; all layers must match"
            )
    shape = tuple(first.shape)
    if first.numel() % layer_elems or first.dim() < 2:
        raise ValueError(
            f"KV tensor shape {shape} is not a whole number of blocks of {layer_elems} elements"
        )
    nb = first.numel() // layer_elems
    outer = model.outer_dim
    block_first = shape[0] == nb
    outer_first = shape[0] == outer and shape[1] == nb and first.dim() >= 3
    if kind is None:
        if block_first and outer_first and outer != 1:
            raise ValueError(
                f"KV tensor shape {shape} reads both as block-first and outer-first "
                f"({nb} blocks == outer dim {outer}); pass kind= explicitly"
            )
        if block_first:
            kind = LayoutKind.BLOCK_FIRST
        elif outer_first:
            kind = LayoutKind.OUTER_FIRST
        else:
            raise ValueError(
                f"KV tensor shape {shape} is neither [num_blocks={nb}, ...] nor "
                f"[{outer}, num_blocks={nb}, ...]"
            )
    if kind is LayoutKind.BLOCK_FIRST and block_first:
        return KvLayout(kind, model, nb, names, shape[1:])
    if kind is LayoutKind.OUTER_FIRST and outer_first:
        return KvLayout(kind, model, nb, names, (outer, *shape[2:]))
    raise ValueError(f"KV tensor shape {shape} does not fit layout {kind}")


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
