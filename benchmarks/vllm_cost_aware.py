"""TTFT through a real vLLM (CPU build) when a tier is slow for real: always-load vs
always-recompute vs cost-aware onboarding, in one run, on one engine.

One command (as root: it builds a network namespace):
``.venv/bin/python benchmarks/vllm_cost_aware.py``.

G4 is a Redis server inside a network namespace (``benchmarks/netshape.py``): unshaped (a veth
pair, ~0.6 GB/s through redis-py), then shaped with ``tc tbf`` (``--rate-mbit``, both ways) plus
a delaying proxy (``--delay-ms`` each way). Workloads, each at concurrency 1 (the prompts one
after another) and 16 (all submitted at once), every prompt sharing nothing with the others:

- ``g2``: the prefixes are in G2 (fast tier): cost-aware must not lose to always-load;
- ``g4``: in G4 only (G1 and G2 emptied by ``reset_prefix_cache(reset_connector=True)``),
  unshaped and shaped;
- ``g2+g4``: the first ``--g2-blocks`` blocks of each prefix in G2, the rest in shaped G4: the
  case where loading a first part and recomputing the rest beats both.

The three policies are per-request overrides (``kv_transfer_params``: ``kvtier_onboard`` =
``load`` / ``recompute`` / ``auto``) on one engine with ``onboard_cost_aware`` on, taking turns
cell by cell in an order where each policy follows each policy equally often (``CARRY_OVER``),
so they see the same machine at the same time and the same leftovers of the cell before. TTFT:
from ``add_request`` to the step that returns the request's first (only) token. Each workload
starts with one unmeasured cell of each policy (``WARM_UP``). Greedy outputs are checked equal
across policies. Each row also prints auto / load paired cell by cell with its 95% interval;
``--aa-control`` sends the auto cells as ``load``, so that ratio shows what the order and the
machine alone do (1.01-1.03 at 90 cells a policy on the dev VM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netshape import NS_IP, ShapedRedis, shaped_redis
from paired import paired_interval, paired_ratio

from kvtier.ops.tinymodel import build_tiny_llama

BLOCK = 128
POLICIES = ("load", "recompute", "auto")


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31 + (i * i) % 97) % 1000 + 3 for i in range(length)]


@contextlib.contextmanager
def _engine(model: Path, redis_url: str, host_blocks: int) -> Iterator[Any]:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    extra = {
        "cpu_cache_blocks": host_blocks,
        "remote_url": redis_url,
        "remote_timeout_ms": 3000,
        "onboard_cost_aware": True,
    }
    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=4096,
        max_num_seqs=32,
        max_num_batched_tokens=8192,
        dtype="float32",
        seed=0,
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


def _sched(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler


def _drain(llm: Any) -> None:
    s = _sched(llm)
    deadline = time.monotonic() + 60
    while s.has_pending_work() and time.monotonic() < deadline:
        llm.llm_engine.step()
        time.sleep(0.002)


def _run(llm: Any, prompts: list[list[int]], policy: str | None, tag: str) -> list[Any]:
    """Submit ``prompts`` together, ``policy`` as their ``kvtier_onboard``; (ttft seconds,
    first token) of each."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"kvtier_onboard": policy}} if policy else None
    sp = SamplingParams(
        temperature=0, max_tokens=1, detokenize=False, ignore_eos=True, extra_args=extra
    )
    eng = llm.llm_engine
    start: dict[str, float] = {}
    for i, p in enumerate(prompts):
        rid = f"{tag}-{i}"
        start[rid] = time.perf_counter()
        eng.add_request(rid, {"prompt_token_ids": p}, sp)
    got: dict[str, tuple[float, int]] = {}
    while len(got) < len(prompts):
        for out in eng.step():
            if out.finished and out.request_id in start:
                got[out.request_id] = (
                    time.perf_counter() - start[out.request_id],
                    out.outputs[0].token_ids[0],
                )
    _drain(llm)
    return [got[f"{tag}-{i}"] for i in range(len(prompts))]


