"""Two vLLM engines (CPU build) in separate processes, each with its own G2 and no G3, sharing one
Redis: a prefix computed by engine A comes back in engine B from G4 with identical greedy output.
Then the faults: Redis killed mid-run (outputs stay correct, G2 hits continue, G4 resumes after a
restart) and a Redis that sleeps (no engine step waits for it beyond the budget)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engines import BLOCK, EngineProcess, prompt

from kvtier.ops.redislocal import LocalRedis, LocalRedisCluster

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TIMEOUT_MS = 100


def _extra(url: str) -> dict[str, object]:
    return {
        "cpu_cache_blocks": 16,
        "remote_url": url,
        "remote_timeout_ms": TIMEOUT_MS,
        "disk_filter": False,
    }


def _pair(model: Path, url: str) -> tuple[EngineProcess, EngineProcess]:
    a = EngineProcess(model, _extra(url)).start()
    b = EngineProcess(model, _extra(url)).start()
    a.wait_ready()
    b.wait_ready()
    return a, b


@pytest.fixture(scope="module")
def engines(
    tiny_model: Path, redis_node: LocalRedis
) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    a, b = _pair(tiny_model, redis_node.url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _share(a: EngineProcess, b: EngineProcess, p: list[int]) -> None:
    """A computes ``p`` and writes it behind to G4; B gets it from G4 with the same output."""
    want = a.run([p])["outputs"]
    assert a.call("flush")["ok"]
    before = b.call("stats")["remote"]
    got = b.run([p])["outputs"]
    assert got == want
    after = b.call("stats")["remote"]
    full = (len(p) - 1) // BLOCK
    assert after["fetched_blocks"] - before["fetched_blocks"] == full, after
    assert after["hit_blocks"] - before["hit_blocks"] == full, after
    assert after["fetch_corrupt"] == before["fetch_corrupt"]
    # Onboarded blocks were kept in B's G2: with G1 emptied they come back from there.
    hits = b.call("stats")["host_hit_blocks"]
    assert b.call("reset_g1")["ok"]
    assert b.run([p])["outputs"] == want
    again = b.call("stats")
    assert again["host_hit_blocks"] - hits == full, again
    assert again["remote"]["fetched_blocks"] == after["fetched_blocks"]


def test_prefix_from_engine_a_is_onboarded_by_engine_b(
    engines: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = engines
    _share(a, b, prompt(1, 5 * BLOCK + 17))


def test_corrupt_remote_block_is_recomputed(
    engines: tuple[EngineProcess, EngineProcess], redis_node: LocalRedis
) -> None:
    a, b = engines
    p = prompt(8, 3 * BLOCK + 4)
    want = a.run([p])["outputs"]
    assert a.call("flush")["ok"]
    keys = redis_node.cli("--scan", "--pattern", "kvtier:v1:*").split()
    assert keys
    for key in keys:  # flip payload bytes (after the 4096-byte header) of every stored block
        redis_node.cli("SETRANGE", key, "5000", "garbage")
    before = b.call("stats")["remote"]
    assert b.run([p])["outputs"] == want
    after = b.call("stats")["remote"]
    assert after["fetch_corrupt"] - before["fetch_corrupt"] == 3, after
    assert after["fetched_blocks"] == before["fetched_blocks"]


def test_redis_killed_mid_run_then_restarted(
    engines: tuple[EngineProcess, EngineProcess], redis_node: LocalRedis
) -> None:
    a, b = engines
    p2 = prompt(2, 4 * BLOCK + 5)
    want2 = a.run([p2])["outputs"]
    assert a.call("flush")["ok"]
    redis_node.kill()
    try:
        # A: its G2 still serves the prefix after G1 is emptied.
        assert a.call("reset_g1")["ok"]
        hits = a.call("stats")["host_hit_blocks"]
        assert a.run([p2])["outputs"] == want2
        assert a.call("stats")["host_hit_blocks"] - hits == 4
        # B: G4 is gone; it recomputes (correct output), a new prompt too.
        assert b.run([p2])["outputs"] == want2
        p3 = prompt(3, 3 * BLOCK + 9)
        assert b.run([p3])["outputs"] == a.run([p3])["outputs"]
        # The outage is counted, not waited for: failed lookups on B, dropped writes on A.
        rb = b.call("stats")["remote"]
        assert rb["lookup_errors"] + rb["lookup_timeouts"] > 0, rb
        ra = a.call("stats")["remote"]
        assert ra["write_dropped"] + ra["write_failed"] > 0, ra
    finally:
        redis_node.start()
    time.sleep(2.5)  # the breaker's cooldown: the next call probes the restarted server
    _share(a, b, prompt(4, 3 * BLOCK + 1))


def test_slow_redis_never_stretches_a_step(
    engines: tuple[EngineProcess, EngineProcess], redis_node: LocalRedis
) -> None:
    a, b = engines
    p = prompt(5, 4 * BLOCK + 3)
    want = a.run([p])["outputs"]
    assert a.call("flush")["ok"]
    baseline = b.run([prompt(6, 2 * BLOCK)])["max_step_s"]
    before = b.call("stats")["remote"]
    sleeper = redis_node.sleep(3)
    t0 = time.monotonic()
    res = b.run([p])
    assert time.monotonic() - t0 < 3.0, "the engine waited for the sleeping server"
    assert res["outputs"] == want
    assert res["max_step_s"] < baseline + TIMEOUT_MS / 1000 + 0.5, (res, baseline)
    sleeper.join()
    after = b.call("stats")["remote"]
    missed = ("lookup_timeouts", "lookup_errors", "fetch_failed")
    assert sum(after[k] - before[k] for k in missed) > 0, (before, after)


def test_cluster_prefix_from_engine_a_is_onboarded_by_engine_b(
    tiny_model: Path, redis_cluster: LocalRedisCluster
) -> None:
    a, b = _pair(tiny_model, redis_cluster.url)
    try:
        _share(a, b, prompt(7, 6 * BLOCK + 2))
        sizes = [int(n.cli("DBSIZE")) for n in redis_cluster.nodes]
        assert sum(1 for s in sizes if s > 0) >= 2, f"keys not spread over shards: {sizes}"
    finally:
        a.close()
        b.close()
