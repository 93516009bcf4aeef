"""kvtier with tensor parallelism: ``tensor_parallel_size=2`` on vLLM's CPU build (2 workers).

The tiny Llama has 2 KV heads, so each rank holds 1 head of every block (half the bytes) in its
own G2 and its own G3 folder (``<disk_dir>/rank<N>``); the scheduler half plans once for both
ranks and merges their reports (the first tests drive that merge directly, without an engine).
With a real engine: greedy outputs are identical whether the KV is recomputed, reused from
vLLM's own prefix cache, or loaded from G2 or G3; a block corrupted on one rank only is a load
error for the whole block (vLLM recomputes it on both ranks, and it is stored again); the ranks'
files are never mixed (each rank's files swapped into the other's folder are load errors, never
served); a new engine (new engine-core and worker processes) hits G3 on both ranks, and a block
one rank lost is a miss whose other shard is deleted.

Running TP=2 on the CPU build: vLLM's automatic OpenMP binding wants one NUMA node per rank and
refuses a one-node machine, so the module binds rank N to the N-th allowed CPU with
``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (unless the caller set it); ``VLLM_CPU_NUM_OF_RESERVED_CPU``
only applies to the automatic binding and is not needed. The CPU platform's distributed backend
is gloo (vLLM's default there). The engine core stays in-process (``VLLM_ENABLE_V1_MULTIPROCESSING
=0``) so the tests read the scheduler half's counters; the workers are processes either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import (
    BLOCK,
    drain,
    engine,
    generate,
    prompt,
    reset_g1,
    scheduler_connector,
)

from kvtier.config import ModelConfig
from kvtier.executor.jobs import WorkerReport
from kvtier.hashing import salt_hash, sequence_hashes
from kvtier.ops.diskscan import verify_block_file
from kvtier.ops.tinymodel import TinyLlamaSpec
from kvtier.storage.block_file import file_size
from kvtier.storage.identity import ModelIdentity
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig

TP = 2
TOKENS = 16


# -- the scheduler half merging the reports of two ranks (no engine) ------------------------------


@dataclass
class _Request:
    request_id: str
    all_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def _tp_scheduler(restored: list[list[int]]) -> KvTierScheduler:
    s = KvTierScheduler(
        SchedulerConfig(
            block_size=4, host_blocks=0, disk_blocks=8, disk_filter=False, num_workers=TP
        )
    )
    s.process_reports([WorkerReport(rank=r, restored=found) for r, found in enumerate(restored)])
    return s


def test_restart_keeps_only_blocks_every_rank_found() -> None:
    s = _tp_scheduler([[1, 2, 3], [3, 2, 4]])
    assert [s.disk.lookup(h) is not None for h in (1, 2, 3, 4)] == [False, True, True, False]
    # Each lone shard is useless: its rank deletes it at the next step (no orphans on disk).
    assert sorted(s.build_step_plan([], [], {}).disk_deletes) == [1, 4]


def test_block_bad_on_one_rank_is_bad_on_all() -> None:
    tokens = list(range(9))
    h0, h1 = sequence_hashes(tokens, 4, salt_hash())
    s = _tp_scheduler([[h1, h0], [h1, h0]])
    req = _Request("a", tokens)
    assert s.get_num_new_matched_tokens(req, 0) == (8, True)
    s.update_state_after_alloc(req, [7, 8, 9], 8)
    (job,) = s.build_step_plan([], [], {}).loads
    # Rank 1 found its shard of h1 corrupt; rank 0 loaded both of its shards.
    s.process_reports(
        [
            WorkerReport(rank=0, loads_done=[job.job_id]),
            WorkerReport(rank=1, loads_done=[job.job_id], disk_bad=[h1], disk_load_failed=1),
        ]
    )
    assert s.disk.lookup(h1) is None and s.disk.lookup(h0) is not None
    assert s.disk.num_pinned == 0
    s.check_invariants()
    # vLLM recomputes from block 1: rank 0's intact shard is deleted, then both ranks store anew.
    plan = s.build_step_plan([("a", [7, 8, 9], 4)], [], {"a": 5})
    assert plan.disk_deletes == [h1]
    assert [w.seq_hash for w in plan.disk_writes] == [h1]


def test_rank_namespaces_differ() -> None:
    fp = 0x1234
    names = {
        ModelIdentity(model="m", tp_rank=r, tp_size=n).namespace(fp)
        for n in (1, 2, 4)
        for r in range(n)
    }
    assert len(names) == 7
    with pytest.raises(ValueError, match=r"tp_rank must be in 0\.\.1"):
        ModelIdentity(model="m", tp_rank=2, tp_size=2)


# -- a real engine with two worker processes -----------------------------------------------------


@pytest.fixture(scope="module")
def cpu_binding() -> Iterator[None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < TP:
        pytest.skip(f"TP={TP} on vLLM's CPU build needs {TP} CPUs, this process may use {cpus}")
    var = "VLLM_CPU_OMP_THREADS_BIND"
    old = os.environ.get(var)
    if old is None:
        os.environ[var] = "|".join(str(c) for c in cpus[:TP])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("g3-tp")


def _extra(disk_dir: Path) -> dict[str, Any]:
    return {
        "cpu_cache_blocks": 2,
        "disk_cache_blocks": 64,
        "disk_dir": str(disk_dir),
        "disk_filter": False,
    }


class _Engine:
    """The module's first engine, closable early (the restart test needs it gone)."""

    def __init__(self, stack: contextlib.ExitStack, llm: Any) -> None:
        self._stack = stack
        self.llm: Any = llm

    def close(self) -> None:
        self.llm = None
        self._stack.close()


