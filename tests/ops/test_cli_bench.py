"""``kvtier bench``: runs scripts, collects ratios (text or --json), table, JSON file, PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.ops.bench import Figure, parse_figures, run_benchmarks
from kvtier.ops.cli import main

# Scripts written into a temporary benchmarks/ folder: the three output forms the real benchmark
# scripts use (inline "ratio N", a table with a ratio column, "Nx <words>"), a --json script, and
# a failing one.
TEXT_SCRIPT = """
import argparse
p = argparse.ArgumentParser()
p.add_argument("--blocks", type=int, default=1000)
p.add_argument("--reps", type=int, default=9)
a = p.parse_args()
print(f"blocks {a.blocks} reps {a.reps}")
print("hashing 8192 blocks: 41.0 MB/s")
print("match 8192-block prefix: 1.2 ms   ratio 4.17 (target 5 ms)")
print("register/release ratio: 1.5")
print("")
print(f"{'path':<20} {'GB/s':>6} {'ratio':>6}  baseline")
print(f"{'host->disk':<20} {1.23:>6.2f} {0.94:>6.2f}  raw O_DIRECT")
print(f"{'disk->host':<20} {1.42:>6.2f} {1.05:>6.2f}  raw O_DIRECT")
print("")
print(f"{'sequence_hashes':<40} {'1.0 ms':>26} {'target':>13} 20.5x under target; 3.1x faster")
"""

JSON_SCRIPT = """
import argparse, json
p = argparse.ArgumentParser()
p.add_argument("--json")
a = p.parse_args()
print("host->disk 2.0 GB/s ratio 0.91")  # ignored: the JSON file is preferred
json.dump([{"name": "host->disk vs raw O_DIRECT", "ratio": 0.87}], open(a.json, "w"))
"""

FAILING_SCRIPT = """
import sys
print("no GPU: transfer measurement failed", file=sys.stderr)
sys.exit(3)
"""


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "control_plane.py").write_text(TEXT_SCRIPT)
    (d / "tiers.py").write_text(JSON_SCRIPT)
    (d / "transfer.py").write_text(FAILING_SCRIPT)
    return d


def test_parse_figures() -> None:
    text = "a: 1.2 ms ratio 4.17\nx ratio: 1.5\n\nname   ratio\nrow one   0.93\nrow two   bad\n"
    text += "\nshape  n dir   kvtier  limit kvtier/limit\n8B   16 d2h  4.1   46.9   0.09\n"
    text += "a: 1.2 ms ratio 4.17\nratio nan, exact True\n"  # repeated, and not a number
    assert parse_figures(text) == (
        Figure("a: 1.2 ms", 4.17),
        Figure("x", 1.5),
        Figure("row one", 0.93),
        Figure("8B 16 d2h", 0.09),
    )


def test_run_benchmarks_collects_figures_and_failures(bench_dir: Path, tmp_path: Path) -> None:
    started: list[str] = []
    results = run_benchmarks(
        ["control_plane", "tiers", "transfer"], bench_dir, tmp_path / "out", started.append
    )
    assert started == ["control_plane", "tiers", "transfer"]
    assert [r.returncode for r in results] == [0, 0, 3]
    assert results[0].figures == (
        Figure("match 8192-block prefix: 1.2 ms", 4.17),
        Figure("register/release", 1.5),
        Figure("host->disk", 0.94),
        Figure("disk->host", 1.05),
        Figure("sequence_hashes: under target", 20.5),
        Figure("sequence_hashes: faster", 3.1),
    )
    assert "blocks 1000 reps 9" in results[0].output
    assert results[1].figures == (Figure("host->disk vs raw O_DIRECT", 0.87),)
    assert "transfer measurement failed" in results[2].output
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmarks(["nope"], bench_dir, tmp_path / "out")


def test_cli_bench_writes_table_json_and_png(
    bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["bench", "--bench-dir", str(bench_dir), "--out", str(out)])
    assert code == 1  # one benchmark failed
    text = capsys.readouterr().out
    assert "4.170" in text and "0.870" in text and "FAILED" in text
    doc = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in doc["results"]] == ["control_plane", "tiers", "transfer"]
    assert doc["results"][1]["figures"] == [{"name": "host->disk vs raw O_DIRECT", "ratio": 0.87}]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = ["bench", "--bench-dir", str(bench_dir), "--out", str(out)]
    assert main([*args, "--only", "control_plane", "--quick"]) == 0
    (only,) = json.loads((out / "bench.json").read_text())["results"]
    assert only["name"] == "control_plane" and "blocks 100000 reps 5" in only["output"]


def test_cli_bench_runs_the_real_control_plane_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--only", "control_plane", "--quick", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    names = [f["name"] for f in result["figures"]]
    # Met or missed (this machine is shared), and named for which.
    assert {
        "match 8192-block prefix: under target",
        "match 8192-block prefix: missed target",
    } & set(names)
    assert all(f["ratio"] < 1 for f in result["figures"] if f["name"].endswith("missed target"))
    assert all(f["ratio"] >= 1 for f in result["figures"] if f["name"].endswith("under target"))
    assert all(f["ratio"] > 0 for f in result["figures"])
    assert "pool of 100,000 blocks" in result["output"]


CPU_TRANSFER_TABLE = """
shape  blocks dir        kvtier kvtier-c    naive    limit kvtier/limit kvtier-c/limit
8B-tiny     16 d2h           2.3      1.2      0.2      0.0        99.00          51.03
8B-tiny     64 h2d           0.6      0.9      0.2      0.1         5.32           8.10
8B        1024 d2h          49.8     50.1      4.6     55.3         0.90           0.91
"""


def test_rows_without_a_measured_limit_give_no_limit_ratio() -> None:
    """On CPU the "limit" is 0.0 GB/s; its 99x ratio must not flatten the real ones."""
    assert parse_figures(CPU_TRANSFER_TABLE) == (Figure("8B 1024 d2h", 0.90),)


def test_a_missed_target_is_called_missed() -> None:
    text = "match 8192-block prefix   6.0 ms   target 5 ms   0.8x under target; 9.9x a dict walk\n"
    text += "sequence_hashes   4.2 ms   target 20 ms   4.7x under target\n"
    assert parse_figures(text) == (
        Figure("match 8192-block prefix: missed target", 0.8),
        Figure("match 8192-block prefix: a dict walk", 9.9),
        Figure("sequence_hashes: under target", 4.7),
    )
