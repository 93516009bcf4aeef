"""Measure the candidate ways of moving scattered KV pieces over PCIe, to pick the engine's default.

Run on a GPU machine: ``python benchmarks/transfer_candidates.py``. Candidates, each checked for
exact bytes before it is timed:

- ``naive``: one ``copy_`` per (block, layer, K/V) piece, the way most connectors start;
- ``kernel``: a small-grid Triton kernel reading or writing mapped pinned host memory, one launch
  per layer (grid, tile and warps swept);
- ``staged``: the same kernel gathers into a device staging buffer, then one DMA per host block
  (scattered host rows) or one DMA in all (contiguous host rows); reversed for host -> device;
- ``limit``: one large pinned copy of the same bytes.

Also times chunked ``cudaHostRegister`` pinning of an anonymous mapping (first chunk, per GiB) and
checks that both the kernel and DMA work on memory registered chunk by chunk.
"""

# Closures below are called within the loop iteration that defines them, so late binding of
# loop variables (B023) cannot bite.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from collections.abc import Callable

import torch

LAYERS = 32
TOKENS = 16
HEADS = 8
HEAD_DIM = 128
ELEM = 2  # bf16
CHUNK_BYTES = TOKENS * HEADS * HEAD_DIM * ELEM  # one K or V piece of one (block, layer)
ROW_BYTES = LAYERS * 2 * CHUNK_BYTES


def _stream(priority: int = 0) -> torch.cuda.Stream:
    return torch.cuda.Stream(priority=priority)  # type: ignore[no-untyped-call]


def _event(enable_timing: bool = False) -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=enable_timing)  # type: ignore[no-untyped-call]


