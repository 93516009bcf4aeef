"""KvBlockManager on a GPU: the same round trips with CUDA tensors, pinned G2 and the CUDA engine.

Skipped without CUDA (the CI machine); run on a GPU host with ``pytest tests/data -m cuda``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dataplane_helpers import MODEL, engine_tensors, random_rows

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("kind", ["self", "block_first", "outer_first"])
def test_gpu_round_trip_through_every_tier(kind: str, tmp_path: Path) -> None:
    cfg = KvTierConfig(
        model=MODEL,
        device_blocks=16 if kind == "self" else 0,
        host_blocks=4,
        disk_blocks=16,
        disk_dir=str(tmp_path),
        disk_filter=False,
        device="cuda",
    )
    mgr = KvBlockManager(cfg)
    if kind != "self":
        tensors = engine_tensors(kind, MODEL, 16, seed=1)
        assert isinstance(tensors, dict)
        mgr.register_device_kv({k: v.cuda() for k, v in tensors.items()})
    with mgr:
        dev = mgr.device_pool.storage  # type: ignore[union-attr]
        assert dev.device.type == "cuda"
        rows = random_rows(8, MODEL.block_bytes, seed=2)
        for i, r in enumerate(rows):
            dev.write_block(i, r)
        hashes = [0x77 + i for i in range(8)]
        for start in (0, 4):  # G2 holds 4: the first four end up on disk only
            h = mgr.offload(
                list(range(start, start + 4)),
                hashes[start : start + 4],
                parent_sequence_hashes=[
                    hashes[start - 1] if start else None,
                    *hashes[start : start + 3],
                ],
            )
            mgr.wait(h, timeout=30)
            assert h.ok, h.error
            mgr.wait_all(timeout=30)
        for i in range(16):
            dev.write_block(i, torch.zeros(MODEL.block_bytes, dtype=torch.uint8))
        match = mgr.match(hashes)
        assert len(match) == 8
        on = mgr.onboard(match, list(range(15, 7, -1)))
        assert all(on.wait_layer(layer, timeout=30) for layer in range(MODEL.num_layers))
        mgr.wait(on, timeout=30)
        assert on.ok, on.error
        for i, r in enumerate(rows):
            assert torch.equal(dev.read_block(15 - i), r), i
