"""kvtier inside a GPU build of vLLM against vLLM alone and vLLM's own ``OffloadingConnector``.

One command on the lent H200 (vLLM 0.26.0 from ../shared/gpu-vllm), Llama-3-8B shape with
``load_format="dummy"`` (random bf16 weights, token-id prompts), everything in one run:

- TTFT (wall time of ``generate`` with ``max_tokens=1``, one request) for 4k, 16k and 32k-token
  prompts: recompute; vLLM's G1 prefix hit; vLLM's ``OffloadingConnector`` (CPU) after a G1
  reset; kvtier from G2 (after a G1 reset; asynchronous and layer-wise loads); kvtier from G3
  (no G2, after a G1 reset); and raw O_DIRECT reads of the same G3 files (8 threads);
- cost-aware onboarding (``kvtier-g3-cost``): a 32k prefix in G3 loaded, recomputed, and as the
  cost model chooses, each after a G1 reset;
- decode throughput (32 concurrent requests, 1k-token prompts, 256 new tokens): vLLM alone vs
  vLLM + kvtier storing every block to G2 (``decode-ab``: both engines side by side in one
  process, measured in turns; ``decode-ab-evict`` the same with a G2 small enough that every
  measured round evicts; ``decode-ab-graphs`` with vLLM's default CUDA graphs rather than eager;
  ``decode-ab-graphs-offload`` vLLM's ``OffloadingConnector`` in kvtier's place; the
  ``vllm``/``kvtier`` phases also measure it, one engine each).

Each engine runs in its own process (``--phase``), in-process engine core
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so kvtier's halves can be drained between measurements; the
parent prints a table and the ratios the issue asks for. Run::

    PYTHONUNBUFFERED=1 python3 benchmarks/vllm_gpu.py --out $OUT/vllm_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import paired_interval, paired_ratio

SIZES = (4096, 16384, 32768)
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BLOCK_BYTES = 32 * 2 * 16 * 8 * 128 * 2  # one 16-token block of every layer: 2 MiB


def seed_of(*parts: object) -> int:
    """A seed that is the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(repr(parts).encode()) % 100000


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 1000003 + i * 7919 + (i * i) % 1009) % 120000 + 10 for i in range(n)]


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def make_llm(
    model: Path, kv: dict[str, Any] | None, gpu_memory: float = 0.80, *, eager: bool = True
) -> Any:
    """An engine on the Llama-3-8B shape; ``eager=False`` keeps vLLM's default compilation and
    CUDA graphs (what a production server runs; start-up takes minutes longer)."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = None
    if kv is not None:
        ktc = KVTransferConfig(**kv)
    return LLM(
        model=str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        enforce_eager=eager,
        dtype="bfloat16",
        seed=0,
        max_model_len=33792,
        max_num_seqs=64,
        gpu_memory_utilization=gpu_memory,
        kv_transfer_config=ktc,
    )


def kvtier_kv(extra: dict[str, Any]) -> dict[str, Any]:
    """The ``KVTransferConfig`` fields of a kvtier engine with these knobs."""
    return {
        "kv_connector": "KvTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def gen(
    llm: Any,
    prompts: list[list[int]],
    max_tokens: int = 1,
    kv_params: dict[str, Any] | None = None,
) -> float:
    """Wall time of one ``generate``; ``kv_params`` go to the connector (``kv_transfer_params``)."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": kv_params} if kv_params is not None else None
    sp = SamplingParams(
        temperature=0, max_tokens=max_tokens, detokenize=False, ignore_eos=True, extra_args=extra
    )
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t


def settle(llm: Any, kvtier: bool, timeout: float = 120.0) -> None:
    """Step the idle engine until stores landed (kvtier: drained; others: a short while)."""
    deadline = time.monotonic() + timeout
    if kvtier:
        sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
        while sched.has_pending_work() and time.monotonic() < deadline:
            llm.llm_engine.step()
            time.sleep(0.002)
    else:
        for _ in range(200):
            llm.llm_engine.step()
            time.sleep(0.005)
    while not llm.reset_prefix_cache() and time.monotonic() < deadline:
        llm.llm_engine.step()
        time.sleep(0.01)


