"""A vLLM engine (CPU build) with kvtier in its own process, driven over stdin/stdout (JSON lines).

Why: the G4 tests need engines that share nothing but the Redis server, as on two hosts: each runs
in its own interpreter with its own G2 (and no shared G3). Commands: ``run`` (greedy outputs of
token-id prompts, plus the longest engine step), ``reset_g1``, ``flush`` (wait until this
engine's write-behind queue is empty), ``stats`` (kvtier's counters), ``quit``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main() -> None:
    model, extra_json = sys.argv[1], sys.argv[2]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        max_model_len=2048,
        max_num_seqs=16,
        dtype="float32",
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=json.loads(extra_json),
        ),
    )
    core: Any = llm.llm_engine.engine_core
    sched = core.engine_core.scheduler.connector.scheduler
    group: Any = get_kv_transfer_group()
    worker = group.worker
    engine = llm.llm_engine
    steps: list[float] = []
    inner = engine.step

    def timed_step() -> Any:
        t0 = time.perf_counter()
        try:
            return inner()
        finally:
            steps.append(time.perf_counter() - t0)

    engine.step = timed_step  # type: ignore[method-assign]

    def drain(timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while sched.has_pending_work() and time.monotonic() < deadline:
            engine.step()
            time.sleep(0.002)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: dict[str, Any] = {}
        if op == "run":
            steps.clear()
            sp = SamplingParams(temperature=0, max_tokens=8, detokenize=False, ignore_eos=True)
            inputs: Any = [{"prompt_token_ids": p} for p in cmd["prompts"]]
            res = llm.generate(inputs, sp, use_tqdm=False)
            drain()
            out = {
                "outputs": [list(r.outputs[0].token_ids) for r in res],
                "max_step_s": max(steps) if steps else 0.0,
            }
        elif op == "reset_g1":
            out = {"ok": bool(llm.reset_prefix_cache())}
        elif op == "flush":
            drain()
            ok = worker.remote.writer.flush(cmd.get("timeout", 30.0))
            engine.step()  # report the writes to the scheduler half
            out = {"ok": ok}
        elif op == "stats":
            drain()
            c = sched.counters
            r = sched.remote.counters
            out = {
                "host_hit_blocks": c.host_hit_blocks,
                "disk_hit_blocks": c.disk_hit_blocks,
                "remote": {k: getattr(r, k) for k in vars(r)},
                "breaker": sched.remote.breaker_state,
            }
        elif op == "quit":
            break
        print(json.dumps(out), flush=True)
    engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
