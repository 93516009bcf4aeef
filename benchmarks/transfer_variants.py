"""Engine variants on 8B-shaped blocks: DMA streams, host row order, mode; one and two directions.

Run on a GPU machine: ``python benchmarks/transfer_variants.py``. For each ``CudaCopyConfig``
variant and each host-row order (scattered: a random permutation of the pool, as a fragmented
G2 pool hands them out; contiguous: consecutive rows), it prints device->host, host->device and
both-at-once GB/s with the one-large-copy limit measured in the same run, and the CPU time of one
submit call. Every transfer is checked byte for byte once. Used to pick the engine's defaults.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer import SHAPES, Bench

from kvtier.transfer.cuda import CudaCopyConfig, CudaCopyEngine

GB = 1e9


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU present: nothing to measure")
        return 0
    model = SHAPES["8B"]
    pool, reps = 4096, 5
    variants = {
        "copy s1": CudaCopyConfig(dma_streams=1, dma_batch=False),
        "copy s2": CudaCopyConfig(dma_streams=2, dma_batch=False),
        "batch s1": CudaCopyConfig(dma_streams=1, dma_batch=True),
        "batch s2": CudaCopyConfig(dma_streams=2, dma_batch=True),
        "kernel g16": CudaCopyConfig(mode="kernel", kernel_programs=16),
    }
    engine = CudaCopyEngine()
    engine.start()
    b = Bench(model, pool, engine, True)
    gen = torch.Generator().manual_seed(5)
    lines = []
    for n in (256, 1024):
        nbytes = n * b.bb
        dids = torch.randperm(pool, generator=gen)[:n].tolist()
        in_d = torch.randperm(pool, generator=gen)[:n].tolist()
        orders = {
            "scattered": torch.randperm(pool, generator=gen)[: 2 * n].tolist(),
            "contiguous": list(range(2 * n)),
        }
        scratch = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        lim = b.timed(b.limit(True, n, scratch), reps)
        lines.append(f"n={n}: one large copy {nbytes / lim / GB:.1f} GB/s")
        for vname, cfg in variants.items():
            eng = CudaCopyEngine(cfg)
            eng.start()
            b.engine = eng
            for oname, rows in orders.items():
                out_h, in_h = rows[:n], rows[n:]
                td = b.timed(b.kvtier(True, dids, out_h), reps)
                ok = b.check_host(dids, out_h)
                th = b.timed(b.kvtier(False, in_d, in_h), reps)
                t0 = time.perf_counter()
                h = eng.device_to_host(b.dev, b.host, dids, out_h)
                submit_ms = (time.perf_counter() - t0) * 1e3
                h.wait(60)

                def both(
                    out_h: list[int] = out_h,
                    in_h: list[int] = in_h,
                    eng: CudaCopyEngine = eng,
                    dids: list[int] = dids,
                    in_d: list[int] = in_d,
                ) -> None:
                    def off() -> None:
                        assert eng.device_to_host(b.dev, b.host, dids, out_h).wait(60) is None

                    t = threading.Thread(target=off)
                    t.start()
                    assert eng.host_to_device(b.host, b.dev, in_h, in_d).wait(60) is None
                    t.join()

                tb = statistics.median([b.timed(both, 1) for _ in range(reps)])
                lines.append(
                    f"n={n:5d} {vname:12s} {oname:10s} d2h {nbytes / td / GB:5.1f} "
                    f"h2d {nbytes / th / GB:5.1f} both {2 * nbytes / tb / GB:5.1f} GB/s, "
                    f"submit {submit_ms:5.2f} ms, exact {ok}, batched {eng.uses_batch_copies} "
                    f"{eng.batch_error or ''}"
                )
                print(lines[-1], flush=True)
            eng.close()
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
