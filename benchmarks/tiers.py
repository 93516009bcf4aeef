"""Tier throughput: kvtier's host<->disk and host<->device paths against raw baselines, same run.

Why this exists: disks on shared VMs vary 2x from run to run, so a GB/s figure alone says little.
Every kvtier figure here is printed beside a baseline measured in the same run, interleaved, on the
same bytes, and the ratio is what the target is about (host<->disk >= 0.8 of raw O_DIRECT).

- host->disk: kvtier = ``TransferManager`` host->disk batch (header, xxh3 checksum, temp file,
  O_DIRECT ``pwritev``, rename; ``--threads`` I/O threads). Raw = the same blocks written with
  O_DIRECT ``pwrite``, one file per block, on the same number of threads, no header or checksum.
- disk->host: kvtier = ``DiskIo`` reads with header and checksum verification. Raw = O_DIRECT
  ``preadv`` of the raw files.
- disk->device: kvtier's full onboard path (read, verify, copy to the device), for reference.
- several processes sharing one G3 directory (``--procs``, default 3; ``benchmarks/shared_dir.py``):
  aggregate write and cross-process read throughput of kvtier processes against raw O_DIRECT
  processes, same bytes, same threads per process, interleaved.
- host<->device: kvtier's copy engine moving one batch of all blocks (block-first layout: one
  tensor per layer, so a block is ``num_layers`` scattered pieces) against one contiguous copy of
  the same bytes (the memcpy / DMA limit). CUDA when present (its engine if importable), else CPU.

- G4 remote (Redis), one node and a 3-node cluster started here on localhost: kvtier = the
  write-behind's path (``RemoteStore.put_each``: each connection copies a payload into a
  ``ValueBuffers`` buffer and fills in header + xxh3 checksum as it sends it) and
  ``RemoteStore.get_each`` with ``decode_block`` (verification) on every value; raw =
  ``redis-benchmark`` SET/GET of values of the same size on the same server in the same run, no
  pipelining, with one client per node (``--remote-clients``) and again with as many as kvtier
  uses connections (``--remote-parallel``). Skipped, saying why, without redis-server.

Run: ``.venv/bin/python benchmarks/tiers.py`` (``--help`` for sizes). Prints medians of
``--repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvtier.config import ModelConfig
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import LayoutKind, default_layout
from kvtier.storage.remote import default_parallel
from kvtier.transfer.copy_api import CopyEngine
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader
from kvtier.transfer.engine import TorchCopyEngine
from kvtier.transfer.manager import TransferManager, TransferPath

MODEL = ModelConfig(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
"""A Llama-3-8B-shaped rank: one block is 2 MiB across 32 layers."""


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _raw_write(directory: Path, host: HostStorage, threads: int) -> None:
    def one(i: int) -> None:
        fd = os.open(directory / f"{i}.raw", os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT)
        try:
            view = memoryview(host.rows[i].numpy().data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(host.num_blocks)))


def _raw_read(directory: Path, host: HostStorage, threads: int) -> None:
    def one(i: int) -> None:
        fd = os.open(directory / f"{i}.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            view = memoryview(host.rows[i].numpy().data)
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], done)
                if n <= 0:
                    raise OSError("short read")
                done += n
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(host.num_blocks)))


def _settle(
    tm: TransferManager, path: TransferPath, hashes: list[int], src: list[int], dst: list[int]
) -> None:
    handle = tm.submit(path, hashes, src, dst)
    while not handle.done():
        tm.poll()
        if not handle.done():
            time.sleep(0.0002)
    if handle.error is not None:
        raise handle.error


def _fill(t: torch.Tensor) -> None:
    gen = torch.Generator(device=t.device).manual_seed(0)
    t.view(torch.int32).random_(generator=gen)


def bench_disk(args: argparse.Namespace, root: Path) -> list[tuple[str, float, float, float]]:
    n, bb = args.blocks, MODEL.block_bytes
    src = HostStorage(n, bb)
    src.allocate()
    _fill(src.rows)
    dst = HostStorage(n, bb)
    dst.allocate()
    layout = default_layout(MODEL, LayoutKind.BLOCK_FIRST, n)
    device = DeviceStorage.allocate(layout, "cpu")
    storage = DiskStorage(root / "kvtier", layout.fingerprint, bb, o_direct=True)
    storage.open()
    if not storage.o_direct:
        raise SystemExit(f"{root} does not take O_DIRECT; pick another --dir")
    raw_dir = root / "raw"
    raw_dir.mkdir(exist_ok=True)
    io = DiskIo(storage, args.threads)
    io.start()
    engine = TorchCopyEngine()
    engine.start()
    loader = DiskToDeviceLoader(io, engine, DiskLoadConfig.for_staging(n))
    loader.start()
    tm = TransferManager(
        engine,
        device=device,
        host=src,
        disk_io=io,
        loader=loader,
        num_layers=MODEL.num_layers,
        max_inflight_blocks=n,
    )
    hashes = [0x5EED0000 + i for i in range(n)]
    ids = list(range(n))
    times: dict[str, list[float]] = {k: [] for k in ("kw", "rw", "kr", "rr", "kd")}

    def kv_write() -> None:
        _settle(tm, TransferPath.HOST_TO_DISK, hashes, ids, [])

    def kv_read() -> None:
        for f in io.read(hashes, [dst.rows[i] for i in ids]):
            f.result()

    def kv_onboard() -> None:
        _settle(tm, TransferPath.DISK_TO_DEVICE, hashes, [], ids)

    try:
        for rep in range(args.repeats):
            for f in storage.directory.glob("*.kvb"):
                f.unlink()
            for f in raw_dir.glob("*.raw"):
                f.unlink()
            # alternate which side goes first, so drift in the disk favours neither
            pairs = [
                ("kw", kv_write, "rw", lambda: _raw_write(raw_dir, src, args.threads)),
                ("kr", kv_read, "rr", lambda: _raw_read(raw_dir, dst, args.threads)),
            ]
            for k, kv, r, raw in pairs:
                order = ((k, kv), (r, raw)) if rep % 2 else ((r, raw), (k, kv))
                for key, fn in order:
                    times[key].append(_timed(fn))
            times["kd"].append(_timed(kv_onboard))
        if not torch.equal(dst.rows, src.rows):
            raise SystemExit("disk round trip is not bit-exact")
        got = torch.stack([device.read_block(i) for i in (0, n // 2, n - 1)])
        if not torch.equal(got, src.rows[[0, n // 2, n - 1]]):
            raise SystemExit("disk->device round trip is not bit-exact")
    finally:
        tm.close()
        engine.close()
        loader.close()
        io.close()
        storage.close()
    return [
        _row("host->disk", n * bb, times["kw"], times["rw"]),
        _row("disk->host", n * bb, times["kr"], times["rr"]),
        _row("disk->device", n * bb, times["kd"], times["rr"]),
    ]


def _row(
    name: str, nbytes: int, kv: list[float], raw: list[float]
) -> tuple[str, float, float, float]:
    """GB/s medians and the median of per-repeat ratios (raw time / kvtier time)."""
    ratio = statistics.median(r / k for k, r in zip(kv, raw, strict=True))
    return (
        name,
        _gbps(nbytes, statistics.median(kv)),
        _gbps(nbytes, statistics.median(raw)),
        ratio,
    )


def _device_engine(device: str) -> tuple[CopyEngine, str]:
    if device.startswith("cuda"):
        try:
            from kvtier.transfer.cuda import CudaCopyEngine

            return CudaCopyEngine(device=device), "CudaCopyEngine"
        except ImportError:
            pass
    return TorchCopyEngine(), "TorchCopyEngine"


def bench_device(args: argparse.Namespace) -> tuple[str, list[tuple[str, float, float, float]]]:
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, bb = args.blocks, MODEL.block_bytes
    layout = default_layout(MODEL, LayoutKind.BLOCK_FIRST, n)
    device = DeviceStorage.allocate(layout, dev)
    assert isinstance(device.tensors, dict)
    for t in device.tensors.values():
        _fill(t.view(torch.uint8))
    host = HostStorage(n, bb, pin_memory=dev.startswith("cuda"))
    host.allocate()
    engine, name = _device_engine(dev)
    engine.start()
    flat_dev = torch.empty(n * bb, dtype=torch.uint8, device=dev)
    flat_host = host.rows.view(-1)
    ids = list(range(n))
    perm = ids[::-1]  # reversed: a real gather/scatter, not a straight copy
    on_gpu = dev.startswith("cuda")

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def kv_d2h() -> None:
        err = engine.device_to_host(device, host, ids, perm).wait()
        if err is not None:
            raise err

    def kv_h2d() -> None:
        err = engine.host_to_device(host, device, perm, ids).wait()
        if err is not None:
            raise err

    def raw_d2h() -> None:
        flat_host.copy_(flat_dev, non_blocking=True)
        sync()

    def raw_h2d() -> None:
        flat_dev.copy_(flat_host, non_blocking=True)
        sync()

    res: dict[str, list[float]] = {"kd": [], "rd": [], "kh": [], "rh": []}
    try:
        kv_d2h()  # warm up (allocations, kernels)
        before = device.read_block(3)
        for _ in range(args.repeats):
            res["rd"].append(_timed(raw_d2h))
            res["kd"].append(_timed(kv_d2h))
            res["rh"].append(_timed(raw_h2d))
            res["kh"].append(_timed(kv_h2d))
        if not torch.equal(device.read_block(3), before):
            raise SystemExit("host<->device round trip is not bit-exact")
    finally:
        engine.close()
    return f"{dev} ({name})", [
        _row("device->host", n * bb, res["kd"], res["rd"]),
        _row("host->device", n * bb, res["kh"], res["rh"]),
    ]


# -- G4 remote tier -------------------------------------------------------------------------------


def _redis_benchmark(port: int, size: int, n: int, clients: int, cluster: bool) -> dict[str, float]:
    """GB/s of raw SET and GET from ``redis-benchmark`` (values of ``size`` bytes, ``n`` keys).

    It runs at least 1024 requests: its rate includes a fixed ~0.25 s of its own (measured in
    cluster mode), which would make a short run look several times slower than the server is."""
    import subprocess

    requests = max(n, 1024)
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
           "-d", str(size), "-n", str(requests), "-r", str(n), "-c", str(clients),
           "--csv"]  # fmt: skip
    if cluster:
        cmd.append("--cluster")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rates: dict[str, float] = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) > 1 and cells[0] in ("SET", "GET"):
            rates[cells[0]] = float(cells[1]) * size / 1e9
    return rates


def _kvtier_connections(most: int, nodes: int, blocks: int) -> int:
    """How many connections kvtier uses for ``blocks`` keys spread over ``nodes`` nodes when
    allowed ``most`` (``RemoteStore``'s own split, ``split_parts``)."""
    from kvtier.storage.remote import split_parts

    return len(split_parts([list(range(k, blocks, nodes)) for k in range(nodes)], most))


def bench_remote(args: argparse.Namespace) -> list[tuple[str, str, float, float, float]]:
    """G4 put/get of ``--remote-blocks`` 2 MiB blocks against redis-benchmark, node and cluster."""
    from kvtier.ops.redislocal import LocalRedis, LocalRedisCluster, redis_available

    reason = redis_available()
    if reason is not None:
        print(f"G4 remote: skipped ({reason})")
        return []
    rows: list[tuple[str, str, float, float, float]] = []
    with LocalRedis(maxmemory_mb=2048) as node:
        assert node.port is not None
        rows += _bench_server(args, "node", node.url, node.port, 1)
    with LocalRedisCluster(3, maxmemory_mb=1024) as cluster:
        port = cluster.nodes[0].port
        assert port is not None
        rows += _bench_server(args, "3-node cluster", cluster.url, port, len(cluster.nodes))
    return rows


def _bench_server(
    args: argparse.Namespace, label: str, url: str, port: int, nodes: int
) -> list[tuple[str, str, float, float, float]]:
    """One server's rows. Raw baselines, both printed: one client per node (``-c 1`` on one
    node; ``-c 3`` on the cluster, where redis-benchmark puts client k on node k mod 3: ``-c 1``
    would measure one node while kvtier spreads a batch over all three) and as many clients as
    kvtier uses connections. kvtier's connections are opened before anything is timed (an
    untimed round), and kvtier and raw take turns going first."""
    from kvtier.storage.remote import GET_PARALLEL, RemoteConfig, RemoteStore
    from kvtier.storage.remote_block import ValueBuffers, decode_block, encode_in_place, remote_key

    size, n = MODEL.block_bytes, args.remote_blocks
    payloads = [os.urandom(size) for _ in range(min(n, 8))]
    hashes = list(range(1, n + 1))
    keys = [remote_key("kvtier:v1:bench", h) for h in hashes]
    buffers = ValueBuffers(n * (size + 4096))  # one batch: a write-behind's batch reuses the last's
    bufs: list[bytearray] = [bytearray()] * n
    conns = {
        "SET": _kvtier_connections(args.remote_parallel, nodes, n),
        "GET": _kvtier_connections(min(args.remote_parallel, GET_PARALLEL), nodes, n),
    }
    clients = {op: sorted({nodes * args.remote_clients, c}) for op, c in conns.items()}
    kv: dict[str, list[float]] = {"SET": [], "GET": []}
    raw: dict[tuple[int, str], list[float]] = {(c, op): [] for op in kv for c in clients[op]}

    def value_of(i: int) -> memoryview:
        # The write-behind's work for one value: the copy ``offer`` makes (on the engine's
        # thread there, beside the writer) and the header + checksum the writer's connection
        # fills in (``WriteBehindQueue._put``).
        bufs[i] = buffers.fill(payloads[hashes[i] % len(payloads)])
        return encode_in_place(1, hashes[i], None, bufs[i])

    def check(i: int, value: bytes | None) -> None:
        assert value is not None
        decode_block(value, 1, hashes[i], size)

    def baseline() -> None:
        for c in sorted({*clients["SET"], *clients["GET"]}):
            rates = _redis_benchmark(port, size, n, c, nodes > 1)
            for op in kv:
                if c in clients[op]:
                    raw[c, op].append(rates[op])

    config = RemoteConfig(url, timeout_ms=10_000, parallel=args.remote_parallel)
    with RemoteStore(config) as store:

        def put() -> None:
            store.put_each(keys, value_of)
            buffers.give_back(bufs)

        def kvtier() -> None:
            kv["SET"].append(_gbps(n * size, _timed(put)))
            kv["GET"].append(_gbps(n * size, _timed(lambda: store.get_each(keys, check))))

        put()  # untimed: every connection opened, the value buffers allocated
        store.get_each(keys, check)
        for rep in range(args.repeats):
            for fn in (kvtier, baseline) if rep % 2 == 0 else (baseline, kvtier):
                fn()
    rows = []
    for op, name in (("SET", "G4 put"), ("GET", "G4 get")):
        for c in clients[op]:
            ratio = statistics.median(k / r for k, r in zip(kv[op], raw[c, op], strict=True))
            rows.append((f"{name} [{label}, {conns[op]} conn]", f"redis-benchmark -d {size} -c {c}",
                         statistics.median(kv[op]), statistics.median(raw[c, op]),
                         ratio))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--blocks", type=int, default=256, help="2 MiB blocks per batch (256)")
    p.add_argument("--threads", type=int, default=4, help="disk I/O threads, both sides (4)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians (3)")
    p.add_argument("--dir", default=None, help="disk directory (default: a temp dir in .)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--skip-disk", action="store_true")
    p.add_argument("--skip-device", action="store_true")
    p.add_argument("--procs", type=int, default=3, help="processes sharing one G3 dir (3)")
    p.add_argument("--skip-shared", action="store_true", help="skip the multi-process section")
    p.add_argument("--skip-remote", action="store_true", help="skip G4 (Redis) figures")
    p.add_argument("--remote-blocks", type=int, default=64, help="2 MiB blocks per G4 batch (64)")
    p.add_argument("--remote-clients", type=int, default=1,
                   help="redis-benchmark clients per node (1)")  # fmt: skip
    p.add_argument("--remote-parallel", type=int, default=default_parallel(),
                   help="most connections one G4 get/put uses (RemoteConfig.parallel, "
                        f"default {default_parallel()}: this machine's CPUs, 1-8; at most 2 a "
                        "node, a get at most 4); the raw run is repeated with as many "
                        "redis-benchmark clients as kvtier's connections")  # fmt: skip
    args = p.parse_args(argv)
    mib = MODEL.block_bytes / 2**20
    print(
        f"kvtier tiers benchmark: {args.blocks} blocks x {mib:.2f} MiB = "
        f"{args.blocks * mib:.0f} MiB per batch, medians of {args.repeats} interleaved runs"
    )
    rows: list[tuple[str, str, float, float, float]] = []
    if not args.skip_disk:
        root = Path(tempfile.mkdtemp(prefix=".bench-tiers-", dir=args.dir or "."))
        try:
            for name, kv, raw, ratio in bench_disk(args, root):
                rows.append((name, f"raw O_DIRECT, {args.threads} threads", kv, raw, ratio))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if not args.skip_shared and args.procs > 1:
        from shared_dir import bench_shared  # benchmarks/shared_dir.py

        root = Path(tempfile.mkdtemp(prefix=".bench-shared-", dir=args.dir or "."))
        try:
            shared = bench_shared(
                root, args.procs, args.blocks, MODEL.block_bytes, args.threads, args.repeats
            )
            for name, kv, raw, ratio in shared:
                base = f"{args.procs} raw O_DIRECT processes, {args.threads} threads each"
                rows.append((name, base, kv, raw, ratio))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if not args.skip_device:
        where, results = bench_device(args)
        for name, kv, raw, ratio in results:
            rows.append((f"{name} [{where}]", "one contiguous copy", kv, raw, ratio))
    if not args.skip_remote:
        rows.extend(bench_remote(args))
    print(f"{'path':<44} {'kvtier GB/s':>11} {'baseline GB/s':>13} {'ratio':>6}  baseline")
    for name, base, kv, raw, ratio in rows:
        print(f"{name:<44} {kv:>11.2f} {raw:>13.2f} {ratio:>6.2f}  {base}")
    print("ratio = median over repeats of (baseline time / kvtier time) for adjacent runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
