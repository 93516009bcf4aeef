"""The child side of ``kvtier demo``: one mode's engine, answering one request at a time.

Why apart: ``kvtier.ops.demo`` starts one ``python -m kvtier.ops.demo_child`` per mode and drives
them in lockstep over lines of ``MARK`` + JSON on stdout (vLLM logs there too); only this side
imports vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvtier.ops.demo import (
    BLOCK_TOKENS,
    CPU_ENV,
    MARK,
    MAX_MODEL_LEN,
    MODES,
    VOCAB,
    DemoConfig,
    Turn,
    Workload,
    block_bytes,
    demo_model_spec,
    model_dtype,
)
from kvtier.ops.redislocal import free_port


class _Session:
    """One mode's engine in this process, driven one request at a time (the child side)."""

    def __init__(self, mode: str, cfg: DemoConfig, work: Path) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown demo mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode, self.cfg, self.work = mode, cfg, work
        self.port = free_port()
        self.llm: Any = None
        self.params: Any = None
        self.workload = Workload.build(cfg)
        self.history: list[list[int]] = [[] for _ in range(cfg.users)]

    def start(self) -> float:
        """Build the model and the engine, warm it up; returns the engine start time."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
        from kvtier.ops.tinymodel import build_tiny_llama

        model = build_tiny_llama(self.work / "model", demo_model_spec())
        kwargs: dict[str, Any] = {}
        if self.mode == "kvtier":
            from vllm.config import KVTransferConfig

            extra: dict[str, Any] = {"disk_filter": False, "metrics": True}
            extra["metrics_port"] = self.port
            if self.cfg.host_blocks:
                extra["cpu_cache_blocks"] = self.cfg.host_blocks
            if self.cfg.disk_blocks:
                extra["disk_cache_blocks"] = self.cfg.disk_blocks
                extra["disk_dir"] = str(self.work / "g3")
            kwargs["kv_transfer_config"] = KVTransferConfig(
                kv_connector="KvTierConnector",
                kv_connector_module_path="kvtier.vllm",
                kv_role="kv_both",
                kv_connector_extra_config=extra,
            )
        from vllm import LLM, SamplingParams

        g1_blocks = self.cfg.g1_blocks
        if self.mode == "reference":
            g1_blocks = self.cfg.reference_g1_blocks
        dtype = model_dtype()
        start = time.perf_counter()
        self.llm = LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=min((self.cfg.g1_blocks - 1) * BLOCK_TOKENS, MAX_MODEL_LEN),
            kv_cache_memory_bytes=g1_blocks * block_bytes(dtype),
            dtype=dtype,
            disable_log_stats=False,
            seed=self.cfg.seed,
            **kwargs,
        )
        took = time.perf_counter() - start
        self.params = SamplingParams(
            max_tokens=self.cfg.reply_tokens, temperature=0.0, ignore_eos=True
        )
        self._warm_up()
        return took

    def _warm_up(self) -> None:
        """First-call set-up outside the timings: a prompt on tokens no conversation uses, then
        the same prompt after emptying G1, so kvtier's load path runs once too."""
        warm = [VOCAB - 1 - (i % 7) for i in range(2 * BLOCK_TOKENS + 5)]
        for _ in range(2):
            self._generate(warm)
            self.llm.reset_prefix_cache()

    def _generate(self, prompt: list[int]) -> Any:
        from vllm.inputs import TokensPrompt

        return self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)], self.params, use_tqdm=False
        )[0]

    def request(self, user: int, turn: int) -> Turn:
        """The user's next question: their document + their history + the new question."""
        question = self.workload.questions[user][turn]
        prompt = self.workload.document_of(user) + self.history[user] + question
        t0 = time.perf_counter()
        out = self._generate(prompt)
        wall = time.perf_counter() - t0
        ttft = getattr(out.metrics, "first_token_latency", 0.0) or wall
        reply = list(out.outputs[0].token_ids)
        self.history[user] = self.history[user] + question + reply
        return Turn(user, turn, len(prompt), int(out.num_cached_tokens or 0), ttft, reply)

    def metrics(self) -> dict[str, float]:
        """kvtier's metrics from its endpoint, and vLLM's own counters (prefix caches)."""
        from kvtier.ops.demo_report import scrape

        got = scrape(self.port) if self.mode == "kvtier" else {}
        for m in self.llm.get_metrics():
            if m.name.startswith(("vllm:external_prefix_cache", "vllm:prefix_cache")):
                got[m.name] = float(getattr(m, "value", 0.0))
        return got


def _emit(obj: dict[str, Any]) -> None:
    print(MARK + json.dumps(obj), flush=True)


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.ops.demo_child")
    parser.add_argument("--child", choices=MODES, required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    session = _Session(args.child, DemoConfig(**json.loads(args.config_json)), Path(args.work))
    _emit({"engine_start_s": session.start()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "request":
            _emit(asdict(session.request(int(cmd["user"]), int(cmd["turn"]))))
        elif cmd["op"] == "finish":
            _emit({"metrics": session.metrics()})
            return 0
        else:
            raise ValueError(f"unknown demo command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
