"""The scheduler half sees G3 blocks other engines wrote while it runs (no vLLM, real files).

A miss in this engine's own G3 index is not a miss in the tier: the worker's first report names
its G3 folder, and a lookup that misses checks the block's file there (one ``lstat`` per worker)
and adopts it. Restored parent links that name the block itself or a cycle pin nothing.
"""

from __future__ import annotations

from pathlib import Path

from test_vllm_scheduler import BS, FakeRequest

from kvtier.executor.jobs import WorkerReport
from kvtier.hashing import salt_hash, sequence_hashes
from kvtier.storage.block_file import block_file_name
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig


def _hashes(tokens: list[int]) -> list[int]:
    return sequence_hashes(tokens, BS, salt_hash(None, None))


def test_blocks_another_engine_wrote_are_hits(tmp_path: Path) -> None:
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    for f in folders:
        f.mkdir()
    s = KvTierScheduler(SchedulerConfig(block_size=BS, host_blocks=0, disk_blocks=8, num_workers=2))
    s.process_reports(
        [WorkerReport(rank=r, restored=[], disk_folder=str(f)) for r, f in enumerate(folders)]
    )
    req = FakeRequest("a", list(range(3 * BS + 1)))
    h = _hashes(req.tokens)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)  # nothing anywhere yet
    for f in folders:  # another engine stores the first two blocks (every rank)
        for x in h[:2]:
            (f / block_file_name(x)).write_bytes(b"verified by the worker when read")
    (folders[0] / block_file_name(h[2])).write_bytes(b"rank 0 only: not a hit")
    req2 = FakeRequest("b", list(range(3 * BS + 1)))
    assert s.get_num_new_matched_tokens(req2, 0) == (2 * BS, True)
    assert s.disk.lookup(h[0]) is not None and s.disk.lookup(h[2]) is None
    s.check_invariants()


def test_restored_self_and_cyclic_parents_stay_evictable(tmp_path: Path) -> None:
    s = KvTierScheduler(SchedulerConfig(block_size=BS, host_blocks=0, disk_blocks=3))
    # newest first: A names itself, B and C name each other
    s.process_reports(
        [WorkerReport(rank=0, restored=[0xA, 0xB, 0xC], restored_parents=[0xA, 0xC, 0xB])]
    )
    assert len(s.disk) == 3
    for x in (0xD1, 0xD2, 0xD3):
        got = s.disk.reserve(x)
        assert got is not None  # each reservation could evict a restored block
        s.disk.commit(x)
    assert not any(x in s.disk for x in (0xA, 0xB, 0xC))
    s.check_invariants()
