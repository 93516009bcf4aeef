"""One manager process of the shared-directory test (run as a script by test_shared_dir.py).

Random offloads (writes), matches + onboards (reads) and, through the small capacity, evictions
on one G3 directory that other processes use at the same time; the manager is closed and
reopened now and then (start-up scans while others write and evict). Every block's bytes are a
function of its hash, so any process can check any block it reads bit for bit. Prints one JSON
line of counters; exits non-zero on any exception (a crash) or wrong byte.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dataplane_helpers import MODEL, engine_tensors

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig
from kvtier.storage.identity import ModelIdentity

BB = MODEL.block_bytes


def content(h: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(h)
    return torch.randint(0, 256, (BB,), dtype=torch.uint8, generator=g)


def start(disk_dir: str, capacity: int, seed: int) -> KvBlockManager:
    cfg = KvTierConfig(
        model=MODEL,
        disk_blocks=capacity,
        disk_dir=disk_dir,
        disk_filter=False,
        io_threads=2,
        model_identity=ModelIdentity(model="shared-test", dtype=MODEL.dtype),
    )
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("block_first", MODEL, 8, seed=seed))
    mgr.start()
    return mgr


def restored(mgr: KvBlockManager, hashes: list[int]) -> set[int]:
    assert mgr.disk_pool is not None
    return {h for h in hashes if mgr.disk_pool.pool.contains(h)}


def main() -> None:
    disk_dir, capacity, ops, seed, universe = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    rng = random.Random(seed)
    hashes = [1000 + i for i in range(universe)]
    written: set[int] = set()
    stats = {
        "writes": 0,
        "reads": 0,
        "hits": 0,
        "foreign_hits": 0,
        "live_foreign_hits": 0,
        "wrong_bytes": 0,
        "load_failures": 0,
        "reopens": 0,
    }
    mgr = start(disk_dir, capacity, seed)
    at_open = restored(mgr, hashes)
    for op in range(ops):
        if op and op % (ops // 4) == 0:
            mgr.close()
            mgr = start(disk_dir, capacity, seed + op)
            at_open = restored(mgr, hashes)
            written.clear()
            stats["reopens"] += 1
        assert mgr.device_pool is not None
        dev = mgr.device_pool.storage
        h = rng.choice(hashes)
        if rng.random() < 0.5:
            dev.write_block(0, content(h))
            handle = mgr.offload([0], [h], parent_sequence_hashes=[None])
            mgr.wait(handle, timeout=30)
            if handle.ok and h in handle.block_hashes:
                stats["writes"] += 1
                written.add(h)
        else:
            stats["reads"] += 1
            match = mgr.match([h])
            if not len(match):
                match.release()
                continue
            dev.write_block(1, torch.zeros(BB, dtype=torch.uint8))
            handle = mgr.onboard(match, [1])
            mgr.wait(handle, timeout=30)
            if not handle.ok:
                stats["load_failures"] += 1  # evicted by another process: a miss, not served
                continue
            stats["hits"] += 1
            if h not in written:
                stats["foreign_hits"] += 1
                if h not in at_open:  # written by another process since this one started
                    stats["live_foreign_hits"] += 1
            if not torch.equal(dev.read_block(1), content(h)):
                stats["wrong_bytes"] += 1
        mgr.poll()
    assert mgr.disk_pool is not None
    mgr.disk_pool.pool.check_invariants()
    mgr.close()
    print(json.dumps(stats))
    sys.exit(1 if stats["wrong_bytes"] else 0)


if __name__ == "__main__":
    main()
