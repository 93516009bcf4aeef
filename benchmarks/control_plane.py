"""Control-plane throughput: hashing, and pool verbs on a pool of 1M blocks.

Run: ``.venv/bin/python benchmarks/control_plane.py`` (``--blocks N`` for another pool size).
Targets (issue 2): 128k tokens in 16-token blocks hashed in < 20 ms; matching an 8192-block prefix
in a 1M-block pool in < 5 ms. Each figure is printed with its ratio to the target and to a
baseline measured in the same run (the naive per-block hashing loop; a bare walk over a plain dict
of the same 1M hashes, i.e. the floor any Python pool pays).
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import time
from collections.abc import Callable

import xxhash

from kvtier.core import BlockPool, ImmutableBlock, TierRegistry
from kvtier.hashing import SequenceHashes, sequence_hashes

BLOCK = 16
CHAIN = 8192  # blocks per prompt: 128k tokens


class Timer:
    """Wall and CPU (this thread) seconds of timed sections.

    On a shared 2-core machine other processes steal the CPU in the middle of a section; the
    thread's CPU time does not count that, so it shows what the code itself costs.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> Timer:
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu.append(time.thread_time() - self._c)
        self.wall.append(time.perf_counter() - self._w)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def __str__(self) -> str:
        med, best, cpu = self.median, min(self.wall), statistics.median(self.cpu)
        return f"{med * 1e3:.2f} ms (best {best * 1e3:.2f}, cpu {cpu * 1e3:.2f})"


def timings(fn: Callable[[], object], reps: int) -> Timer:
    """Times of ``reps`` calls after one warm-up call."""
    fn()
    timer = Timer()
    for _ in range(reps):
        with timer:
            fn()
    return timer


def median_s(fn: Callable[[], object], reps: int) -> float:
    return timings(fn, reps).median


def naive_sequence_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The obvious implementation: pack each block with struct, hash, chain."""
    out: list[int] = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        b = xxhash.xxh3_64(struct.pack(f"<{block_size}I", *tokens[i : i + block_size])).intdigest()
        out.append(b if not out else xxhash.xxh3_64(struct.pack("<QQ", out[-1], b)).intdigest())
    return out


def line(name: str, value: str, target: str = "", ratio: str = "") -> None:
    print(f"{name:<40} {value:>26} {target:>13} {ratio}")


def bench_hashing(rng: random.Random, reps: int) -> None:
    tokens = [rng.randrange(2**32) for _ in range(CHAIN * BLOCK)]
    assert naive_sequence_hashes(tokens, BLOCK) == sequence_hashes(tokens, BLOCK)
    fast_times = timings(lambda: sequence_hashes(tokens, BLOCK), reps)
    fast = fast_times.median
    naive = median_s(lambda: naive_sequence_hashes(tokens, BLOCK), max(3, reps // 4))
    line(
        "sequence_hashes, 128k tokens / 16",
        str(fast_times),
        "target 20 ms",
        f"{0.020 / fast:.1f}x under target; {naive / fast:.1f}x faster than naive "
        f"({naive * 1e3:.1f} ms)",
    )
    line("  tokens hashed per second", f"{len(tokens) / fast / 1e6:.1f} M/s")

    def decode() -> None:
        seq = SequenceHashes(BLOCK)
        for n in range(1, CHAIN * 2 + 1):
            seq.advance(tokens, n)

    d = median_s(decode, max(3, reps // 4))
    line("SequenceHashes.advance (decode)", f"{CHAIN * 2 / d / 1e6:.2f} M tok/s")


def bench_pool(rng: random.Random, num_blocks: int, reps: int) -> None:
    registry = TierRegistry()
    pool = BlockPool(num_blocks, block_size=BLOCK, tier="G2", registry=registry)
    chains: list[list[int]] = []
    t_alloc = t_reg = t_rel = 0.0
    n_chains = num_blocks // CHAIN
    t_fill = time.perf_counter()
    for _ in range(n_chains):
        hashes = [rng.getrandbits(64) for _ in range(CHAIN)]
        chains.append(hashes)
        t0 = time.perf_counter()
        blocks = pool.allocate(CHAIN)
        t1 = time.perf_counter()
        assert blocks is not None
        for b in blocks:
            b.mark_complete()
        t2 = time.perf_counter()
        handles = [
            pool.register(b, h, parent_sequence_hash=p)
            for b, h, p in zip(blocks, hashes, [None, *hashes[:-1]], strict=True)
        ]
        t3 = time.perf_counter()
        for h in reversed(handles):
            h.release()
        t4 = time.perf_counter()
        t_alloc, t_reg, t_rel = t_alloc + t1 - t0, t_reg + t3 - t2, t_rel + t4 - t3
        registry.drain_events()
    fill = time.perf_counter() - t_fill
    n = n_chains * CHAIN
    print(f"pool of {num_blocks:,} blocks: {n_chains} chains of {CHAIN} filled in {fill:.1f} s")
    line("allocate (free slots)", f"{n / t_alloc / 1e6:.2f} M blk/s")
    line("register (new, chained)", f"{n / t_reg / 1e6:.2f} M blk/s")
    line("release (to inactive)", f"{n / t_rel / 1e6:.2f} M blk/s")

    prefix = chains[rng.randrange(n_chains)]

    def match_release() -> list[ImmutableBlock]:
        got = pool.match(prefix)
        assert len(got) == CHAIN
        return got

    times = Timer()
    for _ in range(reps):
        with times:
            got = match_release()
        for h in got:
            h.release()
    match = times.median
    # the floor: the same walk over a plain dict of the same size (1M hashes -> ids)
    index = {h: i for chain in chains for i, h in enumerate(chain)}
    floor = median_s(lambda: [index.get(h) for h in prefix], reps)
    index.clear()
    line(
        "match 8192-block prefix",
        str(times),
        "target 5 ms",
        f"{0.005 / match:.1f}x under target; {match / floor:.1f}x a bare dict walk "
        f"({floor * 1e3:.2f} ms)",
    )
    line("  matched blocks per second", f"{CHAIN / match / 1e6:.2f} M blk/s")
    got = pool.match(prefix)
    t0 = time.perf_counter()
    for h in got:
        h.release()
    line("release 8192 matched handles", f"{(time.perf_counter() - t0) * 1e3:.2f} ms")

    group_times, release_times = Timer(), Timer()
    for _ in range(reps):
        with group_times:
            group = pool.match_group(prefix)
        with release_times:
            group.release()
        assert len(group) == CHAIN
    group_match = group_times.median
    line(
        "match_group 8192-block prefix",
        str(group_times),
        "target 5 ms",
        f"{0.005 / group_match:.1f}x under target; {group_match / floor:.1f}x a bare dict walk",
    )
    line("release the group", str(release_times))

    t0 = time.perf_counter()
    victims = pool.allocate(CHAIN)  # the pool is full: every block comes from eviction
    t_evict = time.perf_counter() - t0
    assert victims is not None and pool.num_free == 0
    line("allocate 8192 by evicting (full pool)", f"{CHAIN / t_evict / 1e6:.2f} M blk/s")
    t0 = time.perf_counter()
    pool.check_invariants()
    line("check_invariants (whole pool)", f"{(time.perf_counter() - t0):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000, help="pool size (blocks)")
    parser.add_argument("--reps", type=int, default=21, help="repetitions per timed figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.blocks < CHAIN:
        parser.error(f"--blocks must be >= {CHAIN}")
    rng = random.Random(args.seed)
    bench_hashing(rng, args.reps)
    bench_pool(rng, args.blocks, args.reps)


if __name__ == "__main__":
    main()
