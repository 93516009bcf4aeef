"""G3 start-up with a million blocks on disk: how long until an engine can serve them.

Why this exists: a disk tier that reads every file's header at start takes minutes with a
million blocks (one open + read + close each, cold cache: one random read each); kvtier's
``DiskStorage.open()`` reads names only beyond ``scan_headers_up_to`` files and verifies each
header when its block is read. This measures, on one directory of ``--blocks`` real block files:

- ``DiskStorage.open()`` (names only: the start-up path for a large tier),
- ``KvBlockManager.start()`` (the same scan; a tier this large is not indexed at start: blocks
  join the G3 pool when first matched, by file name, as blocks other processes wrote do) and the
  first match of a 64-block chain after it,
- the vLLM scheduler half's G3 index becoming ready from the worker's first report,
- for reference, the full header scan (every header read and checked, as for small tiers) and
  (``--restore-reference``) indexing every block at start instead.

Files are created once (``--dir``; reused when present) with a valid header and a sparse
payload, so a million of them take about 4 GB of disk. Run:
``.venv/bin/python benchmarks/g3_startup.py --blocks 1000000 --dir /path/with/room``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig, ModelConfig
from kvtier.executor.jobs import WorkerReport
from kvtier.storage.block_file import BlockHeader, block_file_name, file_size
from kvtier.storage.disk import DiskStorage
from kvtier.storage.layout import LayoutKind, default_layout
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig

MODEL = ModelConfig(num_layers=1, block_size=16, num_kv_heads=1, head_dim=64, dtype="bfloat16")
"""4096-byte blocks: the smallest files, so a million fit on a dev machine (8 KiB each)."""


def _populate(folder: Path, fingerprint: int, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    have = sum(1 for _ in os.scandir(folder))
    if have >= n:
        return
    size = file_size(MODEL.block_bytes)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(have, n):
            h = 0x1_0000_0000 + i
            head = BlockHeader(fingerprint, h, h - 1 if i else None, 0, MODEL.block_bytes, 0)
            fd = os.open(block_file_name(h), os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dfd)
            try:
                os.write(fd, head.pack())
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            if i % 100_000 == 0:
                print(f"  created {i} files", flush=True)
    finally:
        os.close(dfd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--blocks", type=int, default=1_000_000, help="block files on disk (1M)")
    p.add_argument("--dir", default=".bench-g3-startup", help="tier directory (kept, reused)")
    p.add_argument("--skip-full-scan", action="store_true", help="skip the header-scan reference")
    p.add_argument(
        "--restore-reference", action="store_true", help="also time indexing every block at start"
    )
    args = p.parse_args(argv)
    n = args.blocks
    fp = default_layout(MODEL, LayoutKind.FULLY_CONTIGUOUS, 8).fingerprint
    root = Path(args.dir)
    t = time.perf_counter()
    _populate(root / f"{fp:016x}", fp, n)
    print(f"{n} block files in {root} ({time.perf_counter() - t:.1f} s to create or find)")
    rows: list[tuple[str, float]] = []

    t = time.perf_counter()
    st = DiskStorage(root, fp, MODEL.block_bytes, capacity=n)
    assert st.open() == [] and st.names_only
    rows.append(("DiskStorage.open() (names only)", time.perf_counter() - t))
    st.close()

    cfg = KvTierConfig(model=MODEL, device_blocks=8, disk_blocks=n, disk_dir=str(root))
    t = time.perf_counter()
    mgr = KvBlockManager(cfg)
    mgr.start()
    rows.append(("KvBlockManager.start()", time.perf_counter() - t))
    chain = [0x1_0000_0000 + i for i in range(n // 2, n // 2 + 64)]
    t = time.perf_counter()
    match = mgr.match(chain)
    rows.append(("  then the first match of 64 blocks (adopted by name)", time.perf_counter() - t))
    assert match.num_disk == 64, match.num_disk
    match.release()
    mgr.close()

    sched = KvTierScheduler(SchedulerConfig(block_size=16, host_blocks=0, disk_blocks=n))
    t = time.perf_counter()
    folder = str(root / f"{fp:016x}")
    sched.process_reports([WorkerReport(rank=0, restored=[], disk_folder=folder)])
    rows.append(("vLLM scheduler half: G3 index ready", time.perf_counter() - t))

    if args.restore_reference:
        hashes = [0x1_0000_0000 + i for i in range(n)]
        ref = KvTierScheduler(SchedulerConfig(block_size=16, host_blocks=0, disk_blocks=n))
        t = time.perf_counter()
        ref.process_reports([WorkerReport(rank=0, restored=hashes, restored_parents=[None] * n)])
        rows.append(
            ("reference: every block indexed at start (scheduler)", time.perf_counter() - t)
        )

    if not args.skip_full_scan:
        t = time.perf_counter()
        full = DiskStorage(root, fp, MODEL.block_bytes, scan_headers_up_to=n)
        assert len(full.open()) == n
        rows.append(("reference: every header read (small-tier path)", time.perf_counter() - t))
        full.close()
    print(f"{'start-up step':<56} {'seconds':>8}")
    for name, sec in rows:
        print(f"{name:<56} {sec:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
