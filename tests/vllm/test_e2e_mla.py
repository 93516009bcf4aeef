"""Real vLLM (CPU build, 0.32) with an MLA model: kvtier moves DeepSeek-V2's latent KV exactly.

vLLM's CPU build runs MLA with its CPU_MLA backend (one tensor per layer, ``(num_blocks, 1, 16,
576)``: the latent of kv_lora_rank 512 + rope 64, no K/V axis, 16-token blocks). It turns vLLM's
own prefix caching off for MLA, so every repeated prompt is recomputed unless kvtier onboards it:
the reference here is the recomputed output. Shown: the layout is detected as one region per
(block, layer) with ``outer_dim`` 1; what kvtier stored in G2 is byte for byte what the forward
pass wrote (snapshots taken when the stores are issued); a prompt onboarded from G2 and from G3
gives the recomputed greedy output; a corrupted G3 block is a load error, recomputed, same output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import connectors, drain, engine, generate, prompt

from kvtier.hashing import salt_hash, sequence_hashes

# The MLA model and the byte recorder are the GPU MLA tests' (tests/gpu_vllm): one of each.
sys.path.insert(0, str(Path(__file__).parents[1] / "gpu_vllm"))
from kv_bytes import KvRecorder  # type: ignore[import-not-found]
from tiny_mla import TinyMlaSpec, build_tiny_mla  # type: ignore[import-not-found]

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MLA_BLOCK = 16  # CPU_MLA supports 16-token blocks only
SPEC = TinyMlaSpec(num_hidden_layers=2, num_attention_heads=4, dtype="float32")
HOST_BLOCKS = 48


def _cpu_mla_missing() -> str | None:
    """Why this vLLM build cannot run MLA on CPU (None: it can)."""
    try:
        import vllm.v1.attention.backends.mla.cpu_mla  # noqa: F401
    except ImportError as exc:
        return f"this vLLM build has no CPU MLA backend ({exc})"
    return None


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    why = _cpu_mla_missing()
    if why is not None:
        pytest.skip(why)
    model = build_tiny_mla(tmp_path_factory.mktemp("tiny-mla"), SPEC)
    disk = tmp_path_factory.mktemp("g3-mla")
    extra = {
        "cpu_cache_blocks": HOST_BLOCKS,
        "disk_cache_blocks": 512,
        "disk_dir": str(disk),
        "disk_filter": False,
    }
    with engine(model, extra, in_process=True, kv_bytes=32 << 20) as llm:
        yield llm


def _hashes(p: list[int], salt: str | None = None) -> list[int]:
    return sequence_hashes(p, MLA_BLOCK, salt_hash(salt, None))


@pytest.fixture(scope="module")
def rec(llm: Any) -> Iterator[KvRecorder]:
    recorder = KvRecorder(connectors(llm)[1].worker).start()
    try:
        yield recorder
    finally:
        recorder.stop()


def _onboard(llm: Any, rec: KvRecorder, p: list[int], salt: str | None = None) -> list[int]:
    rec.loaded.clear()
    [(out, _)] = generate(llm, [p], salt=salt)
    drain(llm)
    return out


def test_mla_layout_is_one_latent_region_per_block(llm: Any) -> None:
    _, worker = connectors(llm)
    layout = worker.worker.layout
    first = next(iter(worker.worker.plane.device.tensors.values()))
    print("CPU MLA tensor", tuple(first.shape), first.stride(), layout)
    assert layout.model.outer_dim == 1 and layout.model.head_dim == SPEC.latent
    assert layout.model.num_kv_heads == 1 and layout.model.block_size == MLA_BLOCK
    assert layout.kind.value == "block_first", layout
    assert layout.layer_block_bytes == MLA_BLOCK * SPEC.latent * 4
    assert len(layout.layer_names) == SPEC.num_hidden_layers


def test_stored_bytes_and_g2_g3_onboards_match_recompute(llm: Any, rec: KvRecorder) -> None:
    sched = connectors(llm)[0].scheduler
    a = prompt(31, 20 * MLA_BLOCK + 5)
    hashes = _hashes(a)
    [(ref, cached)] = generate(llm, [a])
    drain(llm)
    assert cached == 0
    assert rec.check_stored_in_g2(sched, hashes) == 20, "not every block of the prompt is in G2"
    # G2: vLLM keeps no prefix cache for MLA on CPU, so this is kvtier's hit
    hits = sched.counters.host_hit_blocks
    out = _onboard(llm, rec, a)
    assert sched.counters.host_hit_blocks - hits == 20, "the prompt was not onboarded from G2"
    assert rec.check_loaded(hashes) == 20
    assert out == ref, "G2 onboard changed the greedy output"
    # G3: other prompts push ``a`` out of G2
    for seed in (32, 33, 34):
        generate(llm, [prompt(seed, 20 * MLA_BLOCK)])
        drain(llm)
    assert sched.host.lookup(hashes[0]) is None
    assert all(sched.disk.lookup(h) is not None for h in hashes), "not all blocks are in G3"
    dhits = sched.counters.disk_hit_blocks
    out = _onboard(llm, rec, a)
    assert sched.counters.disk_hit_blocks - dhits == 20, "the prompt was not onboarded from G3"
    assert rec.check_loaded(hashes) == 20
    assert out == ref, "G3 onboard changed the greedy output"


def _push_out_of_g2(llm: Any, seeds: tuple[int, ...]) -> None:
    for seed in seeds:
        generate(llm, [prompt(seed, 20 * MLA_BLOCK)])
        drain(llm)


def test_corrupt_g3_block_is_recomputed(llm: Any, rec: KvRecorder) -> None:
    """Block 5 of 12 corrupt on disk: a load error; blocks 0-4 load byte-exact, vLLM recomputes
    from block 5, and the output is that of a clean 5-block hit of the same bytes.

    The reference is that hit, not a full recompute: vLLM's CPU MLA output depends on how a
    prompt is split between cached context and new tokens (its chunked-context prefill rounds
    differently, and its KV bytes depend on the prompt length; seen with every loaded byte
    verified exact), so only runs with the same cached prefix of the same bytes compare.
    """
    sched = connectors(llm)[0].scheduler
    worker = connectors(llm)[1].worker
    b = prompt(41, 12 * MLA_BLOCK + 3)
    hashes = _hashes(b)
    generate(llm, [b[: 5 * MLA_BLOCK + 1]])  # stores blocks 0-4 only
    drain(llm)
    hits = sched.counters.host_hit_blocks
    ref = _onboard(llm, rec, b)  # the clean 5-block hit; stores blocks 5-11
    assert sched.counters.host_hit_blocks - hits == 5, "the reference is not a 5-block hit"
    assert rec.check_loaded(hashes) == 5
    _push_out_of_g2(llm, (42, 43, 44))
    assert sched.host.lookup(hashes[0]) is None
    assert all(sched.disk.lookup(h) is not None for h in hashes), "not all blocks are in G3"
    path = worker.plane.disk.path(hashes[5])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    failures = sched.counters.load_failures
    out = _onboard(llm, rec, b)
    assert sched.counters.load_failures > failures, "the corrupt block was not reported"
    assert rec.check_loaded(hashes, skip=frozenset(range(5, 12))) == 5
    assert out == ref, "a corrupt G3 block changed the greedy output"
