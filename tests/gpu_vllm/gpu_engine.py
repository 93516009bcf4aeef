"""Helpers of the GPU vLLM tests: an in-process GPU engine with kvtier, prompts, hooks."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BLOCK = 16  # vLLM's GPU block size


def prompt(seed: int, length: int, *, vocab: int = 1000) -> list[int]:
    """A deterministic token-id prompt (different seeds share no block)."""
    return [(seed * 7919 + i * 31 + (i * i) % 97) % vocab + 3 for i in range(length)]


@contextlib.contextmanager
def gpu_engine(
    model: Path,
    extra: dict[str, Any],
    *,
    backend: str = "FLASH_ATTN",
    num_gpu_blocks: int = 2048,
    max_model_len: int = 4096,
    max_num_seqs: int = 64,
) -> Iterator[Any]:
    """A ``vllm.LLM`` (GPU build, in-process) with kvtier; shut down on exit."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        seed=0,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        num_gpu_blocks_override=num_gpu_blocks,
        gpu_memory_utilization=0.3,
        attention_backend=backend,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        ),
    )
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def generate(
    llm: Any, prompts: Sequence[Sequence[int]], *, max_tokens: int = 8, salt: str | None = None
) -> list[tuple[list[int], int]]:
    """Greedy outputs and vLLM's cached-token count of each prompt."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    inputs: list[Any] = []
    for p in prompts:
        item: dict[str, Any] = {"prompt_token_ids": list(p)}
        if salt is not None:
            item["cache_salt"] = salt
        inputs.append(item)
    outs = llm.generate(inputs, sp, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), int(o.num_cached_tokens or 0)) for o in outs]


def core(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core


def connectors(llm: Any) -> tuple[Any, Any]:
    """(scheduler-side, worker-side) ``KvTierConnector`` of an in-process engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return core(llm).scheduler.connector, get_kv_transfer_group()


def drain(llm: Any, timeout: float = 60.0) -> None:
    """Step an idle in-process engine until kvtier has nothing in flight."""
    sched, _ = connectors(llm)
    deadline = time.monotonic() + timeout
    while sched.scheduler.has_pending_work():
        if time.monotonic() > deadline:
            raise TimeoutError("kvtier still has work in flight")
        llm.llm_engine.step()
        time.sleep(0.002)


def reset_g1(llm: Any, timeout: float = 30.0) -> None:
    """Empty G1 once vLLM freed every block (kvtier delays freeing a finished request's blocks
    until its asynchronous stores read them, so step the engine until then)."""
    drain(llm)
    deadline = time.monotonic() + timeout
    while not llm.reset_prefix_cache():
        assert time.monotonic() < deadline, "vLLM still holds blocks after kvtier drained"
        llm.llm_engine.step()
        time.sleep(0.002)
