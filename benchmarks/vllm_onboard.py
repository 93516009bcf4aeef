"""Time to first token through a real vLLM (CPU build): recompute vs onboard from G2 vs from G3.

One command: ``.venv/bin/python benchmarks/vllm_onboard.py``. For each of N prompts it measures
a cold prefill (nothing cached: the baseline, measured in this run), then, after
``reset_prefix_cache()`` empties vLLM's own G1, the same prompt again, served by kvtier from G2;
a second engine with no G2 serves it from G3 (disk). Prints medians and the ratios against the
baseline. The model is a random-weight Llama built offline (``kvtier.ops.tinymodel``), so absolute
numbers are small; the ratios show what the connector costs or saves on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.ops.tinymodel import TinyLlamaSpec, build_tiny_llama

BLOCK = 128


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31 + (i * i) % 97) % 4000 + 3 for i in range(length)]


def _engine(model: Path, extra: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=4096,
        dtype="float32",
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        ),
    )


def _ttft(llm: Any, tokens: list[int]) -> tuple[float, list[int], int]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    t0 = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": tokens}], sp, use_tqdm=False)
    return time.perf_counter() - t0, list(out.outputs[0].token_ids), int(out.num_cached_tokens)


def _drain(llm: Any) -> None:
    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
    while sched.has_pending_work():
        llm.llm_engine.step()
        time.sleep(0.001)


def _run(model: Path, extra: dict[str, Any], prompts: list[list[int]]) -> tuple[list[float], ...]:
    llm = _engine(model, extra)
    try:
        _ttft(llm, _prompt(10_000, 2 * BLOCK + 1))  # warm-up
        cold: list[float] = []
        warm: list[float] = []
        for p in prompts:
            t_cold, first, cached0 = _ttft(llm, p)
            _drain(llm)
            assert llm.reset_prefix_cache()
            t_warm, again, cached1 = _ttft(llm, p)
            if again != first or cached0 != 0 or cached1 != ((len(p) - 1) // BLOCK) * BLOCK:
                raise SystemExit(f"unexpected result: {first} {again} {cached0} {cached1}")
            cold.append(t_cold)
            warm.append(t_warm)
        return cold, warm
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=24, help="full 128-token blocks per prompt")
    ap.add_argument("--layerwise", action="store_true", help="G3 onboarding inside the forward")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = TinyLlamaSpec(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "model", spec)
        length = args.blocks * BLOCK + 7
        prompts = [_prompt(i, length) for i in range(args.prompts)]
        g2 = {"cpu_cache_blocks": 4 * args.blocks * args.prompts}
        cold, host = _run(model, g2, prompts)
        g3 = {
            "disk_cache_blocks": 4 * args.blocks * args.prompts,
            "disk_dir": str(Path(tmp) / "g3"),
            "disk_filter": False,
            "layerwise_onboard": args.layerwise,
        }
        cold3, disk = _run(model, g3, [_prompt(100 + i, length) for i in range(args.prompts)])
    base = statistics.median(cold + cold3)
    print(f"prompt: {length} tokens ({args.blocks} blocks of {BLOCK}), {args.prompts} prompts")
    print(f"model: {spec.num_hidden_layers} layers, hidden {spec.hidden_size}, fp32, vLLM CPU")
    for name, times in (
        ("recompute (baseline)", cold + cold3),
        ("G2 onboard", host),
        ("G3 onboard", disk),
    ):
        med = statistics.median(times)
        print(f"{name:22s} TTFT median {med * 1e3:8.1f} ms   speed-up x{base / med:5.2f}")


if __name__ == "__main__":
    main()
