"""G3 survives the process: blocks written by one process are matched and onboarded by another."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from dataplane_helpers import MODEL, engine_tensors, random_rows

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig

HASHES = [0xA000 + i for i in range(5)]


def test_blocks_persist_across_processes(tmp_path: Path) -> None:
    disk = str(tmp_path / "g3")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from dataplane_helpers import MODEL, engine_tensors, random_rows
        from kvtier import KvBlockManager
        from kvtier.config import KvTierConfig

        cfg = KvTierConfig(
            model=MODEL, host_blocks=2, disk_blocks=8, disk_dir={disk!r}, disk_filter=False
        )
        mgr = KvBlockManager(cfg)
        mgr.register_device_kv(engine_tensors("vllm_cpu", MODEL, 8, seed=0))
        with mgr:
            rows = random_rows(5, MODEL.block_bytes, 77)
            for i, r in enumerate(rows):
                mgr.device_pool.storage.write_block(i, r)
            for i in range(5):  # one at a time: the 2-block host tier cascades each to disk
                h = mgr.offload([i], [{HASHES}[i]], parent_sequence_hashes=[
                    {HASHES}[i - 1] if i else None], priority=i)
                mgr.wait(h, timeout=30)
                mgr.wait_all(timeout=30)
            print("stored", mgr.disk_pool.pool.num_registered)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "stored 5" in done.stdout
    (namespace,) = (tmp_path / "g3").iterdir()  # <disk_dir>/<fingerprint>/
    namespace.joinpath(f"{HASHES[0]:016x}.kvb.0.tmp").write_bytes(b"crash leftover")

    cfg = KvTierConfig(model=MODEL, disk_blocks=8, disk_dir=disk)
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("vllm_cpu", MODEL, 8, seed=1))
    with mgr:
        assert mgr.disk_pool is not None and mgr.device_pool is not None
        assert mgr.disk_pool.pool.num_registered == 5
        events = mgr.drain_events()
        assert sorted(e.sequence_hash for e in events) == HASHES
        match = mgr.match([*HASHES, 0xDEAD])
        assert (match.num_host, match.num_disk) == (0, 5)
        on = mgr.onboard(match, [7, 6, 5, 4, 3])
        mgr.wait(on, timeout=30)
        assert on.ok
        expected = random_rows(5, MODEL.block_bytes, 77)
        for dev, row in zip([7, 6, 5, 4, 3], expected, strict=True):
            assert torch.equal(mgr.device_pool.storage.read_block(dev), row)
        slot = mgr.disk_pool.pool.lookup(HASHES[2])
        assert slot is not None
        again = mgr.disk_pool.pool.match([HASHES[2]])
        assert again[0].priority == 2 and again[0].parent_sequence_hash == HASHES[1]
        again[0].release()
        mgr.disk_pool.pool.check_invariants()
    assert not list((tmp_path / "g3").rglob("*.tmp"))


def test_reopen_with_fewer_slots_keeps_the_newest(tmp_path: Path) -> None:
    import os

    disk = str(tmp_path / "g3")
    cfg = KvTierConfig(model=MODEL, disk_blocks=8, disk_dir=disk)
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("block_first", MODEL, 8))
    with mgr:
        for i in range(3):
            mgr.wait(mgr.offload([i], [HASHES[i]], parent_sequence_hashes=[None]), timeout=10)
        storage = mgr.disk_pool.storage  # type: ignore[union-attr]
        for age, h in enumerate(HASHES[:3]):  # oldest first
            os.utime(storage.path(h), ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
    small = KvBlockManager(KvTierConfig(model=MODEL, disk_blocks=2, disk_dir=disk))
    small.register_device_kv(engine_tensors("block_first", MODEL, 8))
    with small:
        pool = small.disk_pool.pool  # type: ignore[union-attr]
        assert [pool.contains(h) for h in HASHES[:3]] == [False, True, True]
        files = small.disk_pool.storage  # type: ignore[union-attr]
        # the block that did not fit is deleted, so G3 stays within its configured size
        assert [files.path(h).exists() for h in HASHES[:3]] == [False, True, True]


def test_after_reopen_the_oldest_block_is_evicted_first(tmp_path: Path) -> None:
    """Restored blocks keep their recency: a full G3 evicts the oldest file first, as it would
    have before the restart, never the newest."""
    import os

    disk = str(tmp_path / "g3")
    cfg = KvTierConfig(model=MODEL, disk_blocks=3, disk_dir=disk)
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("block_first", MODEL, 8))
    with mgr:
        mgr.wait(mgr.offload([0, 1, 2], HASHES[:3], parent_sequence_hashes=[None] * 3), timeout=10)
        storage = mgr.disk_pool.storage  # type: ignore[union-attr]
        for age, h in enumerate(HASHES[:3]):  # HASHES[0] oldest, HASHES[2] newest
            os.utime(storage.path(h), ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
    again = KvBlockManager(cfg)
    again.register_device_kv(engine_tensors("block_first", MODEL, 8))
    with again:
        pool = again.disk_pool.pool  # type: ignore[union-attr]
        assert [pool.contains(h) for h in HASHES[:3]] == [True, True, True]
        new = again.offload([3], [HASHES[3]], parent_sequence_hashes=[None])
        again.wait(new, timeout=10)
        assert new.ok
        assert [pool.contains(h) for h in HASHES[:4]] == [False, True, True, True]
        assert not again.disk_pool.storage.path(HASHES[0]).exists()  # type: ignore[union-attr]
        pool.check_invariants()
