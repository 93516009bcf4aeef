"""Shared helpers of the data-plane tests: small geometries, random blocks, engine tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.config import ModelConfig

MODEL = ModelConfig(num_layers=3, block_size=4, num_kv_heads=2, head_dim=64, dtype="bfloat16")
"""block_bytes = 3 * 2 * 4 * 2 * 64 * 2 = 6144 (not a multiple of 4096: exercises bounce I/O)."""

ALIGNED_MODEL = ModelConfig(num_layers=2, block_size=8, num_kv_heads=2, head_dim=64)
"""block_bytes = 2 * 2 * 8 * 2 * 64 * 2 = 8192 (4096-aligned: exercises zero-copy O_DIRECT)."""


def random_rows(n: int, nbytes: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g) for _ in range(n)]


def layout_tensors(
    kind: str, model: ModelConfig, num_blocks: int, make: Callable[..., torch.Tensor]
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Engine KV tensors in the shapes each vLLM backend allocates, filled by ``make(*shape)``."""
    o, t, h, d, nl = (
        model.outer_dim,
        model.block_size,
        model.num_kv_heads,
        model.head_dim,
        model.num_layers,
    )
    if kind == "fully_contiguous":
        return make(num_blocks, nl, o, t, h, d)
    if kind == "block_first":
        return {f"model.layers.{i}.attn": make(num_blocks, o, t, h, d) for i in range(nl)}
    if kind == "outer_first":
        return {f"model.layers.{i}.attn": make(o, num_blocks, t, h, d) for i in range(nl)}
    if kind == "vllm_cpu":  # vLLM 0.32 CPU backend: [num_blocks, H, T, 2 * D]
        return {f"model.layers.{i}.attn": make(num_blocks, h, t, o * d) for i in range(nl)}
    raise ValueError(kind)


def engine_tensors(
    kind: str, model: ModelConfig, num_blocks: int, seed: int = 0
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Random engine KV tensors in each layout vLLM backends use."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, model.dtype)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dt)

    return layout_tensors(kind, model, num_blocks, r)


LAYOUT_KINDS = ("fully_contiguous", "block_first", "outer_first", "vllm_cpu")
