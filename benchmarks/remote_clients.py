"""Which Redis client for G4: redis-py (hiredis parser) against valkey-glide, 2 MiB values.

Why this exists: the issue asked to measure both and keep the faster. One local redis-server,
``--blocks`` values of 2 MiB, written in one pipeline (redis-py) / one MSET (glide) and read in
one MGET each, interleaved for ``--repeats`` rounds; prints median GB/s and glide / redis-py.
``--cluster``: a 3-node cluster started here, redis-py as kvtier drives it (``RemoteStore``'s
``put_each`` / ``get_each``: one connection a node, streamed) against glide's cluster client
(multi-slot MSET / MGET, which glide splits by slot and sends to every node at once; its I/O runs
on its own Rust threads, outside the GIL). valkey-glide is not a kvtier dependency:
``pip install valkey-glide`` to run this.

Run: ``.venv/bin/python benchmarks/remote_clients.py [--cluster]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import redis

from kvtier.ops.redislocal import LocalRedis, LocalRedisCluster, redis_available


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cluster", action="store_true", help="a 3-node cluster, kvtier's own path")
    args = p.parse_args(argv)
    reason = redis_available()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    try:
        import glide
    except ImportError:
        print("skipped: valkey-glide is not installed (pip install valkey-glide)")
        return 0
    if args.cluster:
        return _cluster(args.blocks, args.repeats, glide)
    size = 2 << 20
    value = os.urandom(size)
    keys = [f"k{i}".encode() for i in range(args.blocks)]
    total = args.blocks * size
    res: dict[str, list[float]] = {"redis-py put": [], "redis-py get": [], "glide put": [],
                                   "glide get": []}  # fmt: skip
    with LocalRedis(maxmemory_mb=4096) as server:
        assert server.port is not None
        client = redis.Redis(port=server.port)

        async def glide_round(c: Any) -> tuple[float, float]:
            t0 = time.perf_counter()
            await c.mset({k: value for k in keys})
            t1 = time.perf_counter()
            out = await c.mget(keys)
            t2 = time.perf_counter()
            assert out[0] == value
            return total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9

        async def run_glide(rounds: int) -> list[tuple[float, float]]:
            cfg = glide.GlideClientConfiguration(
                [glide.NodeAddress("127.0.0.1", server.port)], request_timeout=30_000
            )
            c = await glide.GlideClient.create(cfg)
            try:
                return [await glide_round(c) for _ in range(rounds)]
            finally:
                await c.close()

        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.set(k, value)
            pipe.execute()
            t1 = time.perf_counter()
            out = client.mget(keys)
            t2 = time.perf_counter()
            assert out[0] == value
            res["redis-py put"].append(total / (t1 - t0) / 1e9)
            res["redis-py get"].append(total / (t2 - t1) / 1e9)
            ((gp, gg),) = asyncio.run(run_glide(1))
            res["glide put"].append(gp)
            res["glide get"].append(gg)
    _report(res, f"{args.blocks} x 2 MiB, one node")
    return 0


def _report(res: dict[str, list[float]], what: str) -> None:
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"hiredis parser: {redis.utils.HIREDIS_AVAILABLE}; {what}")
    for op in ("put", "get"):
        rp, gl = med[f"redis-py {op}"], med[f"glide {op}"]
        print(f"{op}: redis-py {rp:.2f} GB/s, valkey-glide {gl:.2f} GB/s, ratio {gl / rp:.2f}")


def _cluster(blocks: int, repeats: int, glide: Any) -> int:
    """The cluster comparison: kvtier's ``RemoteStore`` against glide's cluster client, taking
    turns, on the same keys (spread over the cluster's slots) and the same server."""
    from kvtier.storage.remote import RemoteConfig, RemoteStore
    from kvtier.storage.remote_block import remote_key

    size = 2 << 20
    value = os.urandom(size)
    keys = [remote_key("kvtier:v1:clients", h) for h in range(1, blocks + 1)]
    total = blocks * size
    res: dict[str, list[float]] = {"redis-py put": [], "redis-py get": [], "glide put": [],
                                   "glide get": []}  # fmt: skip

    def check(i: int, got: bytes | None) -> None:
        assert got is not None and len(got) == size, (i, None if got is None else len(got))

    with LocalRedisCluster(3, maxmemory_mb=2048) as cluster:

        async def run_glide(rounds: int) -> list[tuple[float, float]]:
            cfg = glide.GlideClusterClientConfiguration(
                [glide.NodeAddress("127.0.0.1", n.port) for n in cluster.nodes],
                request_timeout=30_000,
            )
            c = await glide.GlideClusterClient.create(cfg)
            out: list[tuple[float, float]] = []
            try:
                await c.mset({k: value for k in keys})  # untimed: connections and slot map
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    await c.mset({k: value for k in keys})
                    t1 = time.perf_counter()
                    got = await c.mget(keys)
                    t2 = time.perf_counter()
                    for i, v in enumerate(got):
                        check(i, v)
                    out.append((total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9))
            finally:
                await c.close()
            return out

        config = RemoteConfig(cluster.url, timeout_ms=30_000)
        with RemoteStore(config) as store:
            store.put_each(keys, lambda i: value)  # untimed: connections opened
            store.get_each(keys, check)
            for _ in range(repeats):
                t0 = time.perf_counter()
                store.put_each(keys, lambda i: value)
                t1 = time.perf_counter()
                store.get_each(keys, check)
                t2 = time.perf_counter()
                res["redis-py put"].append(total / (t1 - t0) / 1e9)
                res["redis-py get"].append(total / (t2 - t1) / 1e9)
                ((gp, gg),) = asyncio.run(run_glide(1))
                res["glide put"].append(gp)
                res["glide get"].append(gg)
    _report(res, f"{blocks} x 2 MiB, 3-node cluster, kvtier's RemoteStore vs glide cluster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