@pytest.fixture(scope="module")
def tp(tiny_model: Path, disk_dir: Path, cpu_binding: None) -> Iterator[_Engine]:
    stack = contextlib.ExitStack()
    llm = stack.enter_context(
        engine(tiny_model, _extra(disk_dir), in_process=True, tensor_parallel_size=TP)
    )
    holder = _Engine(stack, llm)
    try:
        yield holder
    finally:
        holder.close()


def _llm(tp: _Engine) -> Any:
    if tp.llm is None:
        pytest.skip("the first engine was closed by the restart test")
    return tp.llm


def _hashes(p: list[int]) -> list[int]:
    return sequence_hashes(p, BLOCK, salt_hash())


def _rank_file(disk_dir: Path, rank: int, h: int) -> Path:
    (path,) = (disk_dir / f"rank{rank}").glob(f"*/{h:016x}.kvb")
    return path


def _rank_files(disk_dir: Path, rank: int, h: int) -> list[Path]:
    return list((disk_dir / f"rank{rank}").glob(f"*/{h:016x}.kvb"))


_filler_seed = [900]


def _only_in_g3(llm: Any, hashes: list[int]) -> None:
    """Push ``hashes`` out of the 2-slot G2 (a filler prompt takes it), leaving them in G3."""
    _filler_seed[0] += 1
    generate(llm, [prompt(_filler_seed[0], 2 * BLOCK + 3)], max_tokens=1)
    drain(llm)
    s = scheduler_connector(llm).scheduler
    assert all(s.host.lookup(h) is None for h in hashes)
    assert all(s.disk.lookup(h) is not None for h in hashes)


@pytest.mark.vllm
@pytest.mark.slow
def test_recompute_g1_and_g2_agree_and_each_rank_holds_half(tp: _Engine, disk_dir: Path) -> None:
    llm = _llm(tp)
    c = scheduler_connector(llm).scheduler.counters
    p = prompt(1, 2 * BLOCK + 77)
    [(cold, cached0)] = generate(llm, [p], max_tokens=TOKENS)
    [(g1, cached1)] = generate(llm, [p], max_tokens=TOKENS)  # vLLM's own prefix cache
    assert (cached0, cached1) == (0, 2 * BLOCK)
    drain(llm)
    before = (c.host_hit_blocks, c.disk_hit_blocks)
    reset_g1(llm)
    [(g2, cached2)] = generate(llm, [p], max_tokens=TOKENS)
    assert g1 == cold and g2 == cold
    assert cached2 == 2 * BLOCK
    assert (c.host_hit_blocks - before[0], c.disk_hit_blocks - before[1]) == (2, 0)
    # Each rank stored its own shard: 1 of the 2 KV heads, half a block, in its own namespace.
    spec = TinyLlamaSpec()
    shard = ModelConfig(
        num_layers=spec.num_hidden_layers,
        block_size=BLOCK,
        num_kv_heads=spec.num_key_value_heads // TP,
        head_dim=spec.head_dim,
        dtype="float32",
    )
    folders = set()
    for h in _hashes(p):
        for rank in range(TP):
            path = _rank_file(disk_dir, rank, h)
            assert path.stat().st_size == file_size(shard.block_bytes)
            header = verify_block_file(path, int(path.parent.name, 16))
            assert header.sequence_hash == h
            folders.add((rank, path.parent.name))
    assert len({name for _, name in folders}) == TP  # the rank is in the G3 namespace


