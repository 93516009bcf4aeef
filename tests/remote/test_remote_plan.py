"""``RemotePlanner`` (the scheduler half's G4 lookups) against a real server: nothing is matched
before the workers told their namespaces (None: ask again), hits are a prefix over every rank's
key, a sleeping server costs a step at most the budget (None while within the lookup's deadline,
then a miss), blocks a fetch found bad are not matched again until rewritten, and writes skip
blocks known to be in G4."""

from __future__ import annotations

import time

from kvtier.executor.jobs import RemoteReport
from kvtier.ops.redislocal import LocalRedis
from kvtier.storage.remote import RemoteConfig, RemoteStore
from kvtier.storage.remote_block import remote_key
from kvtier.vllm.remote_plan import RemotePlanner

HASHES = [11, 22, 33, 44, 55]


def _planner(node: LocalRedis, world: int = 2, timeout_ms: int = 100) -> RemotePlanner:
    planner = RemotePlanner(RemoteConfig(node.url, timeout_ms=timeout_ms), num_workers=world)
    return planner.start()


def test_prefix_over_all_ranks_and_namespaces_first(redis_node: LocalRedis) -> None:
    spaces = ["kvtier:v1:test:0of2", "kvtier:v1:test:1of2"]
    with RemoteStore(RemoteConfig(redis_node.url)) as store:
        store.put([(remote_key(ns, h), b"v") for ns in spaces for h in HASHES[:3]])
        store.put([(remote_key(spaces[0], HASHES[3]), b"v")])  # rank 1 lacks block 3
    planner = _planner(redis_node)
    try:
        assert planner.match("r", HASHES, 0, 5) is None  # no namespaces yet: ask again
        planner.on_report(0, RemoteReport(namespace=spaces[0]))
        assert planner.match("r", HASHES, 0, 5) is None
        planner.on_report(1, RemoteReport(namespace=spaces[1]))
        assert planner.ready
        assert planner.match("r", HASHES, 0, 5) == 3
        assert planner.match("r2", HASHES, 1, 5) == 2
        assert planner.match("r3", HASHES, 3, 5) == 0
        # Known blocks are not written again; the others are.
        writes = planner.plan_writes(HASHES, [None, 11, 22, 33, 44], [0, 1, 2, 3, 4])
        assert writes is not None and writes.hashes == [44, 55]
        # A fetch found block 1 bad: not matched again until some worker writes it again.
        planner.on_report(0, RemoteReport(bad=[22]))
        planner.forget("r")
        assert planner.match("r", HASHES, 0, 5) == 1
        planner.on_report(0, RemoteReport(written=[22], written_parents=[11]))
        planner.forget("r")
        assert planner.match("r", HASHES, 0, 5) == 3
    finally:
        planner.close()


def test_a_sleeping_server_costs_a_step_at_most_the_budget(redis_node: LocalRedis) -> None:
    planner = _planner(redis_node, world=1, timeout_ms=100)
    try:
        planner.on_report(0, RemoteReport(namespace="kvtier:v1:test:0of1"))
        assert planner.match("warm", HASHES, 0, 5) == 0
        sleeper = redis_node.sleep(1)
        t0 = time.perf_counter()
        answers = [planner.match(f"q{i}", HASHES, 0, 5) for i in range(5)]
        step = time.perf_counter() - t0
        assert step < 0.1 + 0.05, f"one step waited {step:.3f} s for G4 (budget 0.1 s)"
        assert answers[0] is None  # the first lookup used the budget: vLLM asks again
        planner.end_step()
        time.sleep(0.15)  # past the lookups' deadline
        t0 = time.perf_counter()
        assert planner.match("q0", HASHES, 0, 5) == 0  # a miss now, not a wait
        assert time.perf_counter() - t0 < 0.05
        assert planner.counters.lookup_timeouts + planner.counters.lookup_errors >= 1
        sleeper.join()
    finally:
        planner.close()
