"""``kvtier bench``: runs scripts, collects ratios (text or --json), table, JSON file, PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.ops.bench import Figure, parse_figures, run_benchmarks

TEXT_SCRIPT = """
import sys
print("hashing 8192 blocks: 41.0 MB/s")
print("match 8192-block prefix: 1.2 ms   ratio 4.17 (target 5 ms)")
print("register/release ratio: 1.5")
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
    assert parse_figures(TEXT_SCRIPT.replace('print("', "").replace('")', "")) == (
        Figure("match 8192-block prefix: 1.2 ms", 4.17),
        Figure("register/release", 1.5),
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
    )
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
    assert main(["bench", "--bench-dir", str(bench_dir), "--out", str(out), "--only", "tiers"]) == 0
    assert [r["name"] for r in json.loads((out / "bench.json").read_text())["results"]] == ["tiers"]
