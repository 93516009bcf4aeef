"""Helpers of the CUDA tests: GPU-resident engine tensors in every layout, pinned host rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvtier.config import ModelConfig
from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import detect_layout

# The layout shapes are the data-plane tests' (one table for CPU and GPU); pytest puts only this
# folder on sys.path when it runs the CUDA tests alone.
_DATA_TESTS = str(Path(__file__).resolve().parents[1] / "data")
if _DATA_TESTS not in sys.path:
    sys.path.append(_DATA_TESTS)

from dataplane_helpers import (  # type: ignore[import-not-found]  # noqa: E402
    LAYOUT_KINDS,
    layout_tensors,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

MODEL = ModelConfig(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")
"""block_bytes = 4 * 2 * 16 * 2 * 64 * 2 = 32 KiB; 4 KiB per K or V piece."""

ODD_MODEL = ModelConfig(num_layers=3, block_size=1, num_kv_heads=1, head_dim=3, dtype="int8")
"""6-byte layer pieces, 3-byte K/V pieces: not 4-byte aligned, so the torch gather path runs."""

KINDS = LAYOUT_KINDS


def gpu_tensors(
    kind: str, model: ModelConfig, num_blocks: int, seed: int
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Random bytes (every bit pattern, NaNs included) in the shapes vLLM backends allocate."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, model.dtype)

    def r(*shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        raw = torch.randint(
            0, 256, (n * model.itemsize,), dtype=torch.uint8, device="cuda", generator=g
        )
        return raw.view(dt).view(*shape)

    tensors: dict[str, torch.Tensor] | torch.Tensor = layout_tensors(kind, model, num_blocks, r)
    return tensors


def gpu_device(kind: str, model: ModelConfig, num_blocks: int, seed: int) -> DeviceStorage:
    tensors = gpu_tensors(kind, model, num_blocks, seed)
    return DeviceStorage(detect_layout(tensors, model), tensors)


def pinned_host(num_blocks: int, block_bytes: int) -> HostStorage:
    host = HostStorage(num_blocks, block_bytes, pin_memory=True)
    host.allocate()
    host.rows.fill_(0xA5)
    return host


def all_blocks(dev: DeviceStorage) -> list[torch.Tensor]:
    return [dev.read_block(i) for i in range(dev.layout.num_blocks)]


def write_rows_async(dev: DeviceStorage, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """Write canonical ``rows`` (on the GPU) into blocks ``idx`` on the current stream, no sync."""
    lay = dev.layout
    lbb = lay.layer_block_bytes
    n = idx.numel()
    for layer in range(lay.model.num_layers):
        v = dev.layer_bytes(layer)
        piece = rows[:, layer * lbb : (layer + 1) * lbb]
        if lay.kind.value == "outer_first":
            v[:, idx] = piece.reshape(n, v.shape[0], -1).transpose(0, 1)
        else:
            v[idx] = piece


def read_layer_async(dev: DeviceStorage, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """Blocks ``idx``'s bytes of one layer, gathered on the current stream, no sync."""
    v = dev.layer_bytes(layer)
    if dev.layout.kind.value == "outer_first":
        return v[:, idx].transpose(0, 1).reshape(idx.numel(), -1)
    return v[idx].clone()
