"""kvtier with vLLM 0.26's CUDA MLA backends (the carried build on the H200), end to end.

The model is ``tiny_mla``'s DeepSeek-V2 shape (4 dense layers, 16 heads, latent 576, bf16, real
seeded weights). MLA backends hand kvtier one latent tensor per layer, ``(num_blocks, T, 576)``
with no K/V axis; FlashMLA's kernel block is 64 tokens, so with 128-token blocks vLLM splits each
block into 2 kernel rows (``kvtier.storage.layout.kernel_split``); on the V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``) a connector that prefers cross-layer blocks gets one
``(2 * num_blocks, L, 64, 576)`` tensor instead. Engines:

- ``flash-attn-mla-async``: FLASH_ATTN_MLA, 16-token blocks, asynchronous loads;
- ``flashmla-layerwise``: FLASHMLA, its 64-token blocks, layer-wise loads;
- ``flashmla-split-layerwise``: FLASHMLA, 128-token blocks (2 kernel rows each), layer-wise;
- ``triton-mla-layerwise``: TRITON_MLA, 16-token blocks, layer-wise loads;
- ``flashmla-crosslayer-v1``: FLASHMLA, 128-token blocks, the cross-layer tensor, asynchronous.

Shown for each: the layout kvtier detected (kind, kernel split, latent geometry); every block
kvtier stored in G2 is byte for byte what the forward pass wrote, and every block it loaded is
byte for byte what it stored; a prompt onboarded from G2 (after ``reset_prefix_cache()``) and
from G3 (after G2 evicted it) gives the greedy output of vLLM's own G1 prefix hit; a corrupt G3
block is a load error, vLLM recomputes from it, and the output is that of vLLM's own G1 hit of
the blocks before it (the same cached prefix: MLA's chunked-context prefill rounds differently
for other splits, so a full-prompt reference would not be comparable).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gpu_engine import connectors, core, drain, generate, gpu_engine, prompt, reset_g1
from kv_bytes import KvRecorder
from tiny_mla import TinyMlaSpec

from kvtier.hashing import salt_hash, sequence_hashes

pytestmark = [pytest.mark.gpu_vllm, pytest.mark.slow]

PROMPT_BLOCKS = 24
HOST_BLOCKS = 40
"""G2 rows: one prompt fits, two more evict it."""
V1_RUNNER = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


@dataclass(frozen=True)
class MlaEngine:
    backend: str
    layerwise: bool
    block_size: int | None  # None: vLLM's choice (16, or 64 for FLASHMLA)
    expect_block: int
    expect_kernel_blocks: int = 1
    cross_layer: bool = False
    env: dict[str, str] = field(default_factory=dict)


ENGINES = {
    "flash-attn-mla-async": MlaEngine("FLASH_ATTN_MLA", False, None, 16),
    "flashmla-layerwise": MlaEngine("FLASHMLA", True, None, 64),
    "flashmla-split-layerwise": MlaEngine("FLASHMLA", True, 128, 128, 2),
    "triton-mla-layerwise": MlaEngine("TRITON_MLA", True, None, 16),
    "flashmla-crosslayer-v1": MlaEngine("FLASHMLA", False, 128, 128, 2, True, V1_RUNNER),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def llm(request: pytest.FixtureRequest, gpu_tiny_mla: Path, tmp_path_factory: Any) -> Iterator[Any]:
    spec = ENGINES[request.param]
    disk = tmp_path_factory.mktemp(f"g3-{request.param}")
    cfg: dict[str, Any] = {
        "layerwise_onboard": spec.layerwise,
        "cpu_cache_blocks": HOST_BLOCKS,
        "disk_cache_blocks": 1024,
        "disk_dir": str(disk),
        "disk_filter": False,
    }
    if spec.cross_layer:
        cfg["cross_layer_blocks"] = True
    with gpu_engine(
        gpu_tiny_mla,
        cfg,
        backend=spec.backend,
        num_gpu_blocks=512,
        block_size=spec.block_size,
        env=spec.env,
    ) as engine:
        engine._kvtier_config = request.param
        rec = KvRecorder(connectors(engine)[1].worker).start()
        engine._kvtier_rec = rec
        try:
            yield engine
        finally:
            rec.stop()


def _block(llm: Any) -> int:
    return int(core(llm).vllm_config.cache_config.block_size)


def _hashes(llm: Any, p: list[int]) -> list[int]:
    return sequence_hashes(p, _block(llm), salt_hash(None, None))


def _prompt(llm: Any, seed: int, blocks: int, tail: int = 5) -> list[int]:
    return prompt(seed, blocks * _block(llm) + tail)


def _onboard(llm: Any, p: list[int]) -> tuple[list[int], int]:
    rec: KvRecorder = llm._kvtier_rec
    rec.loaded.clear()
    [(out, cached)] = generate(llm, [p])
    drain(llm)
    return out, cached


def _push_out_of_g2(llm: Any, seeds: tuple[int, ...]) -> None:
    for seed in seeds:
        generate(llm, [_prompt(llm, seed, PROMPT_BLOCKS)])
        drain(llm)


def test_layout_is_the_mla_latent(llm: Any) -> None:
    name = llm._kvtier_config
    spec = ENGINES[name]
    worker = connectors(llm)[1].worker
    layout = worker.layout
    tensors = worker.plane.device.tensors
    first = tensors if not isinstance(tensors, dict) else next(iter(tensors.values()))
    runner = core(llm).model_executor.driver_worker.worker.model_runner
    print(
        name,
        "runner",
        type(runner).__module__,
        "tensor",
        tuple(first.shape),
        first.stride(),
        layout,
    )
    assert worker._gpu is not None, f"{name}: the CUDA data path is not in use"
    assert _block(llm) == spec.expect_block, f"{name}: vLLM chose block size {_block(llm)}"
    m = layout.model
    assert (m.outer_dim, m.num_kv_heads, m.head_dim) == (1, 1, TinyMlaSpec().latent), m
    assert m.block_size == spec.expect_block
    assert layout.kernel_blocks == spec.expect_kernel_blocks, (
        f"{name}: kernel_blocks {layout.kernel_blocks}, expected {spec.expect_kernel_blocks} "
        f"(tensor {tuple(first.shape)})"
    )
    want = "fully_contiguous" if spec.cross_layer else "block_first"
    assert layout.kind.value == want, f"{name}: layout {layout.kind.value}, expected {want}"
    assert layout.backend == spec.backend, f"{name}: backend {layout.backend!r}"


def test_g2_and_g3_onboard_match_g1_reuse_byte_for_byte(llm: Any) -> None:
    rec: KvRecorder = llm._kvtier_rec
    sched = connectors(llm)[0].scheduler
    n = PROMPT_BLOCKS
    a = _prompt(llm, 11, n)
    hashes = _hashes(llm, a)
    generate(llm, [a])
    drain(llm)
    assert rec.check_stored_in_g2(sched, hashes) == n, "not every block of the prompt is in G2"
    ref, cached = generate(llm, [a])[0]
    assert cached >= n * _block(llm), f"vLLM did not reuse its own prefix cache ({cached})"
    # G2
    reset_g1(llm)
    hits = sched.counters.host_hit_blocks
    out, cached = _onboard(llm, a)
    assert sched.counters.host_hit_blocks - hits == n, "the prompt was not onboarded from G2"
    assert cached >= n * _block(llm)
    assert rec.check_loaded(hashes) == n
    assert out == ref, "G2 onboard gave another greedy output than vLLM's own G1 hit"
    # G3
    _push_out_of_g2(llm, (12, 13, 14))
    assert sched.host.lookup(hashes[0]) is None, "the prompt is still in G2"
    assert all(sched.disk.lookup(h) is not None for h in hashes), "not all blocks are in G3"
    reset_g1(llm)
    dhits = sched.counters.disk_hit_blocks
    out, _ = _onboard(llm, a)
    assert sched.counters.disk_hit_blocks - dhits == n, "the prompt was not onboarded from G3"
    assert rec.check_loaded(hashes) == n
    assert out == ref, "G3 onboard gave another greedy output than vLLM's own G1 hit"


def test_corrupt_g3_block_is_recomputed(llm: Any) -> None:
    """Block 5 of 12 corrupt on disk: blocks 0-4 load byte-exact, vLLM recomputes from block 5;
    the reference is vLLM's own G1 hit of blocks 0-4 (the same cached prefix, the same bytes:
    kvtier stored them from that first short run)."""
    rec: KvRecorder = llm._kvtier_rec
    sched = connectors(llm)[0].scheduler
    worker = connectors(llm)[1].worker
    b = _prompt(llm, 21, 12, tail=3)
    hashes = _hashes(llm, b)
    bs = _block(llm)
    reset_g1(llm)
    generate(llm, [b[: 5 * bs + 1]])  # G1 and kvtier hold blocks 0-4
    drain(llm)
    ref, cached = generate(llm, [b])[0]
    assert cached == 5 * bs, f"the reference is not a 5-block G1 hit ({cached} tokens)"
    drain(llm)
    _push_out_of_g2(llm, (22, 23, 24))
    assert sched.host.lookup(hashes[0]) is None, "the prompt is still in G2"
    assert all(sched.disk.lookup(h) is not None for h in hashes), "not all blocks are in G3"
    path = worker.plane.disk.path(hashes[5])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    failures = sched.counters.load_failures
    reset_g1(llm)
    out, _ = _onboard(llm, b)
    assert sched.counters.load_failures > failures, "the corrupt block was not reported"
    assert rec.check_loaded(hashes, skip=frozenset(range(5, 12))) == 5
    assert out == ref, "after a corrupt G3 block the output is not vLLM's own 5-block hit's"


def test_nothing_left_behind(llm: Any) -> None:
    drain(llm)
    sched = connectors(llm)[0].scheduler
    sched.check_invariants()
    assert sched.host.num_pinned == 0 and sched.disk.num_pinned == 0
    assert sched.num_tracked_requests == 0
    assert connectors(llm)[1].worker.num_inflight == 0
