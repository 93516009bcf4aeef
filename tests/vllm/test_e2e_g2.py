"""Real vLLM (CPU build), in-process engine, kvtier with a large G2 and a filtered G3.

Shows: greedy outputs identical whether the prefix KV is recomputed or onboarded from G2; hits
after ``reset_prefix_cache`` seen in vLLM's cached-token count and kvtier's counters; the G2->G3
frequency filter; cache-salt isolation; 32 concurrent requests with shared and private prefixes
and decode, after which every index is consistent and nothing is leaked; wrong KV is detected.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import (
    BLOCK,
    connectors,
    drain,
    engine,
    generate,
    prompt,
    reset_g1,
)

from kvtier.hashing import salt_hash, sequence_hashes

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def llm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    disk = tmp_path_factory.mktemp("g3-filtered")
    extra = {
        "cpu_cache_blocks": 256,
        "disk_cache_blocks": 64,
        "disk_dir": str(disk),
        # Events on, so the scheduler half keeps the planned blocks' tokens for BlockStored.
        "events": True,
        "events_endpoint": "tcp://127.0.0.1:0",
    }
    with engine(tiny_model, extra, in_process=True) as llm:
        yield llm
    from vllm.distributed.kv_transfer import has_kv_transfer_group

    assert not has_kv_transfer_group()


def test_kv_layout_detected_from_cpu_backend(llm: Any) -> None:
    _, worker_conn = connectors(llm)
    layout = worker_conn.worker.layout
    # vLLM 0.32's CPU backend: one tensor per layer, [num_blocks, kv_heads, block, 2 * head_dim]
    assert layout.kind.value == "block_first"
    assert layout.num_blocks == 512
    assert layout.interior_shape == (2, BLOCK, 64)
    assert layout.layer_names == ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


def _ints(obj: object) -> list[int]:
    """Every int inside a (nested) plain-data value: dataclasses, lists, tuples."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _ints([getattr(obj, f.name) for f in dataclasses.fields(obj)])
    if isinstance(obj, list | tuple):
        return [i for x in obj for i in _ints(x)]
    return []


