"""Helpers of the GPU vLLM tests: an in-process GPU engine with kvtier, prompts, hooks."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

BLOCK = 16  # vLLM's GPU block size (FlashAttention's default; MLA engines may use others)
ENGINE_TIMEOUT_S = 600
"""Longest any one engine may take to start, or any one test to run (``deadline``)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` naming ``what`` in the main thread after ``seconds``.

    Why: a hung engine (a stuck CUDA kernel, a load that never lands) must fail its test with a
    message, not hold the H200 run until the machine is taken back. SIGALRM interrupts the
    Python code of the in-process engine's loop; nothing else in these tests uses it.
    """

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"{what} took more than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def engine_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` for one engine only, and make vLLM read it.

    vLLM caches its environment variables once an engine core starts
    (``vllm.envs.enable_envs_cache``): a later engine would see the first one's values. The cache
    is dropped before the engine starts and after it is shut down, and the old values come back.
    """
    import vllm.envs as envs

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    envs.disable_envs_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        envs.disable_envs_cache()


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
    block_size: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """A ``vllm.LLM`` (GPU build, in-process) with kvtier; shut down on exit.

    ``block_size`` None lets vLLM pick (16, or the backend's preferred size: 64 for FLASHMLA);
    ``env`` holds variables for this engine only (see ``engine_env``)."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    sizing: dict[str, Any] = {} if block_size is None else {"block_size": block_size}
    with engine_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}):
        with deadline(ENGINE_TIMEOUT_S, f"starting a {backend} engine"):
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
                **sizing,
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
