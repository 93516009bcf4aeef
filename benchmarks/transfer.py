"""kvtier's CUDA transfers against the naive way and the PCIe limit, all measured in this run.

One command on a GPU machine: ``python benchmarks/transfer.py`` (``--quick`` for a short run).
For Llama-3-8B-shaped blocks (32 layers, 16 tokens, 8 KV heads, head dim 128, bf16: 2 MiB) and
Llama-3-70B-shaped blocks (80 layers: 5 MiB), in vLLM's FlashAttention layout (one
``[2, num_blocks, 16, 8, 128]`` tensor per layer), with scattered device blocks and scattered
host rows, it prints per transfer size and direction:

- kvtier GB/s (``CudaCopyEngine``, default config, wall time from submit to completion),
- naive GB/s (one ``copy_`` per (block, layer, K/V) piece; up to 256 blocks),
- limit GB/s (one large pinned copy of the same bytes) and kvtier/limit;

then both directions at once against the two-way limit, the time to onboard a 32k-token 8B
prefix (2048 blocks, 4 GiB), and disk->device GB/s against raw O_DIRECT reads of the same files.
Every measured path is verified byte for byte against the source in the same run.

Without a GPU it says so and runs the same flow at small sizes on CPU (``TorchCopyEngine``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

if __package__ in (None, "") and "kvtier" not in sys.modules:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.config import ModelConfig
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage, aligned_empty
from kvtier.storage.layout import detect_layout
from kvtier.transfer.copy_api import CopyEngine
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader
from kvtier.transfer.engine import TorchCopyEngine

GB = 1e9
SHAPES = {
    "8B": ModelConfig(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128),
    "70B": ModelConfig(num_layers=80, block_size=16, num_kv_heads=8, head_dim=128),
}
CPU_SHAPES = {"8B-tiny": ModelConfig(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64)}
Row = tuple[str, int, str, float, float, float, float]


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    """Holds the device, engine and host rows of one shape, and measures its paths."""

    def __init__(self, model: ModelConfig, pool: int, engine: CopyEngine, cuda: bool) -> None:
        self.model = model
        self.pool = pool
        self.cuda = cuda
        self.engine = engine
        dev = "cuda" if cuda else "cpu"
        g = torch.Generator(device=dev).manual_seed(7)
        shape = (2, pool, model.block_size, model.num_kv_heads, model.head_dim)
        n = 1
        for s in shape:
            n *= s
        tensors = {
            f"layers.{i}": torch.randint(
                -(2**15), 2**15, (n,), dtype=torch.int16, device=dev, generator=g
            )
            .view(torch.bfloat16)
            .view(shape)
            for i in range(model.num_layers)
        }
        self.dev = DeviceStorage(detect_layout(tensors, model), tensors)
        self.bb = model.block_bytes
        self.host = HostStorage(pool, self.bb, pin_memory=cuda)
        self.host.allocate()
        self.pinner = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def canonical(self, ids: list[int]) -> torch.Tensor:
        """Blocks ``ids`` as canonical rows, computed with plain torch ops (the reference)."""
        idx = torch.tensor(ids, device=self.dev.device)
        parts = [
            self.dev.layer_bytes(i).index_select(1, idx).transpose(0, 1).reshape(len(ids), -1)
            for i in range(self.model.num_layers)
        ]
        return torch.cat(parts, 1)

    def timed(self, fn: Callable[[], None], reps: int) -> float:
        fn()
        self.sync()
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def kvtier(self, to_host: bool, dids: list[int], hids: list[int]) -> Callable[[], None]:
        def run() -> None:
            if to_host:
                h = self.engine.device_to_host(self.dev, self.host, dids, hids)
            else:
                h = self.engine.host_to_device(self.host, self.dev, hids, dids)
            err = h.wait(120)
            if err is not None:
                raise err

        return run

    def naive(self, to_host: bool, dids: list[int], hids: list[int]) -> Callable[[], None]:
        nl = self.model.num_layers

        def run() -> None:
            for d, h in zip(dids, hids, strict=True):
                row = self.host.rows[h].view(nl, 2, -1)
                for layer in range(nl):
                    v = self.dev.layer_bytes(layer)
                    for o in range(2):
                        if to_host:
                            row[layer, o].copy_(v[o, d], non_blocking=self.cuda)
                        else:
                            v[o, d].copy_(row[layer, o], non_blocking=self.cuda)

        return run

    def limit(self, to_host: bool, n: int, scratch: torch.Tensor) -> Callable[[], None]:
        host = self.host.rows.view(-1)[: n * self.bb]
        dev = scratch.view(-1)[: n * self.bb]

        def run() -> None:
            if to_host:
                host.copy_(dev, non_blocking=self.cuda)
            else:
                dev.copy_(host, non_blocking=self.cuda)

        return run

    def check_host(self, dids: list[int], hids: list[int], step: int = 256) -> bool:
        """Host rows ``hids`` hold exactly device blocks ``dids`` (checked in slices)."""
        for i in range(0, len(dids), step):
            ref = self.canonical(dids[i : i + step])
            if not torch.equal(self.host.rows[hids[i : i + step]].to(ref.device), ref):
                return False
        return True

    def check_dev(self, dids: list[int], ref: torch.Tensor, step: int = 256) -> bool:
        """Device blocks ``dids`` hold exactly the canonical rows ``ref``."""
        return all(
            torch.equal(self.canonical(dids[i : i + step]), ref[i : i + step])
            for i in range(0, len(dids), step)
        )


def measure_shape(name: str, b: Bench, sizes: list[int], reps: int, rows: list[Row]) -> None:
    """kvtier (scattered and consecutive host rows), naive and limit, both directions, checked."""
    gen = torch.Generator().manual_seed(1)
    scratch_n = max(sizes)
    scratch = torch.empty(scratch_n * b.bb, dtype=torch.uint8, device=b.dev.device)
    for n in sizes:
        dids = torch.randperm(b.pool, generator=gen)[:n].tolist()
        hids = torch.randperm(b.pool, generator=gen)[:n].tolist()
        crow = list(range(n))
        nbytes = n * b.bb
        tgt = torch.tensor(dids, device=b.dev.device)

        def poison(tgt: torch.Tensor = tgt) -> None:
            for i in range(b.model.num_layers):
                b.dev.layer_bytes(i).index_fill_(1, tgt, 0)

        ref = b.canonical(dids)
        # the limits first: the device->host one overwrites host rows 0..n-1
        tl_out = b.timed(b.limit(True, n, scratch), reps)
        tl_in = b.timed(b.limit(False, n, scratch), reps)
        # consecutive host rows (a pool that hands out runs)
        b.host.rows[crow] = 0
        tc_out = b.timed(b.kvtier(True, dids, crow), reps)
        ok_out = b.check_host(dids, crow)
        poison()
        tc_in = b.timed(b.kvtier(False, dids, crow), reps)
        ok_in = b.check_dev(dids, ref)
        # scattered host rows (a fragmented pool): the headline figure
        b.host.rows[hids] = 0
        t_out = b.timed(b.kvtier(True, dids, hids), reps)
        ok_out = ok_out and b.check_host(dids, hids)
        poison()
        t_in = b.timed(b.kvtier(False, dids, hids), reps)
        ok_in = ok_in and b.check_dev(dids, ref)
        tn_out = tn_in = float("nan")
        if n <= 256:
            b.host.rows[hids] = 0
            tn_out = b.timed(b.naive(True, dids, hids), max(1, reps // 2))
            ok_out = ok_out and b.check_host(dids, hids)
            poison()
            tn_in = b.timed(b.naive(False, dids, hids), max(1, reps // 2))
            ok_in = ok_in and b.check_dev(dids, ref)
        for d, ok, t, tc, tn, tl in (
            ("d2h", ok_out, t_out, tc_out, tn_out, tl_out),
            ("h2d", ok_in, t_in, tc_in, tn_in, tl_in),
        ):
            rows.append(
                (
                    name,
                    n,
                    d if ok else d + " BAD",
                    nbytes / t,
                    nbytes / tc,
                    nbytes / tn,
                    nbytes / tl,
                )
            )
            log(
                f"  {name} {n:5d} {d}  kvtier {nbytes / t / GB:6.1f} (consecutive rows "
                f"{nbytes / tc / GB:6.1f})  limit {nbytes / tl / GB:6.1f}  exact {ok}"
            )
        del ref
    del scratch


def both_ways(b: Bench, n: int, reps: int) -> tuple[float, float, bool]:
    """Offload n blocks while onboarding n others; return (kvtier GB/s, two-way limit, exact)."""
    gen = torch.Generator().manual_seed(2)
    perm = torch.randperm(b.pool, generator=gen).tolist()
    out_d, in_d = perm[:n], perm[n : 2 * n]
    hperm = torch.randperm(b.pool, generator=gen).tolist()
    out_h, in_h = hperm[:n], hperm[n : 2 * n]
    # the rows to onboard hold known bytes
    b.host.rows[in_h] = torch.randint(0, 256, (n, b.bb), dtype=torch.uint8, generator=gen)
    in_ref = b.host.rows[in_h].to(b.dev.device)

    def offload() -> None:
        assert b.engine.device_to_host(b.dev, b.host, out_d, out_h).wait(120) is None

    def run() -> None:
        # Offload and onboard are submitted from two threads, as the connector's save path and
        # load path are; each direction has its own streams and lock in the engine.
        t = threading.Thread(target=offload)
        t.start()
        assert b.engine.host_to_device(b.host, b.dev, in_h, in_d).wait(120) is None
        t.join()

    out_ref = b.canonical(out_d)
    t = b.timed(run, reps)
    ok = bool(torch.equal(b.host.rows[out_h].to(b.dev.device), out_ref)) and b.check_dev(
        in_d, in_ref
    )
    tl = float("nan")
    if b.cuda:
        dev_a = torch.empty(n * b.bb, dtype=torch.uint8, device=b.dev.device)
        dev_b = torch.empty_like(dev_a)
        host_a = b.host.rows.view(-1)[: n * b.bb]
        host_b = b.host.rows.view(-1)[n * b.bb : 2 * n * b.bb]
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()  # type: ignore[no-untyped-call]

        def lim() -> None:
            with torch.cuda.stream(s1):
                host_a.copy_(dev_a, non_blocking=True)
            with torch.cuda.stream(s2):
                dev_b.copy_(host_b, non_blocking=True)

        tl = b.timed(lim, reps)
    return 2 * n * b.bb / t, 2 * n * b.bb / tl, ok


def onboard_prefix(b: Bench, reps: int) -> tuple[float, bool]:
    """Median ms to onboard a 32k-token prefix (2048 blocks of 16 tokens) from scattered rows."""
    n = 32768 // b.model.block_size
    gen = torch.Generator().manual_seed(3)
    dids = torch.randperm(b.pool, generator=gen)[:n].tolist()
    hids = torch.randperm(b.pool, generator=gen)[:n].tolist()
    b.engine.device_to_host(b.dev, b.host, dids, hids).wait(120)
    ref = b.canonical(dids)
    t = b.timed(b.kvtier(False, dids, hids), reps)
    return t * 1e3, b.check_dev(dids, ref)


def raw_direct_read(paths: list[Path], size: int, threads: int) -> float:
    """Seconds to read ``paths`` whole with O_DIRECT on ``threads`` threads (no checks)."""
    bufs = [aligned_empty(size) for _ in range(threads)]
    local = threading.local()
    slots = iter(range(threads))
    lock = threading.Lock()

    def one(p: Path) -> int:
        if not hasattr(local, "buf"):
            with lock:
                local.buf = bufs[next(slots)].numpy().data
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [local.buf], 0)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(one, paths))
    t = time.perf_counter() - t0
    assert got == size * len(paths), (got, size, len(paths))
    return t


def disk_to_device(b: Bench, n: int, threads: int, root: Path) -> tuple[float, float, bool]:
    """Disk -> device GB/s through kvtier's loader vs raw O_DIRECT reads, same files, same run."""
    disk = DiskStorage(root, b.dev.layout.fingerprint, b.bb)
    disk.open()
    gen = torch.Generator().manual_seed(4)
    hashes = [10_000 + i for i in range(n)]
    ref_rows = torch.randint(0, 256, (n, b.bb), dtype=torch.uint8, generator=gen)
    for h, r in zip(hashes, ref_rows, strict=True):
        disk.write(h, r)
    paths = [disk.path(h) for h in hashes]
    size = paths[0].stat().st_size
    dids = torch.randperm(b.pool, generator=gen)[:n].tolist()
    io = DiskIo(disk, threads)
    io.start()
    pin = b.dev.device.type == "cuda"
    loader = DiskToDeviceLoader(io, b.engine, DiskLoadConfig(group_blocks=16), pin_memory=pin)
    loader.start()
    raw, ours = [], []
    ok = True
    try:
        for _ in range(3):
            raw.append(raw_direct_read(paths, size, threads))
            t0 = time.perf_counter()
            handle = loader.load(b.dev, hashes, dids)
            handle.wait(300)
            b.sync()
            ours.append(time.perf_counter() - t0)
            ok = ok and not handle.failed
    finally:
        loader.close()
        io.close()
    ok = ok and b.check_dev(dids, ref_rows.to(b.dev.device))
    for p in paths:
        p.unlink()
    nbytes = n * b.bb
    return nbytes / statistics.median(ours), nbytes / statistics.median(raw), ok


