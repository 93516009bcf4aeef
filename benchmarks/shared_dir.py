"""Several processes on one G3 directory: aggregate throughput against raw O_DIRECT processes.

Used by ``benchmarks/tiers.py`` (its multi-process section). Each of ``procs`` processes writes
its share of the blocks, then reads the share another process wrote (so every read is a block
this process did not write), all processes starting each phase together (a barrier). kvtier:
``DiskStorage`` on ``DiskIo`` threads, all processes on one namespace folder with the
cross-process block count (``capacity``), ``link()`` publishing and header + checksum
verification. Raw: the same processes and threads writing and reading plain O_DIRECT files of
the same bytes, no header, no checksum, no count. Aggregate GB/s = all bytes / (last finish -
first start). Every read is checked bit for bit against the writer's bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import torch

FP = 0x5AD0_0000_0000_0001


def _rows(proc: int, n: int, nbytes: int) -> torch.Tensor:
    from kvtier.storage.host import HostStorage

    host = HostStorage(n, nbytes)
    host.allocate()
    gen = torch.Generator().manual_seed(1000 + proc)
    host.rows.view(torch.int32).random_(generator=gen)
    return host.rows


def _raw(path: Path, view: memoryview, write: bool) -> None:
    flags = (os.O_CREAT | os.O_WRONLY | os.O_TRUNC) if write else os.O_RDONLY
    fd = os.open(path, flags | os.O_DIRECT, 0o600)
    try:
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], done) if write else os.preadv(fd, [view[done:]], done)
            if n <= 0:
                raise OSError("short I/O")
            done += n
    finally:
        os.close(fd)


def _worker(
    kind: str,
    root: str,
    proc: int,
    procs: int,
    n: int,
    nbytes: int,
    threads: int,
    barrier: Barrier,
    out: Any,
) -> None:
    src = _rows(proc, n, nbytes)
    peer = (proc + 1) % procs
    want = _rows(peer, n, nbytes)
    dst = _rows(proc, n, nbytes)  # 4096-aligned rows (O_DIRECT), overwritten by the reads
    dst.zero_()
    if kind == "kvtier":
        from kvtier.storage.disk import DiskStorage
        from kvtier.transfer.disk_io import DiskIo

        st = DiskStorage(Path(root) / "kvtier", FP, nbytes, capacity=2 * procs * n)
        st.open()
        io = DiskIo(st, threads)
        io.start()
        mine = [(proc << 32) + k for k in range(n)]
        theirs = [(peer << 32) + k for k in range(n)]

        def write() -> None:
            for f in io.write(mine, [src[k] for k in range(n)], [None] * n, [0] * n):
                f.result()

        def read() -> None:
            for f in io.read(theirs, [dst[k] for k in range(n)]):
                f.result()
    else:
        folder = Path(root) / "raw"
        folder.mkdir(exist_ok=True)
        pool = ThreadPoolExecutor(threads)

        def write() -> None:
            views = [memoryview(src[k].numpy().data) for k in range(n)]
            list(pool.map(lambda k: _raw(folder / f"{proc}-{k}", views[k], True), range(n)))

        def read() -> None:
            views = [memoryview(dst[k].numpy().data) for k in range(n)]
            list(pool.map(lambda k: _raw(folder / f"{peer}-{k}", views[k], False), range(n)))

    barrier.wait()
    t0 = time.time()
    write()
    t1 = time.time()
    barrier.wait()
    t2 = time.time()
    read()
    t3 = time.time()
    out.put((proc, t0, t1, t2, t3, bool(torch.equal(dst, want))))
    if kind == "kvtier":
        io.close()
        st.close()


def run_once(
    kind: str, root: Path, procs: int, n: int, nbytes: int, threads: int
) -> tuple[float, float]:
    """(write seconds, read seconds) of one aggregate run of ``procs`` processes."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker, args=(kind, str(root), i, procs, n, nbytes, threads, barrier, out)
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    results: list[Any] = []
    deadline = time.monotonic() + 600
    while len(results) < procs:
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode]
            if dead or time.monotonic() > deadline:
                for w in workers:
                    w.kill()
                raise SystemExit(f"{kind} worker failed (exit codes {dead})") from None
    for w in workers:
        w.join()
    if not all(r[5] for r in results):
        raise SystemExit(f"{kind}: a process read wrong bytes from another's blocks")
    write = max(r[2] for r in results) - min(r[1] for r in results)
    read = max(r[4] for r in results) - min(r[3] for r in results)
    return write, read


def bench_shared(
    root: Path, procs: int, blocks: int, nbytes: int, threads: int, repeats: int
) -> list[tuple[str, float, float, float]]:
    """Rows (name, kvtier GB/s, raw GB/s, ratio) for the write and the cross-read phase."""
    import shutil

    n = max(1, blocks // procs)
    total = procs * n * nbytes
    times: dict[str, list[float]] = {k: [] for k in ("kw", "kr", "rw", "rr")}
    for rep in range(repeats):
        for sub in ("kvtier", "raw"):
            shutil.rmtree(root / sub, ignore_errors=True)
        order = ("kvtier", "raw") if rep % 2 else ("raw", "kvtier")
        for kind in order:
            wsec, rsec = run_once(kind, root, procs, n, nbytes, threads)
            key = "k" if kind == "kvtier" else "r"
            times[key + "w"].append(wsec)
            times[key + "r"].append(rsec)
    rows = []
    for name, k, r in (("write", "kw", "rw"), ("read (other's blocks)", "kr", "rr")):
        ratio = statistics.median(b / a for a, b in zip(times[k], times[r], strict=True))
        rows.append(
            (
                f"{procs} processes, one dir: {name}",
                total / statistics.median(times[k]) / 1e9,
                total / statistics.median(times[r]) / 1e9,
                ratio,
            )
        )
    return rows