def wait_pinned(llm: Any, timeout: float = 90.0) -> float:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    conn: Any = get_kv_transfer_group()
    pinner = conn.worker.plane.pinner
    t = time.perf_counter()
    while pinner is not None and not pinner.progress().done:
        if time.perf_counter() - t > timeout:
            break
        time.sleep(0.1)
    gen(llm, [prompt(999, 20)])  # one step: the pinned-row report reaches the scheduler half
    return time.perf_counter() - t


def ttft_series(llm: Any, name: str, reps: int, *, kvtier: bool, reset: bool) -> dict[str, Any]:
    """Per size: cold prefill (recompute), then (reset: G1 emptied) the same prompt again."""
    out: dict[str, Any] = {}
    for n in SIZES:
        cold, warm = [], []
        for r in range(reps):
            p = prompt(seed_of(name, n, r), n)
            cold.append(gen(llm, [p]))
            if reset:
                settle(llm, kvtier)
            warm.append(gen(llm, [p]))
            settle(llm, kvtier)
        out[str(n)] = {"recompute": cold, "again": warm}
        cold_ms, warm_ms = [round(x * 1e3) for x in cold], [round(x * 1e3) for x in warm]
        print(f"[{name}] {n}: cold {cold_ms} ms, again {warm_ms} ms", flush=True)
    return out


def decode(llm: Any, seed: int, reps: int) -> list[float]:
    rates = []
    for r in range(reps):
        ps = [prompt(seed * 100 + r * 40 + i, 1024) for i in range(32)]
        dt = gen(llm, ps, max_tokens=256)
        rates.append(32 * 256 / dt)
        print(f"decode rep {r}: {rates[-1]:.0f} tok/s ({dt:.2f} s)", flush=True)
    return rates


def cost_series(llm: Any, reps: int) -> dict[str, Any]:
    """Issue 13 on the GPU: a 32k-token prefix held by G3 only, loaded or recomputed.

    For each prompt, in one engine after a G1 reset each time: always-load, always-recompute (both
    as per-request overrides) and the cost model's own choice (``auto``), with the G3 tokens it
    chose to load. Two 8k prompts first let the model measure G3 loads and prefill steps.
    """
    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
    adv = sched.onboard
    for r in range(2):
        p = prompt(seed_of("cost-calibration", r), 8192)
        gen(llm, [p])
        settle(llm, True)
        gen(llm, [p], kv_params={"kvtier_onboard": "load"})
        settle(llm, True)
    out: dict[str, Any] = {"load": [], "recompute": [], "auto": [], "auto_g3_tokens": []}
    for r in range(reps):
        p = prompt(seed_of("cost", 32768, r), 32768)
        gen(llm, [p])  # cold: computed and written to G3
        settle(llm, True)
        for mode in ("load", "recompute", "auto"):
            before = adv.counters.loaded_tokens["G3"]
            out[mode].append(gen(llm, [p], kv_params={"kvtier_onboard": mode}))
            if mode == "auto":
                out["auto_g3_tokens"].append(adv.counters.loaded_tokens["G3"] - before)
            settle(llm, True)
        ms = {m: round(out[m][-1] * 1e3) for m in ("load", "recompute", "auto")}
        print(f"[cost] 32k: {ms} ms, auto loaded {out['auto_g3_tokens'][-1]} G3 tokens", flush=True)
    return out


def raw_reads(paths: list[Path], threads: int = 8) -> float:
    """GB/s of O_DIRECT reads of the block files, ``threads`` at a time (the disk baseline)."""
    import mmap

    size = os.path.getsize(paths[0])
    bufs = [mmap.mmap(-1, size) for _ in range(threads)]
    lock = threading.Lock()
    todo = list(paths)

    def worker(buf: mmap.mmap) -> None:
        while True:
            with lock:
                if not todo:
                    return
                p = todo.pop()
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
            try:
                os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)

    t = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(b,)) for b in bufs]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return len(paths) * size / (time.perf_counter() - t) / 1e9