def make_engine(cuda: bool) -> CopyEngine:
    if cuda:
        from kvtier.transfer.cuda import CudaCopyEngine

        return CudaCopyEngine()
    return TorchCopyEngine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--disk-dir", default=None, help="directory for the disk test (default: tmp)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        shapes = SHAPES
        sizes = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096]
        reps = 3 if args.quick else 5
        disk_n, threads = 512, 8
    else:
        log("no GPU present: running the same flow at small sizes on CPU (TorchCopyEngine)")
        shapes = CPU_SHAPES
        sizes, reps, disk_n, threads = [16, 64], 2, 32, 2
    rows: list[Row] = []
    extra: list[str] = []
    for name, model in shapes.items():
        pool = max(max(sizes), 2048 if name == "8B" else 0, 2 * min(1024, max(sizes)))
        engine = make_engine(cuda)
        engine.start()
        t0 = time.perf_counter()
        b = Bench(model, pool, engine, cuda)
        log(
            f"{name}: {pool} blocks of {model.block_bytes >> 10} KiB set up in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        try:
            measure_shape(name, b, sizes, reps, rows)
            n2 = min(1024, max(sizes))
            gbs, lim, ok = both_ways(b, n2, reps)
            extra.append(
                f"{name} both ways, {n2}+{n2} blocks: kvtier {gbs / GB:.1f} GB/s, two-way limit "
                f"{lim / GB:.1f} GB/s, ratio {gbs / lim:.2f}, exact {ok}"
            )
            log("  " + extra[-1])
            if name == "8B" or not cuda:
                if pool >= 32768 // model.block_size:
                    ms, ok = onboard_prefix(b, reps)
                    extra.append(
                        f"{name} 32k-token prefix onboard (2048 blocks, "
                        f"{2048 * model.block_bytes / 2**30:.1f} GiB): {ms:.1f} ms "
                        f"(target <= 90 ms), exact {ok}"
                    )
                    log("  " + extra[-1])
                root = Path(args.disk_dir or tempfile.mkdtemp(prefix="kvtier-bench-"))
                ours, raw, ok = disk_to_device(b, min(disk_n, pool), threads, root)
                extra.append(
                    f"{name} disk->device, {min(disk_n, pool)} blocks, {threads} threads: kvtier "
                    f"{ours / GB:.2f} GB/s, raw O_DIRECT read {raw / GB:.2f} GB/s, ratio "
                    f"{ours / raw:.2f}, exact {ok}"
                )
                log("  " + extra[-1])
        finally:
            engine.close()
            del b
            if cuda:
                torch.cuda.empty_cache()
    log("")
    log("GB/s; kvtier: scattered host rows (random rows of the pool); kvtier-c: consecutive rows")
    log(
        f"{'shape':6s} {'blocks':>6s} {'dir':8s} {'kvtier':>8s} {'kvtier-c':>8s} {'naive':>8s} "
        f"{'limit':>8s} {'kvtier/limit':>12s} {'kvtier-c/limit':>14s}"
    )
    for name, n, d, k, kc, nv, lim in rows:
        log(
            f"{name:6s} {n:6d} {d:8s} {k / GB:8.1f} {kc / GB:8.1f} {nv / GB:8.1f} {lim / GB:8.1f} "
            f"{k / lim:12.2f} {kc / lim:14.2f}"
        )
    for line in extra:
        log(line)
    bad = [r for r in rows if "BAD" in r[2]] + [e for e in extra if "exact False" in e]
    if bad:
        log(f"VERIFICATION FAILED: {bad}")
        return 1
    log("all measured paths verified byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
