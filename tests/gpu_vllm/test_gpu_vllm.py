"""kvtier inside a GPU build of vLLM (the carried 0.26.0 on the H200), end to end.

Each engine is in-process, with the tiny 4-layer model (bf16, head_dim 64). Shown, for four
engines (FlashAttention with asynchronous loads; FlashAttention with layer-wise loads; Triton
asking for vLLM 0.26's cross-layer tensor, with layer-wise loads: 0.26's default V2 model runner
does not allocate one, so that engine gets per-layer tensors too; FlashAttention on the V1 model
runner (``VLLM_USE_V2_MODEL_RUNNER=0``), which does: kvtier gets the cross-layer tensor):

- a prompt onboarded from G2 (after ``reset_prefix_cache()``) and from G3 (after G2 evicted it)
  gives the greedy output vLLM gives when it reuses the same KV from its own G1 prefix cache;
- a corrupted G3 block is a load error, vLLM recomputes, and the output is still identical;
- 64 concurrent requests under G1 pressure (preemptions), then: no pinned block, no tracked
  request, every vLLM block free;
- a race test: every GPU block vLLM frees is overwritten at the first moment vLLM may reuse it
  (the start of the next forward pass), and every byte kvtier stored is still exactly what the
  forward pass wrote (snapshots taken on the model's stream right after each pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from gpu_engine import BLOCK, connectors, core, drain, generate, gpu_engine, prompt, reset_g1

from kvtier.hashing import salt_hash, sequence_hashes

pytestmark = [pytest.mark.gpu_vllm, pytest.mark.slow]

HOST_BLOCKS = 160
"""G2 rows: one 100-block prompt fits, two evict the first."""

V1_RUNNER = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
"""vLLM 0.26's V1 GPU model runner (gpu_model_runner.py), the one that allocates the cross-layer
tensor and hands it to ``register_cross_layers_kv_cache``."""

CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "flash-async": ("FLASH_ATTN", {"layerwise_onboard": False}, {}),
    "flash-layerwise": ("FLASH_ATTN", {"layerwise_onboard": True}, {}),
    "triton-crosslayer": (
        "TRITON_ATTN",
        {"layerwise_onboard": True, "cross_layer_blocks": True},
        {},
    ),
    "flash-crosslayer-v1": (
        "FLASH_ATTN",
        {"layerwise_onboard": True, "cross_layer_blocks": True},
        V1_RUNNER,
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def llm(
    request: pytest.FixtureRequest, gpu_tiny_model: Path, tmp_path_factory: Any
) -> Iterator[Any]:
    backend, extra, env = CONFIGS[request.param]
    disk = tmp_path_factory.mktemp(f"g3-{request.param}")
    cfg = {
        **extra,
        "cpu_cache_blocks": HOST_BLOCKS,
        "disk_cache_blocks": 4096,
        "disk_dir": str(disk),
        "disk_filter": False,
    }
    with gpu_engine(gpu_tiny_model, cfg, backend=backend, num_gpu_blocks=1024, env=env) as engine:
        engine._kvtier_config = request.param
        engine._kvtier_disk = disk
        yield engine


def _hashes(p: list[int], salt: str | None = None) -> list[int]:
    return sequence_hashes(p, BLOCK, salt_hash(salt, None))


def _split(llm: Any, hashes: list[int]) -> tuple[int, int]:
    s = connectors(llm)[0].scheduler
    n = 0
    while n < len(hashes) and s.host.lookup(hashes[n]) is not None:
        n += 1
    host = n
    while n < len(hashes) and s.disk.lookup(hashes[n]) is not None:
        n += 1
    return host, n - host


def _g1_reference(llm: Any, p: list[int]) -> list[int]:
    """Store ``p`` (first run), then the output of vLLM reusing its own G1 copy of that KV."""
    generate(llm, [p])
    drain(llm)
    out, cached = generate(llm, [p])[0]
    assert cached >= len(p) - BLOCK, "vLLM did not reuse its own prefix cache"
    return out


def test_layout_and_engine(llm: Any) -> None:
    _, worker = connectors(llm)
    layout = worker.worker.layout
    assert worker.worker._gpu is not None, "the CUDA data path is not in use"
    # vLLM 0.26's default (V2) GPU model runner has no cross-layer allocation (its
    # kv_connector.py: "TODO: support cross_layers_kv_cache"): kvtier then gets per-layer tensors.
    runner = core(llm).model_executor.driver_worker.worker.model_runner
    uniform = hasattr(runner, "use_uniform_kv_cache") and bool(
        runner.use_uniform_kv_cache(runner.attn_groups)
    )
    cross = "crosslayer" in llm._kvtier_config and uniform
    if llm._kvtier_config.endswith("-v1"):
        assert uniform and runner.cross_layers_kv_cache is not None, (
            f"the V1 runner ({type(runner).__module__}) allocated no cross-layer tensor"
        )
    want = "fully_contiguous" if cross else "block_first"
    ok = layout.kind.value == want
    print(
        llm._kvtier_config,
        layout,
        "prefer_cross_layer_blocks:",
        worker.prefer_cross_layer_blocks,
        "uniform:",
        uniform,
        "async scheduling:",
        core(llm).vllm_config.scheduler_config.async_scheduling,
    )
    assert ok, f"{llm._kvtier_config}: layout {layout.kind.value}, expected {want}"


def test_g2_and_g3_onboard_match_g1_reuse(llm: Any) -> None:
    a = prompt(11, 100 * BLOCK + 5)
    ref = _g1_reference(llm, a)
    sched = connectors(llm)[0].scheduler
    # G2
    reset_g1(llm)
    assert _split(llm, _hashes(a))[0] == 100
    hits = sched.counters.host_hit_blocks
    out, cached = generate(llm, [a])[0]
    assert sched.counters.host_hit_blocks - hits == 100
    assert cached >= 100 * BLOCK
    assert out == ref
    drain(llm)
    # G3: two other prompts push ``a`` out of G2 (it stays in G3)
    for seed in (12, 13, 14):
        generate(llm, [prompt(seed, 100 * BLOCK + 5)])
        drain(llm)
    host, disk = _split(llm, _hashes(a))
    assert host == 0 and disk == 100, (host, disk)
    reset_g1(llm)
    dhits = sched.counters.disk_hit_blocks
    out, cached = generate(llm, [a])[0]
    assert sched.counters.disk_hit_blocks - dhits == 100
    assert out == ref
    drain(llm)


def test_corrupt_g3_block_is_recomputed(llm: Any) -> None:
    b = prompt(21, 40 * BLOCK + 3)
    ref = _g1_reference(llm, b)
    for seed in (22, 23, 24):  # push b out of G2
        generate(llm, [prompt(seed, 70 * BLOCK)])
        drain(llm)
    hashes = _hashes(b)
    assert _split(llm, hashes) == (0, 40)
    _, worker = connectors(llm)
    path = worker.worker.plane.disk.path(hashes[7])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    sched = connectors(llm)[0].scheduler
    failures = sched.counters.load_failures
    reset_g1(llm)
    out, _ = generate(llm, [b])[0]
    drain(llm)
    assert sched.counters.load_failures > failures
    assert out == ref


def test_pressure_then_everything_released(llm: Any) -> None:
    prompts = [prompt(100 + i, 20 * BLOCK + i) for i in range(64)]
    outs = generate(llm, prompts, max_tokens=48)  # 64 x 24 blocks > 1024 G1 blocks: preemption
    assert all(len(o) == 48 for o, _ in outs)
    drain(llm)
    sched = connectors(llm)[0].scheduler
    sched.check_invariants()
    assert sched.host.num_pinned == 0 and sched.disk.num_pinned == 0
    assert sched.num_tracked_requests == 0
    _, worker = connectors(llm)
    assert worker.worker.num_inflight == 0
    pool = core(llm).scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but vLLM's null block


def test_race_freed_blocks_overwritten_at_once(llm: Any) -> None:
    """Overwrite each freed GPU block at the first moment vLLM may write it again; every stored
    byte must still be what the forward pass wrote."""
    _, wconn = connectors(llm)
    worker = wconn.worker
    dev = worker.plane.device
    pool = core(llm).scheduler.kv_cache_manager.block_pool
    freed: list[int] = []
    snapshots: dict[int, torch.Tensor] = {}  # seq hash -> GPU copy of its block, after its pass
    orig_free = pool.free_blocks
    orig_start = worker.start_load_kv
    orig_save = worker.wait_for_save

    def free_blocks(blocks: Any) -> None:
        blocks = list(blocks)
        freed.extend(b.block_id for b in blocks if b.block_id != 0)
        orig_free(blocks)

    def start_load_kv() -> None:
        orig_start()  # kvtier orders the forward pass after pending store reads here
        if freed:
            ids = torch.tensor(sorted(set(freed)), device=dev.device)
            for layer in range(dev.layout.model.num_layers):
                view = dev.layer_bytes(layer)
                view.index_fill_(0, ids, 0xA5) if view.dim() == 2 else view.index_fill_(
                    1, ids, 0xA5
                )
            freed.clear()

    def wait_for_save() -> None:
        plan = worker._plan
        if plan is not None and plan.stores.gpu_blocks:
            idx = torch.tensor(plan.stores.gpu_blocks, device=dev.device)
            rows = [
                dev.layer_bytes(layer).index_select(0, idx).clone()
                for layer in range(dev.layout.model.num_layers)
            ]
            cat = torch.cat(rows, dim=1)
            for i, h in enumerate(plan.stores.hashes):
                snapshots[h] = cat[i]
        orig_save()

    pool.free_blocks = free_blocks
    worker.start_load_kv = start_load_kv
    worker.wait_for_save = wait_for_save
    try:
        prompts = [prompt(500 + i, 12 * BLOCK + i) for i in range(64)]
        generate(llm, prompts, max_tokens=40, salt="race")
        drain(llm)
    finally:
        pool.free_blocks = orig_free
        worker.start_load_kv = orig_start
        worker.wait_for_save = orig_save
    sched = connectors(llm)[0].scheduler
    checked = wrong = 0
    for h, snap in snapshots.items():
        slot = sched.host.lookup(h)
        if slot is None:
            continue
        stored = worker.plane.host.row(slot)
        checked += 1
        wrong += int(not torch.equal(stored, snap.cpu()))
    assert checked >= 100, checked  # G2 holds 160 blocks
    assert wrong == 0, f"{wrong} of {checked} stored blocks differ from what the forward wrote"