@pytest.mark.vllm
@pytest.mark.slow
def test_g3_hits_on_both_ranks_after_reset(tp: _Engine) -> None:
    llm = _llm(tp)
    c = scheduler_connector(llm).scheduler.counters
    p = prompt(2, 5 * BLOCK + 40)
    [(cold, _)] = generate(llm, [p], max_tokens=TOKENS)
    drain(llm)
    _only_in_g3(llm, _hashes(p))
    before = (c.host_hit_blocks, c.disk_hit_blocks, c.load_failures)
    reset_g1(llm)
    [(g3, cached)] = generate(llm, [p], max_tokens=TOKENS)
    assert (g3, cached) == (cold, 5 * BLOCK)
    after = (c.host_hit_blocks, c.disk_hit_blocks, c.load_failures)
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (0, 5, 0)


@pytest.mark.vllm
@pytest.mark.slow
def test_block_corrupt_on_one_rank_is_recomputed_on_both(tp: _Engine, disk_dir: Path) -> None:
    llm = _llm(tp)
    s = scheduler_connector(llm).scheduler
    c = s.counters
    p = prompt(3, 4 * BLOCK + 9)
    hashes = _hashes(p)
    [(cold, _)] = generate(llm, [p], max_tokens=TOKENS)
    drain(llm)
    _only_in_g3(llm, hashes)
    victim = hashes[1]
    bad = _rank_file(disk_dir, 1, victim)
    data = bytearray(bad.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # rank 1's shard only; rank 0's is intact
    bad.write_bytes(bytes(data))
    before = (c.load_failures, c.disk_corrupt, c.disk_load_failures)
    reset_g1(llm)
    # (vLLM's num_cached_tokens counts the planned hit, 4 blocks, before the load failed.)
    [(out, _)] = generate(llm, [p], max_tokens=TOKENS)
    # vLLM recomputed the block on both ranks (and the ones after it): never half a block served.
    assert out == cold
    after = (c.load_failures, c.disk_corrupt, c.disk_load_failures)
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1, 1, 1)
    drain(llm)
    # Stored again from the recomputed KV, on both ranks, and whole: the next request is all hits.
    assert s.disk.lookup(victim) is not None or s.host.lookup(victim) is not None
    for rank in range(TP):
        path = _rank_file(disk_dir, rank, victim)
        verify_block_file(path, int(path.parent.name, 16))
    reset_g1(llm)
    [(again, cached2)] = generate(llm, [p], max_tokens=TOKENS)
    assert (again, cached2) == (cold, 4 * BLOCK)


@pytest.mark.vllm
@pytest.mark.slow
def test_ranks_never_read_each_others_files(tp: _Engine, disk_dir: Path) -> None:
    llm = _llm(tp)
    c = scheduler_connector(llm).scheduler.counters
    p = prompt(4, 3 * BLOCK + 5)
    hashes = _hashes(p)
    [(cold, _)] = generate(llm, [p], max_tokens=TOKENS)
    drain(llm)
    _only_in_g3(llm, hashes)
    # Swap the two ranks' files of every block: each file is whole and checksums fine, but it
    # is the other rank's shard (the other KV head). Served, it would change the output.
    for h in hashes:
        r0, r1 = _rank_file(disk_dir, 0, h), _rank_file(disk_dir, 1, h)
        b0, b1 = r0.read_bytes(), r1.read_bytes()
        assert b0[4096:] != b1[4096:]
        r0.write_bytes(b1)
        r1.write_bytes(b0)
    before = (c.disk_corrupt, c.disk_hit_blocks)
    reset_g1(llm)
    [(out, _)] = generate(llm, [p], max_tokens=TOKENS)
    assert out == cold
    # Both ranks refused every file (another rank's namespace) and removed it.
    assert (c.disk_corrupt - before[0], c.disk_hit_blocks - before[1]) == (TP * 3, 3)
    drain(llm)
    reset_g1(llm)
    [(again, cached2)] = generate(llm, [p], max_tokens=TOKENS)
    assert (again, cached2) == (cold, 3 * BLOCK)