def test_metadata_sent_to_workers_carries_no_token_ids(
    llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connector metadata vLLM sends to the workers (pickled as they receive it) holds no
    token id; the telemetry holds the stored blocks' tokens only until their copies land."""
    sched, _ = connectors(llm)
    tel = sched.telemetry
    build = sched.build_connector_meta
    sent: list[Any] = []
    held: list[int] = []

    def recording(scheduler_output: Any) -> Any:
        meta = build(scheduler_output)
        sent.append(pickle.loads(pickle.dumps(meta)))
        held.append(tel.held_token_blocks)
        return meta

    monkeypatch.setattr(sched, "build_connector_meta", recording)
    # Token ids 700..1023: above every GPU block id (512), G2 slot (256), job id and step here.
    p = [700 + (i * 37) % 324 for i in range(3 * BLOCK + 9)]
    generate(llm, [p])
    drain(llm)
    hashes = sequence_hashes(p, BLOCK, salt_hash())
    stored = [h for m in sent for h in m.plan.stores.hashes]
    assert stored == hashes  # the three full prompt blocks, planned once
    assert max(held) == 3  # their tokens were kept, on the scheduler side only ...
    assert tel.held_token_blocks == 0  # ... until the stores landed
    for m in sent:
        assert set(m.__dict__) == {"plan"}
        assert set(_ints(m.plan)) - {m.plan.step} <= set(range(700)) | set(hashes)


def test_g2_onboard_is_identical_to_recompute(llm: Any) -> None:
    sched, _ = connectors(llm)
    c = sched.scheduler.counters
    p = prompt(1, 5 * BLOCK + 17)  # 5 full blocks + a partial tail
    before = (c.host_hit_blocks, c.matched_tokens)
    [(recomputed, cached0)] = generate(llm, [p], max_tokens=16)
    assert cached0 == 0
    drain(llm)
    reset_g1(llm)
    [(onboarded, cached1)] = generate(llm, [p], max_tokens=16)
    assert onboarded == recomputed
    assert cached1 == 5 * BLOCK
    assert (c.host_hit_blocks, c.matched_tokens) == (before[0] + 5, before[1] + 5 * BLOCK)


def test_never_the_whole_prompt(llm: Any) -> None:
    p = prompt(2, 3 * BLOCK)  # exactly 3 full blocks
    [(first, _)] = generate(llm, [p])
    drain(llm)
    reset_g1(llm)
    [(again, cached)] = generate(llm, [p])
    assert again == first
    assert cached == 2 * BLOCK  # the last block is recomputed so vLLM computes a token


def test_frequency_filter_writes_g3_on_second_sighting(llm: Any) -> None:
    sched, _ = connectors(llm)
    s = sched.scheduler
    p = prompt(3, 2 * BLOCK + 5)
    hashes = sequence_hashes(p, BLOCK, salt_hash())[:2]
    generate(llm, [p])
    drain(llm)
    assert [s.disk.lookup(h) for h in hashes] == [None, None]
    assert all(s.host.lookup(h) is not None for h in hashes)
    reset_g1(llm)
    generate(llm, [p])
    drain(llm)
    assert all(s.disk.lookup(h) is not None for h in hashes)


def test_cache_salt_isolation(llm: Any) -> None:
    p = prompt(4, 3 * BLOCK + 1)
    [(out_a, cached_a)] = generate(llm, [p], salt="tenant-a")
    drain(llm)
    reset_g1(llm)
    [(out_b, cached_b)] = generate(llm, [p], salt="tenant-b")
    assert cached_a == 0 and cached_b == 0  # same tokens, other salt: nothing shared
    assert out_b == out_a
    drain(llm)
    reset_g1(llm)
    [(out_a2, cached_a2)] = generate(llm, [p], salt="tenant-a")
    assert (out_a2, cached_a2) == (out_a, 3 * BLOCK)
    sched, _ = connectors(llm)
    ha = sequence_hashes(p, BLOCK, salt_hash("tenant-a"))
    hb = sequence_hashes(p, BLOCK, salt_hash("tenant-b"))
    assert not set(ha) & set(hb)
    assert all(sched.scheduler.host.lookup(h) is not None for h in ha + hb)


def test_32_concurrent_requests_then_no_leaks(llm: Any) -> None:
    shared = [prompt(100 + g, 2 * BLOCK) for g in range(4)]
    prompts = [shared[i % 4] + prompt(200 + i, BLOCK + (i * 13) % 100 + 20) for i in range(32)]
    reference = generate(llm, prompts, max_tokens=24)
    drain(llm)
    reset_g1(llm)
    again = generate(llm, prompts, max_tokens=24)
    assert [o for o, _ in again] == [o for o, _ in reference]
    # every full prompt block came back from kvtier (never the whole prompt)
    assert [c for _, c in again] == [((len(p) - 1) // BLOCK) * BLOCK for p in prompts]
    drain(llm)
    sched, worker_conn = connectors(llm)
    s = sched.scheduler
    s.check_invariants()
    assert s.host.num_pinned == 0 and s.disk.num_pinned == 0
    assert s.num_tracked_requests == 0
    assert worker_conn.worker.num_inflight == 0
    # decode blocks were stored too: prompts whose decode completed a block
    for p, (out, _) in zip(prompts, reference, strict=True):
        full = sequence_hashes(p + out, BLOCK, salt_hash())
        assert all(s.host.lookup(h) is not None for h in full)
    # vLLM's own pool got every block back
    core = llm.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_wrong_kv_changes_the_output(llm: Any) -> None:
    """Negative control: corrupting G2 bytes must change the greedy output (KV is observable)."""
    import torch

    sched, worker_conn = connectors(llm)
    p = prompt(5, 4 * BLOCK + 3)
    [(good, _)] = generate(llm, [p], max_tokens=16)
    drain(llm)
    slots = [sched.scheduler.host.lookup(h) for h in sequence_hashes(p, BLOCK, salt_hash())]
    rows = worker_conn.worker.plane.host.rows
    saved = rows[slots[1]].clone()
    gen = torch.Generator().manual_seed(0)
    rows[slots[1]] = torch.randint(0, 256, saved.shape, dtype=torch.uint8, generator=gen)
    try:
        reset_g1(llm)
        [(bad, cached)] = generate(llm, [p], max_tokens=16)
        assert cached == 4 * BLOCK
        assert bad != good
    finally:
        rows[slots[1]] = saved


def test_connector_reset_drops_g2_and_g3(llm: Any) -> None:
    """``reset_prefix_cache()`` empties G1 only (kvtier serves the prompt again);
    ``reset_prefix_cache(reset_connector=True)`` calls the connector's ``reset_cache``, which
    empties G2 and G3 (files included)."""
    sched, worker = connectors(llm)
    s = sched.scheduler
    p = prompt(9, 3 * BLOCK + 5)
    [(first, _)] = generate(llm, [p])
    drain(llm)
    reset_g1(llm)
    [(_, cached)] = generate(llm, [p])  # the second sighting also writes G3
    assert cached == 3 * BLOCK
    drain(llm)
    assert len(s.host) > 0 and len(s.disk) > 0
    disk_dir = Path(worker.worker.config.disk_dir)
    assert list(disk_dir.glob("*/*.kvb"))
    assert llm.reset_prefix_cache(reset_connector=True) is True
    assert (len(s.host), len(s.disk)) == (0, 0)
    drain(llm)  # the next step deletes the G3 files
    assert list(disk_dir.glob("*/*.kvb")) == []
    [(again, cached)] = generate(llm, [p])
    assert (again, cached) == (first, 0)
