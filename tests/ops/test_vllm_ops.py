"""Metrics scraped over HTTP and KV events subscribed to, during a real vLLM (CPU) run.

The engine is vLLM's default multi-process one: the scheduler half of the connector, and with it
the metrics server and the event publisher, live in the engine-core process, not in this one. The
metrics are enabled through ``kv_connector_extra_config``, the events through ``KVTIER_EVENTS*``
environment variables (inherited by the engine-core process).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.hashing import salt_hash, sequence_hashes
from kvtier.ops.event_stream import KvEventSubscriber
from kvtier.ops.event_wire import MEDIUM_HOST, BlockRemoved, BlockStored
from kvtier.ops.tinymodel import build_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 128
PROMPTS = [
    [(s * 7919 + i * 31 + (i * i) % 97) % 1000 + 3 for i in range(3 * BLOCK + 10)] for s in (5, 6)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def wait_for(port: int, key: str, value: float, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(port)
        if got.get(key) == value or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int, str, str]]:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    metrics_port, events_port = free_port(), free_port()
    keys = (
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "KVTIER_EVENTS",
        "KVTIER_EVENTS_ENDPOINT",
        "KVTIER_EVENTS_REPLAY_ENDPOINT",
    )
    saved = {k: os.environ.get(k) for k in keys}
    replay_port = free_port()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ["KVTIER_EVENTS"] = "1"
    os.environ["KVTIER_EVENTS_ENDPOINT"] = f"tcp://127.0.0.1:{events_port}"
    os.environ["KVTIER_EVENTS_REPLAY_ENDPOINT"] = f"tcp://127.0.0.1:{replay_port}"
    try:
        llm = LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enforce_eager=True,
            kv_cache_memory_bytes=64 << 20,
            max_model_len=2048,
            dtype="float32",
            seed=0,
            kv_transfer_config=KVTransferConfig(
                kv_connector="KvTierConnector",
                kv_connector_module_path="kvtier.vllm",
                kv_role="kv_both",
                kv_connector_extra_config={
                    "cpu_cache_gb": 1,
                    "metrics": True,
                    "metrics_port": metrics_port,
                },
            ),
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield llm, metrics_port, f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{replay_port}"
    finally:
        llm.llm_engine.engine_core.shutdown()


def generate(llm: Any) -> list[tuple[list[int], int]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=8, detokenize=False, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), int(o.num_cached_tokens or 0)) for o in outs]


def test_metrics_and_events_of_a_real_multiprocess_run(run: tuple[Any, int, str, str]) -> None:
    llm, port, endpoint, replay = run
    with KvEventSubscriber(endpoint) as sub:
        # The publisher starts with the first engine step: run once, then wait for the stream.
        first = generate(llm)
        assert [c for _, c in first] == [0, 0]
        got = wait_for(port, "kvtier_blocks_total{path=device_to_host}", 6.0)
        # 2 prompts x 3 full blocks (prompt + 8 decoded tokens stay inside the 4th block).
        assert got["kvtier_blocks_total{path=device_to_host}"] == 6.0
        # Looked up: every prompt token beyond G1, as vLLM counts its external queries.
        prompt_tokens = sum(len(p) for p in PROMPTS)
        assert got["kvtier_lookup_tokens_total{}"] == prompt_tokens
        assert got["kvtier_matched_tokens_total{tier=host}"] == 0.0

        assert llm.reset_prefix_cache() is True
        again = generate(llm)
        assert [o for o, _ in again] == [o for o, _ in first]
        assert [c for _, c in again] == [3 * BLOCK, 3 * BLOCK]
        got = wait_for(port, "kvtier_blocks_total{path=host_to_device}", 6.0)
        assert got["kvtier_blocks_total{path=host_to_device}"] == 6.0
        assert got["kvtier_matched_tokens_total{tier=host}"] == 6 * BLOCK
        assert got["kvtier_lookup_tokens_total{}"] == 2 * prompt_tokens
        assert got["kvtier_hit_rate{tier=host}"] == 6 * BLOCK / (2 * prompt_tokens)
        assert got["kvbm_onboard_blocks_h2d_total{}"] == 6.0
        for tier in ("host", "disk", "unknown"):
            assert got[f"kvtier_load_errors_total{{tier={tier}}}"] == 0.0
        assert got["kvtier_transfer_seconds_count{path=host_to_device}"] >= 1
        got = wait_for(port, "kvtier_pool_blocks{state=inactive,tier=host}", 6.0)
        assert got["kvtier_pool_blocks{state=inactive,tier=host}"] == 6.0
        assert got["kvtier_pool_blocks{state=in_use,tier=host}"] == 0.0

        # The live stream: what arrived has consecutive sequence numbers. A subscriber may miss
        # the batches sent before its connection was up (PUB/SUB); replay from 0 returns them all.
        live = []
        while (b := sub.receive(2.0)) is not None:
            live.append(b)
        assert sub.gaps == []
        everything = sub.replay(replay, 0)
        assert [b.seq for b in everything] == list(range(len(everything)))
        assert [b.seq for b in live] == [b.seq for b in everything][len(everything) - len(live) :]
        # Each block's parent is the previous block's hash (None for a prompt's first), and its
        # tokens are the prompt's, as in vLLM's own BlockStored events.
        chains = [sequence_hashes(p, BLOCK, salt_hash())[:3] for p in PROMPTS]
        parent_of = {h: (c[i - 1] if i else None) for c in chains for i, h in enumerate(c)}
        tokens_of = {
            h: tuple(p[i * BLOCK : (i + 1) * BLOCK])
            for p, c in zip(PROMPTS, chains, strict=True)
            for i, h in enumerate(c)
        }
        stored: set[int] = set()
        removed: list[Any] = []
        for b in everything:
            for ev in b.batch.events:
                if isinstance(ev, BlockStored):
                    assert ev.medium == MEDIUM_HOST and ev.block_size == BLOCK
                    hs = ev.block_hashes
                    assert ev.parent_block_hash == parent_of[hs[0]]
                    assert all(parent_of[hs[i]] == hs[i - 1] for i in range(1, len(hs)))
                    assert ev.token_ids == tuple(t for h in hs for t in tokens_of[h])
                    stored.update(hs)
                elif isinstance(ev, BlockRemoved):
                    removed.append(ev)
        # Keys are KVBM sequence hashes (salted with the hash of "{}": no cache salt, no LoRA).
        expected = {h for p in PROMPTS for h in sequence_hashes(p, BLOCK, salt_hash())[:3]}
        assert stored == expected
        assert removed == []
