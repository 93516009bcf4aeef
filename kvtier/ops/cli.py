"""The ``kvtier`` command: ``bench``, ``inspect DIR``, ``fsck DIR [--repair]``, ``demo``,
``serve MODEL [vLLM args]``.

Why argparse: it is in the standard library, and every subcommand is a few options; the output is
rendered with rich (tables, progress bars). Each subcommand's work lives elsewhere
(``kvtier.ops.*``, ``kvtier.ops.demo``) so that it can be tested without parsing arguments; this
module only parses, calls, and renders. Exit status: 0 success, 1 the work found a problem (a
benchmark failed, fsck found bad blocks and did not repair them), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from kvtier.ops import bench

    names = args.only or list(bench.BENCHMARKS)
    out_dir = Path(args.out)
    bench_dir = Path(args.bench_dir) if args.bench_dir else bench.default_bench_dir()
    with _progress(console) as progress:
        task = progress.add_task("benchmarks", total=len(names))

        def started(name: str) -> None:
            progress.update(task, description=f"running {name}")

        def done(result: bench.BenchResult) -> None:
            progress.advance(task)
            status = "[green]ok[/]" if result.ok else f"[red]failed ({result.returncode})[/]"
            progress.console.print(f"{result.name}: {status} in {result.seconds:.1f} s")
            if not result.ok:
                progress.console.print(result.output[-2000:], markup=False)

        results = bench.run_benchmarks(names, bench_dir, out_dir, started, done, args.quick)
    table = Table(title="kvtier bench (ratio to the baseline measured in the same run)")
    table.add_column("benchmark")
    table.add_column("figure")
    table.add_column("ratio", justify="right")
    for r in results:
        if not r.figures:
            table.add_row(r.name, "(no ratio reported)" if r.ok else "FAILED", "")
        for f in r.figures:
            table.add_row(r.name, f.name, f"{f.ratio:.3f}")
    console.print(table)
    json_path, png_path = out_dir / "bench.json", out_dir / "bench.png"
    bench.write_json(results, json_path)
    bench.plot(results, png_path)
    console.print(f"wrote {json_path} and {png_path}")
    return 0 if all(r.ok for r in results) else 1


def _cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from kvtier.ops import diskscan

    with _progress(console) as progress:
        task = progress.add_task("reading block headers", total=None)
        report = diskscan.inspect_dir(
            Path(args.dir),
            on_file=lambda done, total: progress.update(task, completed=done, total=total),
        )
    table = Table(title=f"disk tier {args.dir}", show_header=False)
    table.add_row("block files", str(report.blocks))
    table.add_row("bytes on disk", f"{report.file_bytes} ({report.file_bytes / 1e9:.3f} GB)")
    table.add_row("payload bytes", str(report.payload_bytes))
    for fp, count in sorted(report.fingerprints.items()):
        table.add_row("fingerprint", f"{fp:#018x} ({count} blocks)")
    for fp, ident in sorted(report.identities.items()):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(ident.items()) if k != "namespace")
        table.add_row("identity", f"{fp:#018x}: {shown}")
    table.add_row("unreadable headers", str(report.unreadable))
    table.add_row("other files", str(report.other_files))
    table.add_row("writes in progress", str(report.writes_in_progress))
    console.print(table)
    ages = Table(title="age of block files (since last write)")
    ages.add_column("age")
    ages.add_column("blocks", justify="right")
    for label, count in report.age_histogram:
        ages.add_row(label, str(count))
    console.print(ages)
    if args.json:
        Path(args.json).write_text(report.to_json())
        console.print(f"wrote {args.json}")
    return 0


def _cmd_fsck(args: argparse.Namespace, console: Console) -> int:
    from kvtier.ops import diskscan

    with _progress(console) as progress:
        task = progress.add_task("verifying blocks", total=None)
        report = diskscan.fsck_dir(
            Path(args.dir),
            repair=args.repair,
            on_file=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(
        f"checked {report.checked} block files: {report.good} good, {len(report.bad)} bad"
    )
    if report.vanished or report.writes_in_progress:
        console.print(
            f"in use: {report.vanished} blocks deleted by an engine meanwhile, "
            f"{report.writes_in_progress} writes in progress (neither is bad)"
        )
    if report.bad:
        table = Table(title="bad blocks")
        table.add_column("file")
        table.add_column("problem")
        table.add_column("removed")
        for bad in report.bad:
            table.add_row(bad.path, bad.reason, "yes" if bad.removed else "no")
        console.print(table)
    if report.bad and not args.repair:
        console.print("run again with --repair to remove the bad blocks")
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from kvtier.ops import demo

    return demo.run_cli(args, console)


def _cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from kvtier.ops import serve

    before = [x for flag in (*serve.SERVE_FLAGS, serve.CONFIG_FLAG)
              if (v := getattr(args, flag[2:].replace("-", "_"))) is not None
              for x in (flag, v)]  # fmt: skip
    rest = [a for a in args.vllm_args if a != "--print-command"]
    print_only = args.print_command or len(rest) != len(args.vllm_args)
    cmd = serve.serve_command(
        args.model,
        [*before, *rest],
        os.environ,
        vllm_cli=serve.has_vllm_distribution(),
        cpu_build=serve.is_cpu_build(),
    )
    line = " ".join(shlex.quote(a) for a in cmd.argv)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cmd.env.items())
    if print_only:
        print(f"{env} {line}".strip())
        return 0
    console.print(f"kvtier serve: starting {env} {line}".strip(), markup=False, highlight=False)
    sys.stdout.flush()
    serve.exec_server(cmd)
    return 0  # not reached: the server replaced this process


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvtier`` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="kvtier", description="kvtier: tiered KV-cache block manager tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="run the control-plane, tier and transfer benchmarks")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.add_argument("--bench-dir", help="folder holding the benchmark scripts")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes in all)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "inspect", help="what a disk tier holds: model identity, fingerprint, blocks, bytes, ages"
    )
    p.add_argument("dir", help="the disk tier's directory")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("fsck", help="verify every block's header and checksum")
    p.add_argument("dir", help="the disk tier's directory")
    p.add_argument("--repair", action="store_true", help="remove the bad blocks")
    p.set_defaults(func=_cmd_fsck)

    p = sub.add_parser(
        "demo",
        help="users chatting over long shared documents, on vLLM (CPU) with and without kvtier",
        description="Replays users chatting over long shared documents on vLLM's CPU build: "
        "vLLM alone, vLLM + kvtier, and vLLM with a G1 big enough for everything (the "
        "reference for kvtier's outputs). Prints time to first token per turn, where the "
        "prompt tokens came from, the hit rate per tier and the output check; writes "
        "demo.json and demo.png.",
    )
    from kvtier.ops.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server with kvtier configured",
        description="Starts vLLM's OpenAI-compatible server for MODEL with kvtier as its KV "
        "connector; every argument after MODEL goes to vLLM, except kvtier's own options "
        "(--cpu-cache-gb, --disk-cache-gb, --disk-dir, --kvtier-config), which are accepted "
        "anywhere. Other knobs: --kvtier-config JSON or KVTIER_* variables "
        "(docs/configuration.md). Works with vLLM's CPU build (where `vllm serve` does not "
        "start) and with a normal install.",
    )
    p.add_argument("--cpu-cache-gb", metavar="GB", help="G2 host cache size (decimal GB)")
    p.add_argument("--disk-cache-gb", metavar="GB", help="G3 disk cache size (decimal GB)")
    p.add_argument("--disk-dir", metavar="DIR", help="G3 directory")
    p.add_argument("--kvtier-config", metavar="JSON", help="more knobs, as a JSON object")
    p.add_argument("--print-command", action="store_true", help="print the command, run nothing")
    p.add_argument("model", help="the model (name or path), as `vllm serve` takes it")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for vLLM")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvtier`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        status: int = args.func(args, console)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        console.print(f"[red]kvtier {args.command}: {exc}[/]")
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