@dataclass(frozen=True)
class DecodeAB:
    """One decode A/B phase: vLLM alone against ``other`` (``"kvtier"``, or ``"offload"``:
    vLLM's own ``OffloadingConnector``), which stores every block to ``cpu_gb`` of host memory;
    ``eager``: both engines under ``enforce_eager`` (else vLLM's default CUDA graphs)."""

    other: str
    cpu_gb: int
    eager: bool

    def kv(self) -> dict[str, Any]:
        """The ``KVTransferConfig`` fields of the ``other`` engine."""
        if self.other == "offload":
            return offload_kv(self.cpu_gb)
        return store_all_kv(self.cpu_gb)


def store_all_kv(cpu_gb: int) -> dict[str, Any]:
    """A kvtier engine that stores every block to a G2 of ``cpu_gb`` GB (no G3 filter)."""
    return kvtier_kv({"disk_filter": False, "cpu_cache_gb": cpu_gb})


DECODE_AB = {
    "decode-ab": DecodeAB("kvtier", 40, True),
    "decode-ab-evict": DecodeAB("kvtier", 8, True),
    "decode-ab-graphs": DecodeAB("kvtier", 40, False),
    "decode-ab-graphs-offload": DecodeAB("offload", 40, False),
}
"""The decode phases. 40 GB of G2 fills after about 7 rounds (2560 blocks of 2 MiB a round),
8 GB within the warm-up, so that every measured round evicts. Eager decode is bound by the
engine thread's Python and swings by 20% a round on the lent hosts; under CUDA graphs a round
varies by 0.5%. ``decode-ab-graphs-offload`` prices the peer's storing the same way."""


def offload_kv(cpu_gb: int) -> dict[str, Any]:
    """The ``KVTransferConfig`` fields of vLLM's ``OffloadingConnector`` with ``cpu_gb`` GB."""
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes_to_use": cpu_gb << 30},
    }