WARM_UP = ("recompute", "load", "auto")
"""One unmeasured cell of each policy: the cost model learns the tier (from every load, whoever
asked for it). It ends with ``auto``, the cell the measured order's cycle ends with."""
CARRY_OVER = ("load", "load", "recompute", "load", "auto", "recompute", "recompute", "auto", "auto")
"""The measured cells' cycle: each ordered pair of policies once (a de Bruijn sequence, read
cyclically), so every policy follows every policy, itself included, equally often. What a cell
leaves behind slows the next one (on the dev VM a cell after a recompute cell ran 3-5% slower),
and a rotation of three orders put ``auto`` after ``recompute`` twice as often as ``load``: a
run whose ``auto`` cells were sent as ``load`` measured ``auto``/``load`` 1.02-1.03."""


def _cell_order(reps: int) -> list[str]:
    """The warm-up, then whole cycles of ``CARRY_OVER`` until each policy has ``reps`` measured
    cells (rounded up to a multiple of 3)."""
    cycles = -(-reps // 3)
    return list(WARM_UP) + list(CARRY_OVER) * cycles


def _g4_settled(shaped: ShapedRedis) -> None:
    """Wait until the write-behind to G4 stopped (key count unchanged for 0.5 s)."""
    import redis

    c = redis.Redis(host=NS_IP, port=6390)
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 0.5:
        n = int(c.dbsize())  # type: ignore[arg-type]
        if n != last:
            last, since = n, time.monotonic()
        time.sleep(0.05)
    c.close()


def _stats(xs: list[float]) -> tuple[float, float]:
    s = sorted(xs)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return statistics.fmean(s), p99


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (= concurrency)")
    ap.add_argument("--blocks", type=int, default=12, help="full blocks per prompt")
    ap.add_argument("--g2-blocks", type=int, default=4, help="blocks in G2 in g2+g4")
    ap.add_argument(
        "--reps", type=int, default=3, help="measured cells per policy (a multiple of 3)"
    )
    ap.add_argument("--rate-mbit", type=int, default=400, help="shaped link rate (50 MB/s)")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="proxy delay each way")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="workloads to run (g2, g4, g4-shaped, g2+g4-shaped; default: all)",
    )
    ap.add_argument(
        "--aa-control",
        action="store_true",
        help="send the auto cells as load: the same code in both slots, what the cell order "
        "and the machine alone do to auto/load",
    )
    args = ap.parse_args()
    # SIGTERM (a timeout) unwinds like ^C, so the namespace and the servers are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    n, blocks = args.prompts, args.blocks
    prompts = [_prompt(1000 + i, blocks * BLOCK + 37) for i in range(n)]
    firsts = [p[: args.g2_blocks * BLOCK + 1] for p in prompts]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, shaped_redis(args.rate_mbit, args.delay_ms) as g4:
        model = build_tiny_llama(Path(tmp) / "model")
        with _engine(model, g4.url, host_blocks=4 * n * blocks) as llm:
            reference = [t for _, t in _run(llm, prompts, "recompute", "warm")]
            _g4_settled(g4)

            def prepare(workload: str) -> None:
                if workload == "g2":
                    assert llm.reset_prefix_cache()  # G1 only: G2 keeps every prefix
                    return
                _drain(llm)
                assert llm.reset_prefix_cache(reset_connector=True)  # G1 + G2; G4 keeps all
                if workload == "g2+g4":
                    _run(llm, firsts, "recompute", "first")  # the first blocks land in G2
                    assert llm.reset_prefix_cache()

            workloads = [("g2", False), ("g4", False), ("g4", True), ("g2+g4", True)]
            for workload, shaped in workloads:
                if args.only and f"{workload}{'-shaped' if shaped else ''}" not in args.only:
                    continue
                g4.shape(shaped)
                name = f"{workload} ({'G4 shaped' if shaped else 'unshaped'})"
                for conc in (1, n):
                    ttft: dict[str, list[float]] = {p: [] for p in POLICIES}
                    runs: list[tuple[int, str, float]] = []  # (rep, policy, mean TTFT)
                    counters = _sched(llm).onboard.counters
                    auto = [0, 0]  # tokens cost-aware loaded / left to recompute (warm-up too)
                    seen = dict.fromkeys(POLICIES, 0)
                    for policy in _cell_order(args.reps):
                        rep = seen[policy]
                        seen[policy] += 1
                        prepare(workload)
                        out: list[Any] = []
                        was = (
                            sum(counters.loaded_tokens.values()),
                            sum(counters.skipped_tokens.values()),
                        )
                        for i in range(0, n, conc):
                            tag = f"{workload}-{shaped}-{conc}-{rep}-{policy}-{i}"
                            sent = "load" if args.aa_control and policy == "auto" else policy
                            out += _run(llm, prompts[i : i + conc], sent, tag)
                        if policy == "auto":
                            auto[0] += sum(counters.loaded_tokens.values()) - was[0]
                            auto[1] += sum(counters.skipped_tokens.values()) - was[1]
                        assert [t for _, t in out] == reference, (name, policy)
                        if rep:  # rep 0: the warm-up (WARM_UP)
                            ttft[policy] += [s for s, _ in out]
                            runs.append((rep, policy, statistics.fmean(s for s, _ in out)))
                    row: dict[str, Any] = {"workload": name, "concurrency": conc, "runs": runs}
                    row["auto_loaded_tokens"], row["auto_skipped_tokens"] = auto
                    by_rep = {(r, p): t for r, p, t in runs}
                    reps = sorted({r for r, _, _ in runs})
                    base = [by_rep[r, "load"] for r in reps]
                    mine = [by_rep[r, "auto"] for r in reps]
                    row["paired_auto_vs_load"] = paired_ratio(base, mine)
                    row["paired_auto_vs_load_95"] = paired_interval(base, mine)
                    for p in POLICIES:
                        row[p] = _stats(ttft[p])
                    for k, idx in (("mean", 0), ("p99", 1)):
                        best = min(row["load"][idx], row["recompute"][idx])
                        row[f"ratio_{k}_vs_best"] = row["auto"][idx] / best
                        row[f"ratio_{k}_vs_load"] = row["auto"][idx] / row["load"][idx]
                    rows.append(row)
                    _print_row(row)
            onboard = _sched(llm).onboard
            c = onboard.counters
            print(f"\ncost model: loaded {c.loaded_tokens}, skipped {c.skipped_tokens}, "
                  f"partial loads {c.partial_loads}")  # fmt: skip
            for t in ("G2", "G4"):
                m = onboard.model
                print(f"  {t}: {m.tier_bandwidth(t) / 1e6:.0f} MB/s, "
                      f"{m.tier_latency(t) * 1e3:.2f} ms per job")  # fmt: skip
            print(f"  prefill: {m.prefill_seconds(0, 1000) * 1e3:.1f} ms per 1000 tokens "
                  f"(per token, per pair of context: {m.prefill.theta}; TTFT calibration "
                  f"{m.recompute_scale:.2f}, x {m.loading_factor:.2f} while loading)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _print_row(row: dict[str, Any]) -> None:
    lo, hi = row["paired_auto_vs_load_95"]
    cells = "  ".join(f"{p} {row[p][0] * 1e3:7.1f} / {row[p][1] * 1e3:7.1f} ms" for p in POLICIES)
    print(
        f"{row['workload']:<22} c={row['concurrency']:<3} mean/p99: {cells}  "
        f"cost-aware/best: ratio {row['ratio_mean_vs_best']:.2f} (mean) "
        f"{row['ratio_p99_vs_best']:.2f} (p99); /load {row['ratio_mean_vs_load']:.2f}, paired "
        f"{row['paired_auto_vs_load']:.3f} (95% {lo:.3f}-{hi:.3f}); "
        f"auto loaded {row['auto_loaded_tokens']} / skipped {row['auto_skipped_tokens']} tokens",
        flush=True,
    )


if __name__ == "__main__":
    main()
