"""``kvtier_hit_rate`` equals vLLM's own external hit rate, at concurrency 8 with G1 pressure.

Before: kvtier counted a lookup every time vLLM asked (every step while a request waited for G1
space), so ``kvtier_lookup_tokens_total`` was many times vLLM's query count and the hit rate
looked tiny. Now a lookup counts when vLLM allocates for it, once, as vLLM counts
``vllm:external_prefix_cache_queries`` / ``hits``.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.ops.tinymodel import build_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 128
TINY_BLOCK_BYTES = BLOCK * 2 * 2 * 2 * 32 * 4  # tokens x layers x K/V x kv heads x dim x fp32


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31 + (i * i) % 97 + seed * i) % 1000 + 3 for i in range(length)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kvtier(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f"[{v}]" for v in s.labels.values())
            out[key] = float(s.value)
    return out


def _vllm(llm: Any) -> tuple[float, float]:
    got = {m.name: float(getattr(m, "value", 0.0)) for m in llm.get_metrics()}
    return got["vllm:external_prefix_cache_queries"], got["vllm:external_prefix_cache_hits"]


def test_hit_rate_matches_vllms_external_hit_rate_at_concurrency_8(tmp_path: Path) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    model = build_tiny_llama(tmp_path / "model")
    port = _free_port()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    extra = {"cpu_cache_blocks": 40, "disk_cache_blocks": 256, "disk_dir": str(tmp_path / "g3")}
    extra |= {"disk_filter": False, "metrics": True, "metrics_port": port}
    llm: Any = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        seed=0,
        max_model_len=1024,
        kv_cache_memory_bytes=14 * TINY_BLOCK_BYTES,  # 13 usable blocks: two requests at a time
        disable_log_stats=False,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        ),
    )
    try:
        sp = SamplingParams(temperature=0, max_tokens=8, detokenize=False, ignore_eos=True)
        docs = [_prompt(s, 4 * BLOCK) for s in range(8)]
        for d in docs:  # stored to G2 (40 blocks) and G3
            llm.generate([{"prompt_token_ids": d + _prompt(100, 10)}], sp, use_tqdm=False)
        assert llm.reset_prefix_cache()
        sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
        k0, (q0, h0), lookups0 = _kvtier(port), _vllm(llm), sched.counters.lookups
        prompts = [d + _prompt(200 + i, BLOCK + 10) for i, d in enumerate(docs)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        assert all(int(o.num_cached_tokens) >= 4 * BLOCK for o in outs)
        k1, (q1, h1) = _kvtier(port), _vllm(llm)
        retries = sched.counters.lookups - lookups0 - len(prompts)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert retries > len(prompts)  # G1 pressure: requests were looked up again while waiting
    queries, hits = q1 - q0, h1 - h0
    assert queries >= 8 * (BLOCK + 10) and hits >= 8 * 4 * BLOCK
    looked = k1["kvtier_lookup_tokens_total"] - k0["kvtier_lookup_tokens_total"]
    host = k1["kvtier_matched_tokens_total[host]"] - k0["kvtier_matched_tokens_total[host]"]
    disk = k1["kvtier_matched_tokens_total[disk]"] - k0["kvtier_matched_tokens_total[disk]"]
    assert host + disk == hits  # vLLM loaded exactly what kvtier matched
    assert (host + disk) / looked == pytest.approx(hits / queries, abs=0.01)
    assert looked == pytest.approx(queries, rel=0.01)
    # The gauges (sliding window) agree too: this phase is the only traffic of the window's
    # last seconds besides the warm-up, whose hits were zero and whose lookups are small.
    window = k1["kvtier_hit_rate[host]"] + k1["kvtier_hit_rate[disk]"]
    assert 0 < window <= hits / queries + 0.01