def timed(fn: Callable[[], object], stream: torch.cuda.Stream, reps: int) -> float:
    """Median seconds of ``fn`` enqueued on ``stream`` (events around it, after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a = _event(enable_timing=True)
        b = _event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record(stream)
            fn()
            b.record(stream)
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return float(statistics.median(out))


def interference(
    layers: list[torch.Tensor],
    words: list[torch.Tensor],
    staging_w: torch.Tensor,
    host_w: torch.Tensor,
    chunk_w: int,
    row_w: int,
    pool: int,
) -> None:
    """How much a copy slows a bf16 matmul stream: kernel copy (16 programs) vs staged DMA."""
    from kvtier.transfer.cuda.kernels import copy_pieces_kernel

    dev = torch.device("cuda")
    n = 1024
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ids = torch.arange(n, dtype=torch.int64, device=dev)
    comp = _stream()
    copy = _stream()
    host = host_w.view(torch.uint8).view(-1, row_w * 4)

    def mm() -> None:
        with torch.cuda.stream(comp):
            for _ in range(40):
                torch.mm(a, b)

    def pieces(target: torch.Tensor, grid: int) -> None:
        """Every layer's K/V pieces of blocks ``ids`` into rows of ``target`` (int32 words)."""
        for layer in range(LAYERS):
            copy_pieces_kernel[(grid,)](
                words[layer],
                target,
                ids,
                ids,
                n,
                0,
                chunk_w,
                pool * chunk_w,
                layer * 2 * chunk_w,
                row_w,
                chunk_w,
                N_OUTER=2,
                CHUNK=chunk_w,
                TILE=4096,
                num_warps=8,
            )

    def kcopy(grid: int) -> None:
        with torch.cuda.stream(copy):
            pieces(host_w, grid)

    def dcopy() -> None:
        with torch.cuda.stream(copy):
            pieces(staging_w, 132)
            host[:n].copy_(staging_w.view(torch.uint8).view(-1, row_w * 4)[:n], non_blocking=True)

    def run(copier: Callable[[], None] | None) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0 = _event(enable_timing=True)
        e1 = _event(enable_timing=True)
        c0 = _event(enable_timing=True)
        c1 = _event(enable_timing=True)
        e0.record(comp)
        c0.record(copy)
        if copier is not None:
            copier()
        mm()
        e1.record(comp)
        c1.record(copy)
        torch.cuda.synchronize()
        del t0
        return e0.elapsed_time(e1), c0.elapsed_time(c1)

    run(None)
    run(lambda: kcopy(16))
    run(dcopy)
    print("interference (40 matmuls 8192^3 bf16 beside a 2 GiB offload), ms:")
    for name, fn in [
        ("matmul alone", None),
        ("kernel g8", lambda: kcopy(8)),
        ("kernel g16", lambda: kcopy(16)),
        ("kernel g32", lambda: kcopy(32)),
        ("staged DMA", dcopy),
    ]:
        mt, ct = run(fn)
        print(f"  {name:14s} matmuls {mt:7.1f}  copy {ct:7.1f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU present: nothing to measure")
        return 0
    from kvtier.transfer.cuda.kernels import copy_pieces_kernel

    dev = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    import triton

    print("triton", triton.__version__)
    cu = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    max_n = max(args.blocks)
    pool = 2 * max_n
    # Outer-first (FlashAttention) layer tensors [2, pool, 16, 8, 128] bf16.
    g = torch.Generator(device=dev).manual_seed(1)
    layers = [
        torch.randint(
            -(2**15),
            2**15,
            (2, pool, TOKENS, HEADS, HEAD_DIM),
            dtype=torch.int16,
            device=dev,
            generator=g,
        ).view(torch.bfloat16)
        for _ in range(LAYERS)
    ]
    words = [t.view(-1).view(torch.int32) for t in layers]
    chunk_w = CHUNK_BYTES // 4
    row_w = ROW_BYTES // 4
    host = torch.empty((pool, ROW_BYTES), dtype=torch.uint8, pin_memory=True)
    host_w = host.view(-1).view(torch.int32)
    staging = torch.empty((max_n, ROW_BYTES), dtype=torch.uint8, device=dev)
    staging_w = staging.view(-1).view(torch.int32)
    s_out = _stream()
    s_in = _stream(priority=-1)
    results: list[tuple[str, int, str, float]] = []

    def kernel_d2h(
        dst_w: torch.Tensor,
        src_ids: torch.Tensor,
        dst_ids: torch.Tensor,
        grid: int,
        tile: int,
        warps: int,
    ) -> None:
        n = src_ids.numel()
        for layer in range(LAYERS):
            copy_pieces_kernel[(grid,)](
                words[layer],
                dst_w,
                src_ids,
                dst_ids,
                n,
                0,
                chunk_w,
                pool * chunk_w,
                layer * 2 * chunk_w,
                row_w,
                chunk_w,
                N_OUTER=2,
                CHUNK=chunk_w,
                TILE=tile,
                num_warps=warps,
            )

    def kernel_h2d(
        src_w: torch.Tensor,
        src_ids: torch.Tensor,
        dst_ids: torch.Tensor,
        grid: int,
        tile: int,
        warps: int,
    ) -> None:
        n = src_ids.numel()
        for layer in range(LAYERS):
            copy_pieces_kernel[(grid,)](
                src_w,
                words[layer],
                src_ids,
                dst_ids,
                n,
                layer * 2 * chunk_w,
                row_w,
                chunk_w,
                0,
                chunk_w,
                pool * chunk_w,
                N_OUTER=2,
                CHUNK=chunk_w,
                TILE=tile,
                num_warps=warps,
            )

    def expected_rows(dev_ids: list[int]) -> torch.Tensor:
        # [n, LAYERS, 2, piece] from the layer tensors, as host rows.
        per_layer = [t[:, dev_ids].transpose(0, 1) for t in layers]  # [n, 2, ...]
        return torch.stack(per_layer, 1).contiguous().view(len(dev_ids), -1).view(torch.uint8)

    for n in args.blocks:
        nbytes = n * ROW_BYTES
        perm = torch.randperm(pool)
        dev_ids_l = perm[:n].tolist()
        host_ids_l = torch.randperm(pool)[:n].tolist()
        dev_ids = torch.tensor(dev_ids_l, dtype=torch.int64, device=dev)
        host_ids = torch.tensor(host_ids_l, dtype=torch.int64, device=dev)
        contig_ids = torch.arange(n, dtype=torch.int64, device=dev)
        ref = expected_rows(dev_ids_l).cpu()

        # limit
        big_d = staging[:n]
        big_h = host[:n]
        t = timed(lambda: big_h.copy_(big_d, non_blocking=True), s_out, args.reps)
        results.append(("limit", n, "d2h", nbytes / t / 1e9))
        t = timed(lambda: big_d.copy_(big_h, non_blocking=True), s_in, args.reps)
        results.append(("limit", n, "h2d", nbytes / t / 1e9))
        big_d2 = torch.empty_like(big_d)
        host2 = torch.empty((n, ROW_BYTES), dtype=torch.uint8, pin_memory=True)

        def both_limit() -> None:
            e = _event()
            e.record(s_out)
            s_in.wait_event(e)
            host2.copy_(big_d, non_blocking=True)
            with torch.cuda.stream(s_in):
                big_d2.copy_(big_h, non_blocking=True)
            e2 = _event()
            e2.record(s_in)
            s_out.wait_event(e2)

        t = timed(both_limit, s_out, args.reps)
        results.append(("limit", n, "both", 2 * nbytes / t / 1e9))

        # naive
        if n <= 256:

            def naive_d2h() -> None:
                for i, (d, h) in enumerate(zip(dev_ids_l, host_ids_l, strict=True)):
                    del i
                    row = host[h].view(LAYERS, 2, -1)
                    for layer in range(LAYERS):
                        for o in range(2):
                            row[layer, o].copy_(
                                layers[layer][o, d].view(-1).view(torch.uint8), non_blocking=True
                            )

            host.fill_(0)
            with torch.cuda.stream(s_out):
                naive_d2h()
            torch.cuda.synchronize()
            ok = torch.equal(host[host_ids_l], ref)
            t = timed(naive_d2h, s_out, max(2, args.reps // 2))
            results.append(("naive", n, "d2h", nbytes / t / 1e9 if ok else -1.0))

        # kernel, swept
        tgt_l = perm[n : 2 * n].tolist()
        tgt = torch.tensor(tgt_l, dtype=torch.int64, device=dev)
        for grid, tile, warps in [
            (8, 2048, 4),
            (8, 4096, 8),
            (16, 2048, 4),
            (16, 4096, 8),
            (32, 2048, 4),
            (32, 4096, 8),
            (64, 2048, 4),
        ]:
            try:
                name = f"kernel g{grid} t{tile * 4 // 1024}K w{warps}"
                host.fill_(0)
                with torch.cuda.stream(s_out):
                    kernel_d2h(host_w, dev_ids, host_ids, grid, tile, warps)
                torch.cuda.synchronize()
                ok = torch.equal(host[host_ids_l], ref)
                t = timed(
                    lambda: kernel_d2h(host_w, dev_ids, host_ids, grid, tile, warps),
                    s_out,
                    args.reps,
                )
                results.append((name, n, "d2h", nbytes / t / 1e9 if ok else -1.0))
                # h2d: from host rows back into other device blocks, then compare
                for lt in layers:
                    lt[:, tgt_l] = 0
                with torch.cuda.stream(s_in):
                    kernel_h2d(host_w, host_ids, tgt, grid, tile, warps)
                torch.cuda.synchronize()
                ok = torch.equal(expected_rows(tgt_l).cpu(), ref)
                t = timed(
                    lambda: kernel_h2d(host_w, host_ids, tgt, grid, tile, warps), s_in, args.reps
                )
                results.append((name, n, "h2d", nbytes / t / 1e9 if ok else -1.0))

                def both() -> None:
                    e = _event()
                    e.record(s_out)
                    s_in.wait_event(e)
                    kernel_d2h(host_w, dev_ids, host_ids, grid, tile, warps)
                    with torch.cuda.stream(s_in):
                        kernel_h2d(
                            host2.view(-1).view(torch.int32), contig_ids, tgt, grid, tile, warps
                        )
                    e2 = _event()
                    e2.record(s_in)
                    s_out.wait_event(e2)

                t = timed(both, s_out, args.reps)
                results.append((name, n, "both", 2 * nbytes / t / 1e9))
            except Exception as exc:  # report and go on
                print(f"kernel g{grid} t{tile} w{warps} failed: {exc!r}")

        # staged: gather on device then DMA per host row (scattered) or one DMA (contiguous)
        def staged_d2h(scattered: bool) -> None:
            kernel_d2h(staging_w, dev_ids, contig_ids, 132, 4096, 8)
            if scattered:
                for j, h in enumerate(host_ids_l):
                    host[h].copy_(staging[j], non_blocking=True)
            else:
                host2.copy_(staging[:n], non_blocking=True)

        host.fill_(0)
        with torch.cuda.stream(s_out):
            staged_d2h(True)
        torch.cuda.synchronize()
        ok = torch.equal(host[host_ids_l], ref)
        t = timed(lambda: staged_d2h(True), s_out, args.reps)
        results.append(("staged scattered", n, "d2h", nbytes / t / 1e9 if ok else -1.0))
        t = timed(lambda: staged_d2h(False), s_out, args.reps)
        results.append(("staged contiguous", n, "d2h", nbytes / t / 1e9))

        def staged_h2d(scattered: bool) -> None:
            if scattered:
                for j, h in enumerate(host_ids_l):
                    staging[j].copy_(host[h], non_blocking=True)
            else:
                staging[:n].copy_(host2, non_blocking=True)
            kernel_h2d(staging_w, contig_ids, tgt, 132, 4096, 8)

        for lt in layers:
            lt[:, tgt_l] = 0
        with torch.cuda.stream(s_in):
            staged_h2d(True)
        torch.cuda.synchronize()
        ok = torch.equal(expected_rows(tgt_l).cpu(), ref)
        t = timed(lambda: staged_h2d(True), s_in, args.reps)
        results.append(("staged scattered", n, "h2d", nbytes / t / 1e9 if ok else -1.0))
        t = timed(lambda: staged_h2d(False), s_in, args.reps)
        results.append(("staged contiguous", n, "h2d", nbytes / t / 1e9))

    print(f"\n{'candidate':28s} {'blocks':>6s} {'dir':>5s} {'GB/s':>7s}")
    for name, n, d, gbs in results:
        print(f"{name:28s} {n:6d} {d:>5s} {gbs:7.1f}")

    # chunked registration of an anonymous mapping
    total = 4 << 30
    chunk = 256 << 20
    mm = mmap.mmap(-1, total)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    t0 = time.perf_counter()
    first = None
    for off in range(0, total, chunk):
        rc = cu.cudaHostRegister(buf.data_ptr() + off, chunk, 0)
        if int(rc) != 0:
            print("cudaHostRegister failed", rc)
            return 1
        if first is None:
            first = time.perf_counter() - t0
    took = time.perf_counter() - t0
    print(f"register 4 GiB in 256 MiB chunks: first chunk {first:.3f} s, {took / 4:.3f} s/GiB")
    lo_row = chunk - 32 * ROW_BYTES  # 64 rows straddling the first two registrations
    reg_rows = buf[lo_row : lo_row + 64 * ROW_BYTES].view(64, ROW_BYTES)
    reg_w = reg_rows.view(-1).view(torch.int32)
    ids64 = torch.tensor(perm[:64].tolist(), dtype=torch.int64, device=dev)
    ar = torch.arange(64, dtype=torch.int64, device=dev)
    kernel_d2h(reg_w, ids64, ar, 16, 4096, 8)
    torch.cuda.synchronize()
    ref64 = expected_rows(perm[:64].tolist()).cpu()
    print("kernel into rows across two registrations exact:", torch.equal(reg_rows, ref64))
    # DMA straddling a chunk boundary
    lo = chunk - ROW_BYTES
    span = buf[lo : lo + 2 * ROW_BYTES]
    src = staging[:2].reshape(-1)
    try:
        span.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        print("DMA straddling two registrations exact:", torch.equal(span, src.cpu()))
    except Exception as exc:  # a finding to report
        print("DMA straddling two registrations fails:", repr(exc)[:80])
    print("pinned?", span.is_pinned())
    try:
        from cuda.bindings import driver as cud
        from cuda.bindings import runtime as cur

        attr = cur.cudaDeviceAttr.cudaDevAttrCanUseHostPointerForRegisteredMem
        print("canUseHostPointerForRegisteredMem:", cur.cudaDeviceGetAttribute(attr, 0))
        p = buf.data_ptr() + chunk + 4096
        r = cud.cuPointerGetAttribute(
            cud.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_POINTER, p
        )
        print("device pointer == host pointer:", r, int(r[1]) == p)
        print("has cuMemcpyBatchAsync:", hasattr(cud, "cuMemcpyBatchAsync"))
    except Exception as exc:  # environment report only
        print("cuda-bindings check failed:", repr(exc))
    interference(layers, words, staging_w, host_w, chunk_w, row_w, pool)
    for off in range(0, total, chunk):
        cu.cudaHostUnregister(buf.data_ptr() + off)

    return 0


if __name__ == "__main__":
    sys.exit(main())
