"""``kvtier bench``: run the project's benchmark scripts and gather their figures.

Why subprocesses: each benchmark is a standalone script under ``benchmarks/`` (one command each,
printing ratios against a baseline measured in the same run). Running them in fresh interpreters
keeps one benchmark's allocations, threads and CUDA state from skewing the next, and lets the CLI
show progress and keep going when one fails.

A figure is any output line of the form ``<label> ... ratio <number>`` (case-insensitive, ``=``
or ``:`` allowed); when a script accepts ``--json PATH`` it may instead write a JSON list of
``{"name": str, "ratio": float}`` objects there, which is preferred.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCHMARKS: tuple[str, ...] = ("control_plane", "tiers", "transfer")
"""Benchmark scripts ``benchmarks/<name>.py``, in the order ``kvtier bench`` runs them."""

QUICK_ARGS: dict[str, tuple[str, ...]] = {
    "control_plane": ("--blocks", "100000", "--reps", "5"),
    "tiers": ("--blocks", "32", "--repeats", "1"),
    "transfer": ("--quick",),
}
"""Smaller sizes for ``kvtier bench --quick`` (each option passed only if the script accepts it)."""

_INLINE = re.compile(r"\bratio\b\s*[:=]?\s*(?P<value>-?\d+(?:\.\d+)?)", re.I)
_TIMES = re.compile(r"(?P<value>\d+(?:\.\d+)?)x\s+(?P<what>[a-z][a-z ]*[a-z])")
_WORD = re.compile(r"\bratio\b|\b[\w-]+/limit\b", re.I)
_DECIMAL = re.compile(r"-?\d+\.\d+x?")
_TOKEN = re.compile(r"\S+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?x?")
MIN_LIMIT_GBS = 1.0
"""A ``limit`` column value below this many GB/s (0.0-0.1 on a CPU-only machine, where there is
no link to measure and the "limit" copy is timer noise) makes that row's ``.../limit`` ratios
meaningless (46x, 144x); they are left out. Every real copy path is faster than 1 GB/s."""


@dataclass(frozen=True)
class Figure:
    """One named ratio a benchmark reported (kvtier against the baseline of the same run)."""

    name: str
    ratio: float


@dataclass(frozen=True)
class BenchResult:
    """What one benchmark script did: exit status, time taken, figures, and its full output."""

    name: str
    script: str
    returncode: int
    seconds: float
    figures: tuple[Figure, ...] = field(default_factory=tuple)
    output: str = ""

    @property
    def ok(self) -> bool:
        """True when the script exited with status 0."""
        return self.returncode == 0


def default_bench_dir() -> Path:
    """``benchmarks/`` of the source checkout this package was installed from."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def _first_column(line: str) -> str:
    return re.split(r"\s{2,}", line.strip())[0].strip(" :=,")


def _row_name(line: str) -> str:
    """A table row's label: its words before the first decimal number."""
    words: list[str] = []
    for tok in line.split():
        if _DECIMAL.fullmatch(tok):
            break
        words.append(tok)
    return " ".join(words)


def parse_figures(output: str) -> tuple[Figure, ...]:
    """The ratios a benchmark printed, in order. Three forms are read:

    - inline: ``<label> ... ratio 0.93`` (``=`` or ``:`` allowed);
    - a table whose header has a ``ratio`` (or ``.../limit``) column: each row's value under
      that header, named by the row's words before its first decimal number (a blank line ends
      the table);
    - ``<label>  ...  4.2x under target; 12.3x faster than naive``: one figure per ``Nx <words>``
      (``0.8x under target`` is a missed target and is named so).

    In a table whose ``.../limit`` column follows a ``limit`` column, rows whose limit is below
    ``MIN_LIMIT_GBS`` (no GPU: nothing measured to compare with) give no figure.
    """
    figures: list[Figure] = []
    column: tuple[int, int] | None = None
    after_limit = False  # the ratio column follows a "limit" column (GB/s of the baseline)
    for line in output.splitlines():
        if not line.strip():
            column = None
            continue
        inline = _INLINE.search(line)
        if inline:
            label = line[: inline.start()].strip(" :=,(")
            figures.append(Figure(label or _first_column(line), float(inline.group("value"))))
            continue
        times = list(_TIMES.finditer(line))
        if times:
            for m in times:
                value = float(m.group("value"))
                what = m.group("what")
                if what == "under target" and value < 1:
                    what = "missed target"  # target / measured below 1: the target was missed
                figures.append(Figure(f"{_first_column(line)}: {what}", value))
            continue
        header = _WORD.search(line)
        if header:
            column = (header.start(), header.end())
            words = line[: header.start()].split()
            after_limit = "/limit" in header.group() and bool(words) and words[-1] == "limit"
            continue
        if column is not None:
            numbers = [t for t in _TOKEN.finditer(line) if _NUMBER.fullmatch(t.group())]
            at = next(
                (i for i, t in enumerate(numbers) if t.start() < column[1] and t.end() > column[0]),
                None,
            )
            if at is None:
                continue
            if after_limit and (at == 0 or _value(numbers[at - 1].group()) < MIN_LIMIT_GBS):
                continue  # no transfer limit measured (CPU): a ratio to ~0 GB/s means nothing
            figures.append(Figure(_row_name(line), _value(numbers[at].group())))
    return tuple(dict.fromkeys(figures))  # a line printed twice (log and summary) counts once


