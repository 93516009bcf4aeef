"""Real vLLM (CPU build), in-process, with a G1 so small that vLLM preempts, and an abort.

Shows: preempted requests resume (vLLM recomputes or kvtier reloads their prefix) and produce the
same greedy output as when each runs alone; an aborted request leaves no pin, no tracked state and
no vLLM block behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import BLOCK, connectors, drain, engine, generate, prompt

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

G1_BLOCKS = 12  # 12 x 128 KiB: room for 3 of the requests below at once


@pytest.fixture(scope="module")
def llm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    disk = tmp_path_factory.mktemp("g3-pressure")
    extra = {
        "cpu_cache_blocks": 64,
        "disk_cache_blocks": 64,
        "disk_dir": str(disk),
        "disk_filter": False,
    }
    kv_bytes = G1_BLOCKS * 2 * 2 * BLOCK * 64 * 4  # blocks x layers x kv heads x tokens x 2d x 4
    with engine(tiny_model, extra, in_process=True, kv_bytes=kv_bytes, max_model_len=1024) as llm:
        yield llm


def _no_leaks(llm: Any) -> None:
    drain(llm)
    sched, worker_conn = connectors(llm)
    s = sched.scheduler
    s.check_invariants()
    assert s.host.num_pinned == 0 and s.disk.num_pinned == 0
    assert s.num_tracked_requests == 0
    assert worker_conn.worker.num_inflight == 0
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_preempted_requests_give_the_same_output(llm: Any) -> None:
    prompts = [prompt(500 + i, 2 * BLOCK + 40 + i) for i in range(5)]
    alone = [generate(llm, [p], max_tokens=100)[0][0] for p in prompts]
    s = connectors(llm)[0].scheduler
    resumed = s.counters.resumed_requests
    together = generate(llm, prompts, max_tokens=100)
    assert [o for o, _ in together] == alone
    assert s.counters.resumed_requests > resumed  # vLLM really preempted some of them
    _no_leaks(llm)


def test_abort_mid_decode_leaks_nothing(llm: Any) -> None:
    from vllm import SamplingParams

    engine_ = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=500, detokenize=False, ignore_eos=True)
    for i in range(3):
        engine_.add_request(f"abort-{i}", {"prompt_token_ids": prompt(600 + i, 3 * BLOCK)}, sp)
    for _ in range(5):
        engine_.step()
    engine_.abort_request([f"abort-{i}" for i in range(3)])
    for _ in range(3):
        engine_.step()
    assert not engine_.has_unfinished_requests()
    _no_leaks(llm)
