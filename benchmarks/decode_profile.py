"""Where a decode step's time goes with kvtier storing every block: a stack sampler in the engine.

Why this exists: on an H100, ``benchmarks/vllm_gpu.py --phases decode-ab`` measured vLLM + kvtier
at 0.92-0.95 of vLLM alone (issue 10 wants >= 0.97), while ``benchmarks/connector_step.py``
puts kvtier's own Python at ~0.25 ms of a ~20 ms step. Under ``enforce_eager`` a decode step is
bound by the engine thread's Python, so what matters is where that thread spends its time and
which other threads run Python beside it. This runs one engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core, the scheduler half and the worker share
the main thread) with the decode workload of ``vllm_gpu.py`` (32 x 1k-token prompts, 256 new
tokens), and samples every thread's Python stack at ``--hz`` while it decodes:

- the share of the main thread's samples with any ``kvtier/`` frame, and the ``kvtier/``
  functions by inclusive share;
- the leaf functions of the main thread (where it waits for the GPU, and how long);
- the other threads seen running Python (not parked in a wait), by name and top frames.

Over the plain rounds (sampler off) it also records each engine step's wall time (a few long
stalls, or every step slower?), each thread's CPU time over wall time from /proc (a thread that
spins outside Python shows there, not in the sampler), the cyclic collector's time and the
machine's busy cores.

Decode rates are printed with the sampler off (``plain``) and on (``sampled``): its cost is the
difference. One engine per process; run it once per kind on the same machine::

    python3 benchmarks/decode_profile.py vllm $OUT
    python3 benchmarks/decode_profile.py kvtier $OUT

``kvtier`` stores every block to a 40 GB G2 (as ``decode-ab`` does) and waits for G2 to be
pinned before measuring; ``kvtier-small`` uses a 4 GB G2 (pinned within seconds, evicting);
``kvtier-nogate`` is ``kvtier`` with ``GpuDataPath.gate_forward`` made a no-op (the forward pass
no longer waits for the last store's gather: measures what that wait costs; safe here only
because this workload preempts nothing and vLLM holds finished requests' blocks until stored);
``kvtier-nostore`` is ``kvtier`` with ``GpuDataPath.store`` a no-op (the scheduler half plans
every store, the worker copies nothing: what remains is kvtier's Python and vLLM's connector
paths; the planned blocks stay pending in G2, harmless for one measurement).
Needs a CUDA GPU and a GPU build of vLLM (``../shared/gpu-vllm``).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_gpu as vg

KINDS = {"vllm": None, "kvtier": 40, "kvtier-small": 4, "kvtier-nogate": 40, "kvtier-nostore": 40}
"""Engine kinds: G2 size in GB (None: vLLM alone)."""

WAITS = {
    "wait",
    "_wait_for_tstate_lock",
    "select",
    "poll",
    "sleep",
    "get",
    "recv",
    "recv_multipart",
    "acquire",
    "synchronize",
    "accept",
    "_worker",
    "run_forever",
    "readinto",
}
"""Top frames of a thread parked outside Python (not holding the interpreter)."""


def _frames(f: FrameType | None) -> list[str]:
    """``file:function`` from the innermost frame out, paths shortened."""
    out: list[str] = []
    while f is not None:
        name = f.f_code.co_filename.split("site-packages/")[-1].split("/work/")[-1]
        out.append(f"{name}:{f.f_code.co_name}")
        f = f.f_back
    return out


class Sampler:
    """Samples every thread's stack ``hz`` times a second on a thread of its own."""

    def __init__(self, hz: float) -> None:
        self.period = 1.0 / hz
        self.main = threading.main_thread().ident
        self.stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.others: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-profile", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.period):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = _frames(frame)
                if ident == self.main:
                    self.stacks[tuple(reversed(stack))] += 1
                elif stack and stack[0].rsplit(":", 1)[-1] not in WAITS:
                    below = stack[1] if len(stack) > 1 else ""
                    self.others[f"{names.get(ident, ident)} | {stack[0]} | {below}"] += 1

    def summary(self) -> dict[str, Any]:
        total = max(1, sum(self.stacks.values()))
        inclusive: collections.Counter[str] = collections.Counter()
        leaf: collections.Counter[str] = collections.Counter()
        in_kvtier = 0
        for stack, n in self.stacks.items():
            leaf[stack[-1]] += n
            for fr in set(stack):
                inclusive[fr] += n
            in_kvtier += n if any("kvtier/" in fr for fr in stack) else 0
        mine = [(f, n) for f, n in inclusive.most_common() if "kvtier/" in f]
        return {
            "samples": total,
            "kvtier_share": in_kvtier / total,
            "kvtier_inclusive": [(f, round(n / total, 4)) for f, n in mine[:40]],
            "leaf": [(f, round(n / total, 4)) for f, n in leaf.most_common(40)],
            "inclusive": [(f, round(n / total, 4)) for f, n in inclusive.most_common(60)],
            "other_threads_running": self.others.most_common(30),
        }


def thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process, by name (a thread that spins,
    e.g. in a CUDA event wait, shows here though the sampler sees it parked)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        tid = int(task.name)
        name = names.get(tid, comm)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def numa_state() -> dict[str, Any]:
    """Free memory per NUMA node, the CPUs this process may run on and the node of the CPU the
    main thread last ran on, and this process's resident pages per node: a 40 GB pinned G2 can
    fill the engine's node, so that every later allocation of the engine thread lands remote."""
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    free: dict[str, float] = {}
    cpus_of: dict[str, str] = {}
    for node in nodes:
        for line in (node / "meminfo").read_text().splitlines():
            if "MemFree:" in line:
                free[node.name] = round(int(line.split()[-2]) / 2**20, 1)
        cpus_of[node.name] = (node / "cpulist").read_text().strip()
    pages: collections.Counter[str] = collections.Counter()
    try:
        for line in Path("/proc/self/numa_maps").read_text().splitlines():
            for field in line.split():
                if field[:1] == "N" and "=" in field:
                    k, v = field.split("=", 1)
                    pages[k] += int(v)
    except OSError:
        pass
    cpu = int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])
    return {
        "free_gb": free,
        "cpus_of_node": cpus_of,
        "allowed_cpus": len(os.sched_getaffinity(0)),
        "main_cpu": cpu,
        "resident_pages_by_node": dict(pages),
    }


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU of the machine since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return float(sum(f) - idle), float(sum(f))