def decode_ab(model: Path, reps: int, spec: DecodeAB, save: Path) -> dict[str, Any]:
    """Decode throughput of vLLM alone and of vLLM + ``spec.other`` storing every block,
    measured in turns in one process: two engines side by side (each with its own engine-core
    process and 40% of the GPU), so that whatever drifts during a run (throughput rose by up to
    40% over minutes within one engine on the H200) drifts for both. Order alternates each
    round; the rounds so far are written to ``save`` after each one, so a phase cut by its
    timeout keeps them."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    t = time.perf_counter()
    engines = {
        "vllm": make_llm(model, None, 0.40, eager=spec.eager),
        spec.other: make_llm(model, spec.kv(), 0.40, eager=spec.eager),
    }
    print(f"decode-ab: both engines up in {time.perf_counter() - t:.0f} s", flush=True)
    for llm in engines.values():  # warm-up (kvtier: G2 pins in the background meanwhile)
        decode(llm, 1, 2)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    res: dict[str, Any] = {"decode_ab": rates, "eager": spec.eager}
    for r in range(2 * reps):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            rates[name] += decode(engines[name], 20 + r, 1)
        save.write_text(json.dumps(res))
    return res


def run_phase(phase: str, model: Path, reps: int, workdir: Path, save: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"phase": phase}
    if phase in DECODE_AB:
        res.update(decode_ab(model, reps, DECODE_AB[phase], save))
        return res
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    t0 = time.perf_counter()
    if phase == "vllm":
        llm = make_llm(model, None)
        res["start_s"] = time.perf_counter() - t0
        gen(llm, [prompt(1, 512)])
        res["ttft"] = ttft_series(llm, phase, reps, kvtier=False, reset=False)
        res["decode"] = decode(llm, 7, 2)
        return res
    if phase == "offload":
        llm = make_llm(model, offload_kv(40))
        res["start_s"] = time.perf_counter() - t0
        gen(llm, [prompt(1, 512)])
        res["ttft"] = ttft_series(llm, phase, reps, kvtier=False, reset=True)
        return res
    extra: dict[str, Any] = {"disk_filter": False}
    if phase in ("kvtier", "kvtier-layerwise", "kvtier-crosslayer"):
        extra["cpu_cache_gb"] = 40
        extra["layerwise_onboard"] = phase != "kvtier"
        extra["cross_layer_blocks"] = phase == "kvtier-crosslayer"
    elif phase in ("kvtier-g3", "kvtier-g3-cost"):
        extra["onboard_cost_aware"] = phase == "kvtier-g3-cost"
        extra["disk_cache_gb"] = 30
        extra["disk_dir"] = str(workdir / "g3")
        extra["io_threads"] = 8
    llm = make_llm(model, kvtier_kv(extra))
    res["start_s"] = time.perf_counter() - t0
    res["pin_wait_s"] = wait_pinned(llm)
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    wconn: Any = get_kv_transfer_group()
    res["layout"] = str(wconn.worker.layout.kind.value)
    print(f"[{phase}] layout {res['layout']}, pinned in {res['pin_wait_s']:.1f} s", flush=True)
    for _ in range(2):  # the second run loads: kernels compile outside the measurements
        gen(llm, [prompt(1, 512)])
        settle(llm, True)
    if phase == "kvtier-g3-cost":
        res["cost"] = cost_series(llm, reps)
        return res
    res["ttft"] = ttft_series(llm, phase, reps, kvtier=True, reset=True)
    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
    res["counters"] = vars(sched.counters)
    if phase == "kvtier-g3":
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        from kvtier.hashing import salt_hash, sequence_hashes

        conn: Any = get_kv_transfer_group()
        disk = conn.worker.plane.disk
        p = prompt(seed_of(phase, 32768, 0), 32768)
        hashes = [h for h in sequence_hashes(p, 16, salt_hash(None, None)) if h in sched.disk]
        paths = [disk.path(h) for h in hashes]
        res["raw_read_gbps"] = [raw_reads(paths) for _ in range(2)]
        res["raw_read_blocks"] = len(hashes)
    if phase == "kvtier":
        res["decode"] = decode(llm, 9, 2)
    return res


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


NAN = float("nan")
COLUMNS = (
    ("recompute", "vllm", "recompute"),
    ("vLLM G1 hit", "vllm", "again"),
    ("OffloadingConnector", "offload", "again"),
    ("kvtier G2", "kvtier", "again"),
    ("kvtier G2 layer-wise", "kvtier-layerwise", "again"),
    ("kvtier G2 cross-layer", "kvtier-crosslayer", "again"),
    ("kvtier G3", "kvtier-g3", "again"),
)


def ttft_ms(results: dict[str, dict[str, Any]], phase: str, n: int, key: str) -> float:
    r = results.get(phase, {})
    if "ttft" not in r:
        return NAN
    return med_ms(r["ttft"][str(n)][key])


def ttft_table(results: dict[str, dict[str, Any]]) -> None:
    """The TTFT table, one row per prompt size (nan where a phase did not run)."""
    print("\nTTFT, median ms (one request, max_tokens=1)")
    print("| tokens | " + " | ".join(c[0] for c in COLUMNS) + " | best kvtier G2 / Offloading |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for n in SIZES:
        vals = [ttft_ms(results, ph, n, key) for _, ph, key in COLUMNS]
        g2 = [v for v in vals[3:6] if v == v]
        ratio = min(g2) / vals[2] if g2 and vals[2] == vals[2] else NAN
        print(f"| {n} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {ratio:.2f} |")


def report(results: dict[str, dict[str, Any]]) -> None:
    if any("ttft" in results.get(ph, {}) for _, ph, _ in COLUMNS):
        ttft_table(results)
    r = results.get("kvtier-g3", {})
    if "raw_read_gbps" in r:
        gb = r["raw_read_blocks"] * BLOCK_BYTES / 1e9
        t = ttft_ms(results, "kvtier-g3", 32768, "again")
        raw = statistics.median(r["raw_read_gbps"])
        print(
            f"\nG3 32k: {gb:.2f} GB, TTFT {t:.0f} ms = {gb / (t / 1e3):.2f} GB/s onboard "
            f"(forward pass included); raw O_DIRECT reads {raw:.2f} GB/s; "
            f"ratio {gb / (t / 1e3) / raw:.2f}"
        )
    for phase, spec in DECODE_AB.items():
        ab = results.get(phase, {}).get("decode_ab")
        if not ab:
            continue
        base, other = ab["vllm"], ab[spec.other]
        a, b = statistics.mean(base), statistics.mean(other)
        lo, hi = paired_interval(base, other)
        rounds = [round(k / v, 2) for v, k in zip(base, other, strict=True)]
        who = "kvtier" if spec.other == "kvtier" else "vLLM's OffloadingConnector"
        print(
            f"\n{phase}: decode 32 x (1k prompt + 256 new), "
            f"{'eager' if spec.eager else 'CUDA graphs'}, engines side by side, in turns: vLLM "
            f"{a:.0f} tok/s {[round(x) for x in base]}, vLLM + {who} storing every block "
            f"to {spec.cpu_gb} GB of host memory {b:.0f} tok/s {[round(x) for x in other]}, "
            f"ratio of means {b / a:.3f}, of bests {max(other) / max(base):.3f}, paired "
            f"(geometric mean of each round's ratio, order balanced) "
            f"{paired_ratio(base, other):.3f} (95% {lo:.3f}-{hi:.3f}; by round {rounds})"
        )
    c = results.get("kvtier-g3-cost", {}).get("cost")
    if c:
        load, rec, auto = (med_ms(c[m]) for m in ("load", "recompute", "auto"))
        faster = "load" if load < rec else "recompute"
        picked = ["load" if t else "recompute" for t in c["auto_g3_tokens"]]
        print(
            f"\nG3 32k, cost-aware: always-load {load:.0f} ms, always-recompute {rec:.0f} ms, "
            f"cost-aware {auto:.0f} ms (picked {picked}; faster: {faster}); "
            f"ratio to the better {auto / min(load, rec):.2f}"
        )
    if "decode" in results.get("vllm", {}) and "decode" in results.get("kvtier", {}):
        a = max(results["vllm"]["decode"])
        b = max(results["kvtier"]["decode"])
        print(
            f"\ndecode 32 x (1k prompt + 256 new): vLLM {a:.0f} tok/s, vLLM + kvtier storing "
            f"every block {b:.0f} tok/s, ratio {b / a:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="vllm_gpu.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--phases",
        default="vllm,offload,kvtier,kvtier-layerwise,kvtier-g3",
        help="comma list: vllm, offload, kvtier, kvtier-layerwise, kvtier-crosslayer, kvtier-g3, "
        "kvtier-g3-cost, decode-ab, decode-ab-evict, decode-ab-graphs, decode-ab-graphs-offload",
    )
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--report", nargs="+", help="only print the table of saved result files")
    ap.add_argument("--phase-timeout", type=float, default=240.0)
    args = ap.parse_args(argv)
    if args.report:
        merged: dict[str, dict[str, Any]] = {}
        for f in args.report:
            merged.update(json.loads(Path(f).read_text()))
        report(merged)
        return 0
    work = Path(tempfile.mkdtemp(prefix="kvtier-vllm-gpu-"))
    model = write_model(work / "llama3-8b-shape")
    if args.phase:
        res = run_phase(args.phase, model, args.reps, work, Path(args.out))
        Path(args.out).write_text(json.dumps(res))
        return 0
    results: dict[str, dict[str, Any]] = {}
    out = Path(args.out)
    for ph in args.phases.split(","):
        part = out.with_suffix(f".{ph}.json")
        cmd = [sys.executable, __file__, "--phase", ph, "--out", str(part)]
        cmd += ["--reps", str(args.reps)]
        t = time.perf_counter()
        try:
            rc = subprocess.run(cmd, timeout=args.phase_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
        print(f"== phase {ph}: rc {rc}, {time.perf_counter() - t:.0f} s", flush=True)
        if part.exists():
            results[ph] = json.loads(part.read_text())
        out.write_text(json.dumps(results, indent=1))
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