def _value(token: str) -> float:
    return float(token.rstrip("x"))


def _figures_from_json(path: Path) -> tuple[Figure, ...] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{name, ratio}} objects")
    return tuple(Figure(str(item["name"]), float(item["ratio"])) for item in data)


def run_benchmark(
    name: str,
    bench_dir: Path,
    work_dir: Path,
    extra_args: Sequence[str] = (),
    timeout_s: float = 1800,
) -> BenchResult:
    """Run ``benchmarks/<name>.py`` to completion and collect what it reported."""
    script = bench_dir / f"{name}.py"
    if not script.is_file():
        return BenchResult(name, str(script), 127, 0.0, (), f"benchmark script not found: {script}")
    json_path = work_dir / f"{name}.figures.json"
    json_path.unlink(missing_ok=True)
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    args = [sys.executable, str(script)]
    i = 0
    while i < len(extra_args):  # "--opt value" pairs and lone flags the script accepts
        opt = extra_args[i]
        takes_value = i + 1 < len(extra_args) and not extra_args[i + 1].startswith("--")
        if opt in help_text:
            args += extra_args[i : i + 2] if takes_value else [opt]
        i += 2 if takes_value else 1
    if "--json" in help_text:
        args += ["--json", str(json_path)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        code, output = 124, out + f"\ntimed out after {timeout_s:g} s"
    seconds = time.perf_counter() - start
    figures = _figures_from_json(json_path) or parse_figures(output)
    return BenchResult(name, str(script), code, seconds, figures, output)


def run_benchmarks(
    names: Sequence[str],
    bench_dir: Path,
    work_dir: Path,
    on_start: Callable[[str], None] = lambda _: None,
    on_done: Callable[[BenchResult], None] = lambda _: None,
    quick: bool = False,
) -> list[BenchResult]:
    """Run each named benchmark in turn (unknown names are refused before anything runs)."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        on_start(name)
        result = run_benchmark(name, bench_dir, work_dir, QUICK_ARGS.get(name, ()) if quick else ())
        on_done(result)
        results.append(result)
    return results


def write_json(results: Sequence[BenchResult], path: Path) -> None:
    """All results (figures and full outputs) as one JSON document."""
    doc = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": []}
    for r in results:
        item = asdict(r)
        item["figures"] = [asdict(f) for f in r.figures]
        doc["results"].append(item)  # type: ignore[attr-defined]
    path.write_text(json.dumps(doc, indent=2))


def plot(results: Sequence[BenchResult], path: Path) -> None:
    """A horizontal bar chart of every figure (ratio against its same-run baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{r.name}: {f.name}", f.ratio) for r in results for f in r.figures]
    height = max(2.5, 0.35 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(10, height))
    if rows:
        labels, values = zip(*rows, strict=True)
        ax.barh(range(len(rows)), values, color="#3b7dd8")
        ax.set_yticks(range(len(rows)), labels=[lbl[:70] for lbl in labels], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")  # 0.9 and 40x on one axis: neither bar flattens the other
        ax.set_xlabel("ratio to the baseline measured in the same run")
    else:
        ax.text(0.5, 0.5, "no figures reported", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("kvtier bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
