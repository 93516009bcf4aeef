"""Fixtures of the GPU vLLM tests: skip cleanly without a GPU or without a GPU build of vLLM.

These run on the lent H200 with the carried vLLM 0.26.0 (``../shared/gpu-vllm``); CI has no GPU,
so every test here is skipped there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gpu_engine import ENGINE_TIMEOUT_S, deadline
from tiny_mla import TinyMlaSpec, build_tiny_mla

from kvtier.ops.tinymodel import TinyLlamaSpec, build_tiny_llama


def gpu_vllm_missing() -> str | None:
    """Why the GPU vLLM tests cannot run here (None: they can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU"
    try:
        from vllm.platforms import current_platform
    except Exception as exc:  # any import failure means no usable vLLM
        return f"vLLM is not importable: {exc}"
    if not current_platform.is_cuda():
        return "the installed vLLM is not a CUDA build"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = gpu_vllm_missing()
    if why is None:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "gpu_vllm" in item.keywords:
            item.add_marker(skip)


GPU_TINY = TinyLlamaSpec(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
)
"""head_dim 64 (FlashAttention 3 needs a multiple of 8, FA's fast paths 64+), 4 layers."""


@pytest.fixture(scope="session")
def gpu_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("gpu-tiny-llama"), GPU_TINY)


@pytest.fixture(scope="session")
def gpu_tiny_mla(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V2-shaped, 4 dense layers, 16 heads, MLA latent 576 (``tiny_mla``)."""
    return build_tiny_mla(tmp_path_factory.mktemp("gpu-tiny-mla"), TinyMlaSpec())


@pytest.fixture(autouse=True)
def _test_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every GPU vLLM test fails with its name after ``ENGINE_TIMEOUT_S`` instead of hanging."""
    if "gpu_vllm" not in request.keywords:
        yield
        return
    with deadline(ENGINE_TIMEOUT_S, request.node.nodeid):
        yield
