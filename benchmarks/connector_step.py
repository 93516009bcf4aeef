"""kvtier's Python cost per engine step during decode, scheduler half and worker half apart.

Why this exists: on the H200, vLLM + kvtier storing every block decoded at 0.69-0.92 x vLLM
alone (issue 10 wants >= 0.97). A decode step there takes ~25 ms, so every millisecond kvtier
spends in Python on the engine's critical path costs ~4%. This drives the real connector
(``KvTierConnector`` in both roles: ``KvTierScheduler`` behind the scheduler role, ``KvTierWorker``
on its CPU path with ``TorchCopyEngine`` and a small torch KV cache behind the worker role) with
the calls vLLM 0.32 makes each step, built from vLLM's own classes (``Request``,
``SchedulerOutput``, ``NewRequestData``, ``CachedRequestData``, ``KVCacheBlocks``,
``KVConnectorOutput``), and times each half:

- scheduler role: ``get_num_new_matched_tokens`` / ``update_state_after_alloc`` for arrivals,
  ``build_connector_meta`` every step, ``update_connector_output``, ``get_kv_connector_stats``,
  ``take_events``, ``has_pending_push_work``, ``request_finished`` for requests that end;
- worker role (``KVConnectorModelRunnerMixin`` and ``maybe_transfer_kv_layer``):
  ``bind_connector_metadata``, ``start_load_kv``, per layer ``wait_for_layer_load`` and
  ``save_kv_layer``, ``wait_for_save``, ``get_transfer_results``,
  ``get_block_ids_with_load_errors``, ``get_kv_connector_stats``,
  ``get_kv_connector_kv_cache_events``, ``build_connector_worker_meta``,
  ``clear_connector_metadata``.

The workload is the decode benchmark of ``benchmarks/vllm_gpu.py``: 32 requests of 1024 prompt
tokens and 256 new tokens, 16-token blocks, 32 layers, every block stored to G2 (no filter, no
G3), prefill chunked under a token budget as vLLM's scheduler does. With equal prompts every
request fills a block on the same step (32 blocks every 16 steps: 2 per step on average);
``--stagger`` spreads the prompt lengths so about 2 blocks fill on every step. Figures are per
step: wall time and this thread's CPU time (the CPU path's ``wait_for_save`` waits for its copy
thread; the CUDA path does not), for all decode steps (no prefill token scheduled) and for the
prefill steps apart.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/connector_step.py`` (``--profile`` prints a cProfile
top-20 of the measured decode steps, ``--profile prefill`` of the prefill steps; ``--rounds N``
runs N batches one after the other).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from kvtier.vllm.connector import KvTierConnector


@dataclass(frozen=True)
class Workload:
    """The batch one round decodes, and the KV geometry (tiny bytes: the cost is per call)."""

    requests: int = 32
    prompt_tokens: int = 1024
    new_tokens: int = 256
    layers: int = 32
    block_size: int = 16
    kv_heads: int = 1
    head_dim: int = 8
    token_budget: int = 8192
    """vLLM's ``max_num_batched_tokens``: prefill is chunked under it."""
    stagger: bool = False
    host_blocks: int = 0
    """G2 size in blocks (0: room for every block of every round)."""
    disk_blocks: int = 0
    rounds: int = 1

    @property
    def blocks_per_request(self) -> int:
        return -(-(self.prompt_tokens + self.block_size + self.new_tokens) // self.block_size)


@dataclass
class _Run:
    req: Request
    block_ids: list[int]
    computed: int = 0
    new_block_ids: list[int] = field(default_factory=list)


@dataclass
class StepTimes:
    """Nanoseconds per step of each half, wall and this thread's CPU."""

    sched_wall: list[int] = field(default_factory=list)
    sched_cpu: list[int] = field(default_factory=list)
    worker_wall: list[int] = field(default_factory=list)
    worker_cpu: list[int] = field(default_factory=list)
    stores: list[int] = field(default_factory=list)
    prefill: list[bool] = field(default_factory=list)
    calls: list[dict[str, int]] = field(default_factory=list)
    """Wall nanoseconds per connector call (or group of calls) in each step."""


class _Clock:
    """Accumulates wall and thread-CPU nanoseconds of timed sections of one half, in total and
    per section name (``with clock("name"):``)."""

    def __init__(self) -> None:
        self.wall = 0
        self.cpu = 0
        self.by_name: dict[str, int] = {}
        self._name = ""
        self._w = 0
        self._c = 0

    def __call__(self, name: str) -> _Clock:
        self._name = name
        return self

    def __enter__(self) -> _Clock:
        self._w = time.perf_counter_ns()
        self._c = time.thread_time_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu += time.thread_time_ns() - self._c
        wall = time.perf_counter_ns() - self._w
        self.wall += wall
        self.by_name[self._name] = self.by_name.get(self._name, 0) + wall

    def take(self) -> tuple[int, int, dict[str, int]]:
        out = (self.wall, self.cpu, self.by_name)
        self.wall = self.cpu = 0
        self.by_name = {}
        return out


def _vllm_config(wl: Workload, host_blocks: int) -> Any:
    """The attributes of ``VllmConfig`` the connector reads (a CPU engine, one worker)."""
    extra: dict[str, Any] = {"cpu_cache_blocks": host_blocks, "disk_filter": False}
    if wl.disk_blocks:
        extra.update(disk_cache_blocks=wl.disk_blocks, disk_dir="/tmp/kvtier-connector-step")
    ktc = KVTransferConfig(
        kv_connector="KvTierConnector",
        kv_connector_module_path="kvtier.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )
    return SimpleNamespace(
        kv_transfer_config=ktc,
        parallel_config=SimpleNamespace(world_size=1, data_parallel_rank=0),
        device_config=SimpleNamespace(device_type="cpu"),
        scheduler_config=SimpleNamespace(async_scheduling=False),
        model_config=SimpleNamespace(model="connector-step-bench", revision="", dtype="float16"),
        compilation_config=SimpleNamespace(static_forward_context={}),
    )


class Engine:
    """A minimal vLLM engine loop around the two connector roles (see the module docstring)."""

    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        per_round = wl.requests * wl.blocks_per_request
        host_blocks = wl.host_blocks or per_round * wl.rounds
        self.num_gpu_blocks = per_round + 1
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(wl.layers)]
        spec = FullAttentionSpec(
            block_size=wl.block_size,
            num_kv_heads=wl.kv_heads,
            head_size=wl.head_dim,
            dtype=torch.float16,
        )
        kv_cfg = KVCacheConfig(
            num_blocks=self.num_gpu_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(self.names, spec)],
        )
        cfg = _vllm_config(wl, host_blocks)
        self.sched = KvTierConnector(cfg, KVConnectorRole.SCHEDULER, kv_cfg)
        self.worker = KvTierConnector(cfg, KVConnectorRole.WORKER, kv_cfg)
        shape = (self.num_gpu_blocks, wl.kv_heads, wl.block_size, 2 * wl.head_dim)  # CPU backend
        gen = torch.Generator().manual_seed(0)
        self.kv = {n: torch.randn(shape, generator=gen).half() for n in self.names}
        self.worker.register_kv_caches(self.kv)
        self.free = deque(range(self.num_gpu_blocks))
        self.waiting: deque[Request] = deque()
        self.running: list[_Run] = []
        self.held: dict[str, list[int]] = {}  # finished requests whose blocks the connector holds
        self.finished_ids: set[str] = set()
        self.s = _Clock()
        self.w = _Clock()
        self.times = StepTimes()
        self._rng = random.Random(0)
        self._next_id = 0
        self._first_step = True

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()

    def add_round(self) -> None:
        wl = self.wl
        sp = SamplingParams(max_tokens=wl.new_tokens, ignore_eos=True, detokenize=False)
        for i in range(wl.requests):
            n = wl.prompt_tokens + (i % wl.block_size if wl.stagger else 0)
            prompt = [self._rng.randrange(1, 32000) for _ in range(n)]
            self.waiting.append(Request(f"req-{self._next_id}", prompt, sp, None))
            self._next_id += 1

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    def _alloc(self, run: _Run, tokens: int) -> None:
        need = -(-tokens // self.wl.block_size) - len(run.block_ids)
        for _ in range(max(0, need)):
            b = self.free.popleft()
            run.block_ids.append(b)
            run.new_block_ids.append(b)

    def step(self) -> None:
        """One engine step: schedule, plan, run the worker role, apply its output."""
        wl = self.wl
        budget = wl.token_budget
        scheduled: dict[str, int] = {}
        cached: list[_Run] = []
        new: list[_Run] = []
        prefill = False
        for run in self.running:
            n = min(run.req.num_tokens - run.computed, budget)
            if n <= 0:
                continue
            prefill = prefill or run.computed < run.req.num_prompt_tokens
            self._alloc(run, run.computed + n)
            scheduled[run.req.request_id] = n
            budget -= n
            cached.append(run)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            with self.s("get_num_new_matched_tokens"):
                ext, _ = self.sched.get_num_new_matched_tokens(req, 0)
            if ext is None:  # G3 index not known yet: vLLM retries next step
                break
            if ext:
                raise RuntimeError("this benchmark's prompts are fresh: no hits are modelled")
            self.waiting.popleft()
            run = _Run(req, [])
            n = min(req.num_tokens, budget)
            self._alloc(run, n)
            blocks = KVCacheBlocks(([KVCacheBlock(b) for b in run.block_ids],))
            with self.s("update_state_after_alloc"):
                self.sched.update_state_after_alloc(req, blocks, 0)
            scheduled[req.request_id] = n
            budget -= n
            prefill = True
            new.append(run)
            self.running.append(run)
        so = SchedulerOutput(
            scheduled_new_reqs=[
                NewRequestData.from_request(r.req, (list(r.block_ids),)) for r in new
            ],
            scheduled_cached_reqs=CachedRequestData(
                req_ids=[r.req.request_id for r in cached],
                resumed_req_ids=set(),
                new_token_ids=[],
                all_token_ids={},
                new_block_ids=[_new_ids(r) for r in cached],
                num_computed_tokens=[r.computed for r in cached],
                num_output_tokens=[r.req.num_output_tokens for r in cached],
            ),
            num_scheduled_tokens=scheduled,
            total_num_scheduled_tokens=sum(scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            num_common_prefix_blocks=[0],
            finished_req_ids=self.finished_ids,
            free_encoder_mm_hashes=[],
        )
        self.finished_ids = set()
        for r in new + cached:
            r.new_block_ids = []
        with self.s("build_connector_meta"):
            meta = self.sched.build_connector_meta(so)
        so.kv_connector_metadata = meta
        stores = len(meta.plan.stores.gpu_blocks)  # type: ignore[attr-defined]
        w = self.worker  # the model runner's execute_model around the forward pass
        with self.w("bind_connector_metadata"):
            w.bind_connector_metadata(meta)
        with self.w("wait_for_layer_load+save_kv_layer x layers"):
            for name in self.names:  # maybe_transfer_kv_layer around each attention layer
                w.wait_for_layer_load(name)
                w.save_kv_layer(name, self.kv[name], None)  # type: ignore[arg-type]
        with self.w("start_load_kv"):
            w.start_load_kv(None)  # type: ignore[arg-type]  # after the forward: no sync loads
        with self.w("wait_for_save"):
            w.wait_for_save()
        with self.w("get_transfer_results..clear_connector_metadata"):
            results = w.get_transfer_results(so.finished_req_ids)
            out = KVConnectorOutput(
                finished_sending=results.finished_sending,
                finished_recving=results.finished_recving,
                invalid_block_ids=w.get_block_ids_with_load_errors(),
                kv_connector_stats=w.get_kv_connector_stats(),
                kv_cache_events=w.get_kv_connector_kv_cache_events(),
                kv_connector_worker_meta=w.build_connector_worker_meta(),
            )
            w.clear_connector_metadata()
        with self.s("update_connector_output"):  # the scheduler's update_from_output
            self.sched.update_connector_output(out)
        with self.s("get_kv_connector_stats+take_events"):
            self.sched.get_kv_connector_stats()
            self.sched.take_events()
        for rid in out.finished_sending or ():
            self.free.extend(self.held.pop(rid))
        still: list[_Run] = []
        for run in self.running:
            n = scheduled.get(run.req.request_id, 0)
            run.computed += n
            run.req.num_computed_tokens = run.computed
            if n and run.computed >= run.req.num_tokens:  # sampled one token
                run.req.append_output_token_ids(7 + run.computed % 1000)
            if run.req.num_output_tokens >= wl.new_tokens:
                with self.s("request_finished"):
                    delay, _ = self.sched.request_finished(run.req, run.block_ids)
                self.finished_ids.add(run.req.request_id)
                if delay:
                    self.held[run.req.request_id] = run.block_ids
                else:
                    self.free.extend(run.block_ids)
            else:
                still.append(run)
        self.running = still
        with self.s("has_pending_push_work"):
            self.sched.has_pending_push_work()
        sw, sc, scalls = self.s.take()
        ww, wc, wcalls = self.w.take()
        t = self.times
        t.sched_wall.append(sw)
        t.sched_cpu.append(sc)
        t.worker_wall.append(ww)
        t.worker_cpu.append(wc)
        t.stores.append(stores)
        t.prefill.append(prefill)
        t.calls.append({**{f"S {k}": v for k, v in scalls.items()}, **wcalls_named(wcalls)})


def wcalls_named(calls: dict[str, int]) -> dict[str, int]:
    return {f"W {k}": v for k, v in calls.items()}


def _new_ids(run: _Run) -> tuple[list[int], ...] | None:
    return (list(run.new_block_ids),) if run.new_block_ids else None


def _us(values: list[int]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) / 1e3
    med = statistics.median(values) / 1e3
    p90 = sorted(values)[int(0.9 * (len(values) - 1))] / 1e3
    return f"mean {mean:7.1f}  median {med:7.1f}  p90 {p90:7.1f}"


def report(t: StepTimes, skip: int) -> None:
    for label, want_prefill in (("decode steps", False), ("prefill steps", True)):
        idx = [i for i in range(skip, len(t.prefill)) if t.prefill[i] == want_prefill]
        if not idx:
            continue
        blocks = sum(t.stores[i] for i in idx) / len(idx)
        print(f"{label}: {len(idx)}, G2 stores per step {blocks:.2f} (us per step)")
        for name, series in (
            ("scheduler wall", t.sched_wall),
            ("scheduler cpu ", t.sched_cpu),
            ("worker wall   ", t.worker_wall),
            ("worker cpu    ", t.worker_cpu),
        ):
            print(f"  {name}  {_us([series[i] for i in idx])}")
        total = [t.sched_wall[i] + t.worker_wall[i] for i in idx]
        print(f"  total wall      {_us(total)}")
        names = sorted({k for i in idx for k in t.calls[i]})
        print("  per call, wall us per step (mean, median over these steps):")
        for k in names:
            per_step = [t.calls[i].get(k, 0) for i in idx]
            mean, med = statistics.fmean(per_step) / 1e3, statistics.median(per_step) / 1e3
            print(f"    {mean:8.1f} {med:8.1f}  {k}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="batches, one after the other")
    p.add_argument("--stagger", action="store_true", help="spread prompt lengths over a block")
    p.add_argument("--host-blocks", type=int, default=0, help="G2 blocks (0: room for all)")
    p.add_argument(
        "--profile",
        nargs="?",
        const="decode",
        choices=("decode", "prefill"),
        help="cProfile top-20 of the last round's decode (default) or prefill steps",
    )
    args = p.parse_args(argv)
    logging.getLogger("vllm").setLevel(logging.ERROR)
    wl = Workload(
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        layers=args.layers,
        stagger=args.stagger,
        host_blocks=args.host_blocks,
        rounds=args.rounds,
    )
    eng = Engine(wl)
    prof = cProfile.Profile() if args.profile else None
    try:
        skip = 0
        for r in range(wl.rounds):
            last = r == wl.rounds - 1
            if last:
                skip = len(eng.times.prefill)  # the first round(s) warm up
            eng.add_round()
            while eng.busy:
                decoding = not eng.waiting and all(
                    x.computed >= x.req.num_prompt_tokens for x in eng.running
                )
                if prof is not None and last and decoding == (args.profile == "decode"):
                    prof.enable()
                eng.step()
                if prof is not None:
                    prof.disable()
        while eng.sched.has_pending_push_work():  # drain what is in flight (not measured)
            eng.step()
        sched = eng.sched.scheduler
        assert sched is not None
        sched.check_invariants()
        print(
            f"kvtier connector step cost: {wl.requests} requests x ({wl.prompt_tokens} prompt + "
            f"{wl.new_tokens} new tokens), {wl.layers} layers, {wl.block_size}-token blocks, "
            f"stagger={wl.stagger}, rounds={wl.rounds} (last one measured); "
            f"G2 holds {len(sched.host)} blocks, {sched.counters.offload_d2h} stored"
        )
        report(eng.times, skip)
    finally:
        eng.close()
    if prof is not None:
        print(
            f"cProfile of the last round's {args.profile} steps (the benchmark's own loop "
            "included):"
        )
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats("kvtier/", 20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