class GcTimer:
    """Time the cyclic collector runs on this process's threads, per generation: a collection
    runs inside whatever frame allocated, so the sampler spreads it over every function."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t = 0.0

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self._t
            self.count[g] += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)


class StepTimer:
    """Wall time of each engine-core step (in-process engine): long stalls vs uniform slowdown."""

    def __init__(self, llm: Any) -> None:
        self.core = llm.llm_engine.engine_core.engine_core
        self.orig = self.core.step_fn
        self.times: list[float] = []

    def __enter__(self) -> StepTimer:
        def timed() -> Any:
            t = time.perf_counter()
            try:
                return self.orig()
            finally:
                self.times.append(time.perf_counter() - t)

        self.core.step_fn = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.core.step_fn = self.orig

    def summary(self) -> dict[str, float]:
        ts = sorted(self.times)
        if not ts:
            return {}

        def q(f: float) -> float:
            return ts[min(len(ts) - 1, int(f * len(ts)))] * 1e3

        return {
            "steps": len(ts),
            "total_s": sum(ts),
            "p50_ms": q(0.5),
            "p90_ms": q(0.9),
            "p99_ms": q(0.99),
            "max_ms": ts[-1] * 1e3,
            "over_50ms_s": sum(t for t in ts if t > 0.05),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("out", type=Path, help="folder for decode_profile_<kind>.json")
    ap.add_argument("--reps", type=int, default=2, help="decode rounds per measurement")
    ap.add_argument("--hz", type=float, default=200.0)
    ap.add_argument(
        "--graphs",
        action="store_true",
        help="vLLM's default compilation and CUDA graphs instead of enforce_eager",
    )
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    args.out.mkdir(parents=True, exist_ok=True)
    model = vg.write_model(Path(tempfile.mkdtemp(prefix="kvtier-decode-")) / "model")
    gb = KINDS[args.kind]
    if args.kind == "kvtier-nogate":
        from kvtier.vllm.gpu_path import GpuDataPath

        GpuDataPath.gate_forward = lambda self: None  # type: ignore[method-assign]
    if args.kind == "kvtier-nostore":
        from kvtier.vllm.gpu_path import GpuDataPath

        GpuDataPath.store = lambda self, plan, step_failed: None  # type: ignore[method-assign]
    kv = None if gb is None else vg.store_all_kv(gb)
    llm = vg.make_llm(model, kv, 0.80, eager=not args.graphs)
    res: dict[str, Any] = {"kind": args.kind, "graphs": args.graphs, "numa_start": numa_state()}
    res["warm_up"] = vg.decode(llm, 1, 2)
    if kv is not None:
        res["pin_wait_s"] = vg.wait_pinned(llm)
    res["numa_measured"] = numa_state()
    cpu0, sys0, t0 = thread_cpu(), system_busy(), time.perf_counter()
    with StepTimer(llm) as steps, GcTimer() as gct:
        res["plain"] = vg.decode(llm, 20, args.reps)
    wall, cpu1, sys1 = time.perf_counter() - t0, thread_cpu(), system_busy()
    cores = os.cpu_count() or 1
    res["machine_busy_cores"] = (sys1[0] - sys0[0]) / (sys1[1] - sys0[1]) * cores
    res["steps"] = steps.summary()
    res["gc"] = {"seconds": gct.seconds, "count": gct.count, "objects": len(gc.get_objects())}
    busy = {k: (v - cpu0.get(k, 0.0)) / wall for k, v in cpu1.items()}
    res["thread_cpu_share"] = sorted(
        ((k, round(v, 3)) for k, v in busy.items() if v > 0.005), key=lambda kv: -kv[1]
    )
    with Sampler(args.hz) as sampler:
        res["sampled"] = vg.decode(llm, 40, args.reps)
    res["profile"] = p = sampler.summary()
    (args.out / f"decode_profile_{args.kind}.json").write_text(json.dumps(res, indent=1))
    rates = {k: [round(x) for x in res[k]] for k in ("warm_up", "plain", "sampled")}
    mode = "CUDA graphs" if args.graphs else "eager"
    share = p["kvtier_share"]
    print(f"{args.kind} ({mode}): tok/s {rates}; kvtier share of the engine thread {share:.4f}")
    print(f"engine steps (plain): {res['steps']}")
    print(f"gc (plain): {res['gc']}; machine busy cores {res['machine_busy_cores']:.2f}")
    print(f"thread CPU / wall (plain): {res['thread_cpu_share']}")
    print(f"numa at start: {res['numa_start']}\nnuma measured: {res['numa_measured']}")
    for f, share in p["kvtier_inclusive"][:25]:
        print(f"  {share:.4f} {f}")
    print("main thread leaves:")
    for f, share in p["leaf"][:15]:
        print(f"  {share:.4f} {f}")
    print("other threads running Python (samples):")
    for name, n in p["other_threads_running"][:15]:
        print(f"  {n} {name}")
    sys.stdout.flush()
    os._exit(0)  # the in-process engine's shutdown can hang; nothing is left to write


if __name__ == "__main__":
    raise SystemExit(main())
