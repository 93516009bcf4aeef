"""Helpers for the end-to-end tests: build a real vLLM (CPU build) engine with kvtier loaded.

The engines run the tiny random-weight Llama of ``kvtier.ops.tinymodel`` (built offline), take
token-id prompts and decode greedily, so outputs are deterministic and depend on every KV value.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BLOCK = 128  # vLLM's CPU block size
KV_BYTES = 64 << 20  # 512 blocks of the tiny model


def prompt(seed: int, length: int, *, vocab: int = 1000) -> list[int]:
    """A deterministic token-id prompt (different seeds share no block)."""
    return [(seed * 7919 + i * 31 + (i * i) % 97) % vocab + 3 for i in range(length)]


def kv_config(extra: dict[str, Any]) -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="KvTierConnector",
        kv_connector_module_path="kvtier.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )


@contextlib.contextmanager
def engine(
    model: Path,
    extra: dict[str, Any],
    *,
    in_process: bool,
    kv_bytes: int = KV_BYTES,
    max_model_len: int = 2048,
    tensor_parallel_size: int = 1,
) -> Iterator[Any]:
    """A ``vllm.LLM`` with kvtier, shut down (connector and threads included) on exit.

    ``tensor_parallel_size > 1`` runs one worker process per rank (vLLM's multiprocess
    executor) even when ``in_process`` keeps the engine core in this process."""
    from vllm import LLM

    parallel: dict[str, Any] = {}
    if tensor_parallel_size > 1:
        parallel = {
            "tensor_parallel_size": tensor_parallel_size,
            "distributed_executor_backend": "mp",
        }

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    try:
        llm = LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enforce_eager=True,
            kv_cache_memory_bytes=kv_bytes,
            max_model_len=max_model_len,
            max_num_seqs=64,
            dtype="float32",
            seed=0,
            kv_transfer_config=kv_config(extra),
            **parallel,
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
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


def scheduler_connector(llm: Any) -> Any:
    """The scheduler-side ``KvTierConnector`` of an engine whose engine core is in-process."""
    return llm.llm_engine.engine_core.engine_core.scheduler.connector


def connectors(llm: Any) -> tuple[Any, Any]:
    """(scheduler-side, worker-side) ``KvTierConnector`` of an in-process engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return scheduler_connector(llm), get_kv_transfer_group()


def drain(llm: Any, timeout: float = 30.0) -> None:
    """Step an idle in-process engine until kvtier has no store or load in flight."""
    sched = scheduler_connector(llm)
    deadline = time.monotonic() + timeout
    while sched.scheduler.has_pending_work():
        if time.monotonic() > deadline:
            raise TimeoutError("kvtier still has work in flight")
        llm.llm_engine.step()
        time.sleep(0.002)


def reset_g1(llm: Any) -> None:
    """Empty vLLM's own prefix cache (G1) so repeated prompts must come back from kvtier."""
    assert llm.reset_prefix_cache() is True