@pytest.mark.vllm
@pytest.mark.slow
def test_restart_hits_on_both_ranks(
    tp: _Engine, tiny_model: Path, disk_dir: Path, cpu_binding: None
) -> None:
    llm = _llm(tp)
    kept = [prompt(50 + i, 3 * BLOCK + 7 * i + 1) for i in range(2)]
    lost = prompt(60, 2 * BLOCK + 9)
    cold = generate(llm, [*kept, lost], max_tokens=TOKENS)
    drain(llm)
    tp.close()
    # Rank 1 loses its shards of ``lost``: the block is unusable, rank 0's shards are orphans.
    for h in _hashes(lost):
        _rank_file(disk_dir, 1, h).unlink()
        assert _rank_files(disk_dir, 0, h)
    # A new engine: engine core and both workers are new processes over the same disk_dir.
    with engine(tiny_model, _extra(disk_dir), in_process=False, tensor_parallel_size=TP) as new:
        out = generate(new, kept, max_tokens=TOKENS)
        assert out == [(o, 3 * BLOCK) for o, _ in cold[:2]]
        # No rank kept a shard of a block that another rank lost (rank 0's were deleted) ...
        assert not any(_rank_files(disk_dir, 0, h) for h in _hashes(lost))
        # ... and that block is a miss, recomputed and stored again on both ranks.
        assert generate(new, [lost], max_tokens=TOKENS) == [(cold[2][0], 0)]
    for h in _hashes(lost):
        for rank in range(TP):
            path = _rank_file(disk_dir, rank, h)
            verify_block_file(path, int(path.parent.name, 16))


@pytest.mark.vllm
@pytest.mark.slow
def test_layerwise_onboard_from_g3_with_a_rank_corrupt(
    tiny_model: Path, tmp_path: Path, cpu_binding: None
) -> None:
    """Loads inside the forward pass (each rank's layer waits for its own shard); no G2, so
    every block goes GPU -> G3 directly; a block corrupt on rank 0 only is recomputed."""
    extra = {
        "cpu_cache_blocks": 0,
        "disk_cache_blocks": 16,
        "disk_dir": str(tmp_path),
        "disk_filter": False,
        "layerwise_onboard": True,
    }
    p = prompt(7, 4 * BLOCK + 9)
    hashes = _hashes(p)
    with engine(tiny_model, extra, in_process=True, tensor_parallel_size=TP) as llm:
        c = scheduler_connector(llm).scheduler.counters
        [(cold, _)] = generate(llm, [p], max_tokens=TOKENS)
        drain(llm)
        reset_g1(llm)
        assert generate(llm, [p], max_tokens=TOKENS) == [(cold, 4 * BLOCK)]
        assert (c.disk_hit_blocks, c.load_failures) == (4, 0)
        bad = _rank_file(tmp_path, 0, hashes[2])
        data = bytearray(bad.read_bytes())
        data[4096:] = os.urandom(len(data) - 4096)
        bad.write_bytes(bytes(data))
        drain(llm)
        reset_g1(llm)
        [(out, _)] = generate(llm, [p], max_tokens=TOKENS)
        assert out == cold
        assert (c.disk_corrupt, c.load_failures, c.disk_load_failures) == (1, 1, 1)
        drain(llm)
        reset_g1(llm)
        assert generate(llm, [p], max_tokens=TOKENS) == [(cold, 4 * BLOCK)]
