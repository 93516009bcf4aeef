"""Randomised offload/match/onboard sequences on tiny tiers: whatever comes back is exact.

Small G2 and G3 pools force eviction, disk slot reuse (old files reclaimed), dedup and the
cascade on every few operations; a reference dict (hash -> bytes) says what each block must be.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from dataplane_helpers import MODEL, engine_tensors, random_rows

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig

CHAINS, LENGTH = 6, 6


def _hash(chain: int, pos: int) -> int:
    return (chain + 1) * 1000 + pos


def _row(h: int) -> torch.Tensor:
    return random_rows(1, MODEL.block_bytes, seed=h)[0]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("host_blocks", [0, 5])
def test_random_operations_stay_exact(tmp_path: Path, seed: int, host_blocks: int) -> None:
    rng = random.Random(seed)
    cfg = KvTierConfig(
        model=MODEL,
        host_blocks=host_blocks,
        disk_blocks=9,
        disk_dir=str(tmp_path),
        disk_filter=rng.random() < 0.5,
        staging_blocks=3,
        max_inflight_blocks=4,
    )
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("outer_first", MODEL, 8, seed=seed))
    onboarded = 0
    with mgr:
        dev = mgr.device_pool.storage  # type: ignore[union-attr]
        for _ in range(60):
            chain = rng.randrange(CHAINS)
            if rng.random() < 0.5:
                start = rng.randrange(LENGTH)
                n = rng.randint(1, min(4, LENGTH - start))
                ids = rng.sample(range(8), n)
                hashes = [_hash(chain, p) for p in range(start, start + n)]
                for d, h in zip(ids, hashes, strict=True):
                    dev.write_block(d, _row(h))
                parents = [_hash(chain, p - 1) if p else None for p in range(start, start + n)]
                handle = mgr.offload(ids, hashes, parent_sequence_hashes=parents)
                mgr.wait(handle, timeout=10)  # the device blocks may change after this
                assert handle.ok, handle.error
            else:
                match = mgr.match([_hash(chain, p) for p in range(LENGTH)])
                n = rng.randint(0, len(match))
                ids = rng.sample(range(8), n)
                expect = match.sequence_hashes[:n]
                handle = mgr.onboard(match, ids)
                mgr.wait(handle, timeout=10)
                assert handle.ok, handle.error
                for d, h in zip(ids, expect, strict=True):
                    assert torch.equal(dev.read_block(d), _row(h)), (d, h)
                onboarded += n
            if rng.random() < 0.3:
                mgr.wait_all(timeout=10)
            for tier in (mgr.host_pool, mgr.disk_pool):
                if tier is not None:
                    tier.pool.check_invariants()
        mgr.wait_all(timeout=10)
        # one deterministic round trip at the end, whatever the random walk left behind
        final = [_hash(CHAINS, p) for p in range(2)]
        for d, h in zip((0, 1), final, strict=True):
            dev.write_block(d, _row(h))
        mgr.wait(mgr.offload([0, 1], final), timeout=10)
        on = mgr.onboard(mgr.match(final), [6, 7])
        mgr.wait(on, timeout=10)
        assert on.ok and torch.equal(dev.read_block(7), _row(final[1]))
        onboarded += 2
        mgr.wait_all(timeout=10)
        disk = mgr.disk_pool
        assert disk is not None
        files = {int(p.name[:16], 16) for p in disk.storage.directory.glob("*.kvb")}
        registered = {h for h in files if disk.pool.contains(h)}
        assert registered == files  # no orphan files: evicted slots had their files reclaimed
        assert disk.pool.num_registered == len(files)
    assert onboarded >= 2
