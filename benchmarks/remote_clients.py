"""Which Redis client for G4: redis-py (hiredis parser) against valkey-glide, 2 MiB values.

Why this exists: the issue asked to measure both and keep the faster. One local redis-server,
``--blocks`` values of 2 MiB, written in one pipeline (redis-py) / one MSET (glide) and read in
one MGET each, interleaved for ``--repeats`` rounds; prints median GB/s and glide / redis-py.
valkey-glide is not a kvtier dependency: ``pip install valkey-glide`` to run this.

Run: ``.venv/bin/python benchmarks/remote_clients.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import redis

from kvtier.ops.redislocal import LocalRedis, redis_available


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
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
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"hiredis parser: {redis.utils.HIREDIS_AVAILABLE}; {args.blocks} x 2 MiB")
    for op in ("put", "get"):
        rp, gl = med[f"redis-py {op}"], med[f"glide {op}"]
        print(f"{op}: redis-py {rp:.2f} GB/s, valkey-glide {gl:.2f} GB/s, ratio {gl / rp:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
