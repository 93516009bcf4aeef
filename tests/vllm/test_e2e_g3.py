"""Real vLLM (CPU build), in-process engine, G2 too small so prompts come back from G3.

Configured through Dynamo's ``DYN_KVBM_*`` variables (the fallbacks its users rely on), with
layer-wise onboarding (loads run inside the forward pass, layer i waits only for layer i). Shows:
G3 onboarding gives the same greedy output as recompute; a G3 block corrupted between two requests
is a load error that vLLM recomputes, with identical output, and is then stored again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import BLOCK, connectors, drain, engine, generate, prompt, reset_g1

from kvtier.hashing import salt_hash, sequence_hashes

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("g3")


@pytest.fixture(scope="module")
def llm(tiny_model: Path, disk_dir: Path) -> Iterator[Any]:
    env = {
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "2",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "64",
        "DYN_KVBM_DISK_CACHE_DIR": str(disk_dir),
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with engine(tiny_model, {"layerwise_onboard": True}, in_process=True) as llm:
            yield llm
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _split(llm: Any, hashes: list[int]) -> tuple[int, int]:
    """How many leading blocks G2 holds, then G3 (the prefix walk kvtier does)."""
    s = connectors(llm)[0].scheduler
    n = 0
    while n < len(hashes) and s.host.lookup(hashes[n]) is not None:
        n += 1
    host = n
    while n < len(hashes) and s.disk.lookup(hashes[n]) is not None:
        n += 1
    return host, n - host


def _block_file(disk_dir: Path, h: int) -> Path:
    (path,) = disk_dir.glob(f"*/{h:016x}.kvb")
    return path


def test_settings_came_from_dynamo_names(llm: Any) -> None:
    sched, worker_conn = connectors(llm)
    assert (sched.config.host_blocks, sched.config.disk_blocks) == (2, 64)
    assert sched.settings.disk_filter is False and sched.settings.layerwise_onboard is True
    assert worker_conn.worker.config.host_blocks == 2


def test_g3_onboard_is_identical_to_recompute(llm: Any, disk_dir: Path) -> None:
    c = connectors(llm)[0].scheduler.counters
    p = prompt(11, 5 * BLOCK + 40)
    hashes = sequence_hashes(p, BLOCK, salt_hash())
    [(recomputed, cached0)] = generate(llm, [p], max_tokens=16)
    assert cached0 == 0
    drain(llm)
    assert all(_block_file(disk_dir, h).stat().st_size > 0 for h in hashes)
    host, disk = _split(llm, hashes)
    assert host <= 2 and host + disk == 5 and disk >= 3
    before = (c.host_hit_blocks, c.disk_hit_blocks)
    worker = connectors(llm)[1].worker
    waits = worker.layer_waits
    reset_g1(llm)
    [(onboarded, cached1)] = generate(llm, [p], max_tokens=16)
    assert worker.layer_waits - waits == 2  # each layer's attention waited for its own load
    assert onboarded == recomputed
    assert cached1 == 5 * BLOCK
    assert (c.host_hit_blocks - before[0], c.disk_hit_blocks - before[1]) == (host, disk)


def test_corrupt_g3_block_is_recomputed(llm: Any, disk_dir: Path) -> None:
    s = connectors(llm)[0].scheduler
    c = s.counters
    p = prompt(12, 4 * BLOCK + 9)
    hashes = sequence_hashes(p, BLOCK, salt_hash())
    [(reference, _)] = generate(llm, [p], max_tokens=16)
    drain(llm)
    host, disk = _split(llm, hashes)
    assert disk >= 2
    victim = hashes[host + 1]  # a G3 block in the middle of the match
    path = _block_file(disk_dir, victim)
    data = bytearray(path.read_bytes())
    data[4096 + 1000] ^= 0xFF  # one payload byte
    path.write_bytes(bytes(data))
    before = (c.load_failures, c.disk_corrupt, c.host_load_failures, c.disk_load_failures)
    reset_g1(llm)
    [(out, _)] = generate(llm, [p], max_tokens=16)
    assert out == reference
    after = (c.load_failures, c.disk_corrupt, c.host_load_failures, c.disk_load_failures)
    # one G3 block failed: the worker names G3 as the tier of that load error
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1, 1, 0, 1)
    drain(llm)
    # the recomputed block was stored again; the next request is a full hit
    assert s.disk.lookup(victim) is not None or s.host.lookup(victim) is not None
    reset_g1(llm)
    [(out2, cached2)] = generate(llm, [p], max_tokens=16)
    assert (out2, cached2) == (reference, 4 * BLOCK)


def test_no_leaks_after_g3_traffic(llm: Any) -> None:
    drain(llm)
    sched, worker_conn = connectors(llm)
    sched.scheduler.check_invariants()
    assert sched.scheduler.host.num_pinned == 0 and sched.scheduler.disk.num_pinned == 0
    assert sched.scheduler.num_tracked_requests == 0
    assert worker_conn.worker.num_inflight == 0
