"""Cold prompts through a real vLLM (CPU build): what kvtier costs when nothing can be reused.

One command: ``.venv/bin/python benchmarks/vllm_cold.py``. Two engine processes, vLLM alone and
vLLM + kvtier (G2 + G3 on kvtier's default settings: a block goes to disk on its second sighting;
``--knobs '{"disk_filter": false}'`` writes every new block through to disk instead), take
turns round by round in the same run. A round sends one engine ``--burst`` distinct prompts one
after another (so the background copies and disk writes of one prompt compete with the next
prompt's prefill, as in a server), then one batched ``generate`` of ``--burst`` more distinct
prompts (prompt throughput); then that engine drains kvtier's pending writes before the other
engine's round starts, so neither engine's leftovers land in the other's timings. Round order
alternates (ABBA). Every prompt is new to both engines, so a cache hit is an error. Prints the
median TTFT and the prompt throughput of each engine and the ratios against vLLM alone.

``--load N`` runs N busy processes (a CPU-load generator, as other work on a shared machine)
for the whole measurement. ``--multiprocess`` runs vLLM's multi-process engine (as ``vllm serve``
does; then vLLM binds its model threads to cores) with the same ``VLLM_CPU_NUM_OF_RESERVED_CPU``
for both engines (``--reserved-cpu``, default 1; ``unset`` shows vLLM's own choice, which
reserves one more core when a KV connector is configured); kvtier's pending writes are then
waited out by time (``--settle-s``) instead of drained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BLOCK = 128
MARK = "@@cold@@"


def _prompt(seed: int, length: int) -> list[int]:
    """Distinct for every seed from the first block on (no shared prefix between prompts)."""
    return [(seed * 7919 + i * 31 + (i * i) % 97 + seed * i) % 4000 + 3 for i in range(length)]


def _engine(model: Path, mode: str, work: Path, knobs: dict[str, int]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if mode == "kvtier":
        extra: dict[str, Any] = {
            "cpu_cache_blocks": 256,
            "disk_cache_blocks": 4096,
            "disk_dir": str(work / "g3"),
        }
        extra.update(knobs)
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    return LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=4096,
        seed=0,
        **kwargs,
    )


def _drain(llm: Any, settle_s: float) -> None:
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1":
        time.sleep(settle_s)  # the engine is in another process: give its writes time to land
        return
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    if connector is None:
        return
    while connector.scheduler.has_pending_work():
        llm.llm_engine.step()
        time.sleep(0.001)


def _child(mode: str, model: Path, work: Path, knobs: dict[str, int], settle_s: float) -> int:
    """One engine; reads ``{"seeds": [...], "length": n, "batch": [...]}`` lines, answers times."""
    from vllm import SamplingParams

    llm = _engine(model, mode, work, knobs)
    sp = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    llm.generate([{"prompt_token_ids": _prompt(999_999, 7 * BLOCK)}], sp, use_tqdm=False)
    _drain(llm, settle_s)
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        length = int(cmd["length"])
        ttft: list[float] = []
        cached = 0
        for seed in cmd["seeds"]:
            t0 = time.perf_counter()
            (out,) = llm.generate([{"prompt_token_ids": _prompt(seed, length)}], sp, use_tqdm=False)
            ttft.append(time.perf_counter() - t0)
            cached += int(out.num_cached_tokens)
        batch = [{"prompt_token_ids": _prompt(s, length)} for s in cmd["batch"]]
        t0 = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        batch_s = time.perf_counter() - t0
        cached += sum(int(o.num_cached_tokens) for o in outs)
        t0 = time.perf_counter()
        _drain(llm, settle_s)
        drain_s = time.perf_counter() - t0
        reply = {"ttft": ttft, "batch_s": batch_s, "drain_s": drain_s, "cached": cached}
        print(MARK + json.dumps(reply), flush=True)
    llm.llm_engine.engine_core.shutdown()
    return 0


class _Engine:
    def __init__(
        self, mode: str, model: Path, work: Path, knobs: dict[str, int], args: argparse.Namespace
    ) -> None:
        cmd = [sys.executable, __file__, "--child", mode, "--model", str(model)]
        cmd += ["--work", str(work), "--knobs", json.dumps(knobs), "--settle-s", str(args.settle_s)]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if args.multiprocess else "0")
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        if args.reserved_cpu != "unset":
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = args.reserved_cpu
        self.mode = mode
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                reply: dict[str, Any] = json.loads(line[len(MARK) :])
                return reply
        raise SystemExit(f"{self.mode} engine exited with status {self.proc.wait()}")

    def send(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds per engine")
    ap.add_argument("--burst", type=int, default=4, help="prompts per round (each: TTFT, batch)")
    ap.add_argument("--blocks", type=int, default=7, help="full 128-token blocks per prompt")
    ap.add_argument("--io-threads", type=int, default=None, help="kvtier's io_threads knob")
    ap.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    ap.add_argument("--multiprocess", action="store_true", help="vLLM's multi-process engine")
    ap.add_argument(
        "--reserved-cpu", default="1", help="VLLM_CPU_NUM_OF_RESERVED_CPU of both (or 'unset')"
    )
    ap.add_argument("--settle-s", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--knobs", default="{}", help="more kvtier knobs, as JSON")
    ap.add_argument("--child", choices=("baseline", "kvtier"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        work, knobs_in = Path(args.work), json.loads(args.knobs)
        sys.exit(_child(args.child, Path(args.model), work, knobs_in, args.settle_s))
    from kvtier.ops.demo import demo_model_spec
    from kvtier.ops.tinymodel import build_tiny_llama

    length = args.blocks * BLOCK + 5
    knobs = json.loads(args.knobs)
    if args.io_threads is not None:
        knobs["io_threads"] = args.io_threads
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "model", demo_model_spec())
        engines = {m: _Engine(m, model, Path(tmp), knobs, args) for m in ("baseline", "kvtier")}
        burners: list[subprocess.Popen[bytes]] = []
        try:
            for e in engines.values():
                e.read()
            spin = "while True: pass"
            burners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.load)]
            ttft: dict[str, list[float]] = {m: [] for m in engines}
            tput: dict[str, list[float]] = {m: [] for m in engines}
            drain: dict[str, list[float]] = {m: [] for m in engines}
            seed = 0
            for r in range(args.rounds):
                order = ("baseline", "kvtier") if r % 2 == 0 else ("kvtier", "baseline")
                for mode in order:
                    seeds = list(range(seed, seed + args.burst))
                    batch = list(range(seed + args.burst, seed + 2 * args.burst))
                    seed += 2 * args.burst
                    rep = engines[mode].send(seeds=seeds, batch=batch, length=length)
                    if rep["cached"] != 0:
                        raise SystemExit(f"{mode}: {rep['cached']} cached tokens on cold prompts")
                    ttft[mode] += rep["ttft"]
                    tput[mode].append(args.burst * length / rep["batch_s"])
                    drain[mode].append(rep["drain_s"])
        finally:
            for b in burners:
                b.kill()
                b.wait()
            for e in engines.values():
                e.close()
    engine = "multi-process" if args.multiprocess else "in-process"
    print(
        f"prompt: {length} tokens ({args.blocks} blocks of {BLOCK}); {args.rounds} rounds x "
        f"{args.burst} sequential + {args.burst} batched prompts per engine; "
        f"kvtier knobs: {knobs or 'defaults'}; {engine} engines, "
        f"VLLM_CPU_NUM_OF_RESERVED_CPU={args.reserved_cpu}; CPU-load processes: {args.load}"
    )
    base_t = statistics.median(ttft["baseline"])
    base_p = statistics.median(tput["baseline"])
    for mode in engines:
        t = statistics.median(ttft[mode])
        p = statistics.median(tput[mode])
        d = statistics.median(drain[mode])
        print(
            f"{mode:9s} cold TTFT median {t * 1e3:7.1f} ms (x{base_t / t:5.3f})   "
            f"prompt throughput {p:7.0f} tok/s (x{p / base_p:5.3f})   drain after round "
            f"{d * 1e3:6.1f} ms"
        )


if __name__ == "__main__":
    main()
