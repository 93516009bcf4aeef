"""The report of ``kvtier demo``: figures, the printed table, ``demo.json`` and ``demo.png``.

Why apart from :mod:`kvtier.ops.demo`: that module runs engines; this one only turns measured
requests into figures, so it can be read (and tested) without starting vLLM.

Where prompt tokens came from, per run: G1 (vLLM's own prefix cache), G2 and G3 (kvtier's
matched tokens, read from its Prometheus endpoint) and recomputed. kvtier's hit rate per tier is
its own ``kvtier_matched_tokens_total / kvtier_lookup_tokens_total``; vLLM's own count of the
same thing (``vllm:external_prefix_cache_hits / queries``) is reported beside it.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.ops.demo import MODES, DemoConfig, RunResult

if TYPE_CHECKING:
    from rich.console import Console

SOURCES: tuple[str, ...] = ("G1", "G2", "G3", "recomputed")
"""Where a prompt token's KV came from."""
LABELS: dict[str, str] = {
    "baseline": "vLLM alone",
    "kvtier": "vLLM + kvtier",
    "reference": "ideal: vLLM, G1 holds all",
}


def scrape(port: int) -> dict[str, float]:
    """kvtier's samples from its metrics endpoint on localhost, by ``name{labels}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith("kvtier_") or s.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


@dataclass(frozen=True)
class Summary:
    """The demo's figures, as printed and written to ``demo.json``."""

    config: dict[str, Any]
    ttft_per_turn_ms: dict[str, list[float]]
    ttft_overall_ms: dict[str, float]
    speedup_per_turn: list[float]
    speedup_overall: float
    recomputed_tokens: dict[str, int]
    prompt_tokens: int
    tokens_by_source: dict[str, dict[str, int]]
    hit_rate: dict[str, float]
    vllm_external_hit_rate: float
    identical_outputs: int
    identical_to_reference: int
    requests: int
    engine_start_s: dict[str, float]
    per_request: list[dict[str, Any]]


def _sources(run: RunResult, metrics: dict[str, float]) -> dict[str, int]:
    cached = sum(t.cached_tokens for t in run.turns)
    g2 = int(metrics.get("kvtier_matched_tokens_total{tier=host}", 0.0))
    g3 = int(metrics.get("kvtier_matched_tokens_total{tier=disk}", 0.0))
    total = sum(t.prompt_tokens for t in run.turns)
    return {"G1": cached - g2 - g3, "G2": g2, "G3": g3, "recomputed": total - cached}


def _mean_ms(values: list[float]) -> float:
    return 1000 * sum(values) / len(values) if values else 0.0


def summarize(cfg: DemoConfig, runs: dict[str, RunResult]) -> Summary:
    """Per-turn and overall mean TTFT, speed-ups, token sources, hit rates, output checks."""
    per_turn = {
        mode: [_mean_ms([t.ttft_s for t in r.turns if t.turn == k]) for k in range(cfg.turns)]
        for mode, r in runs.items()
    }
    overall = {mode: _mean_ms([t.ttft_s for t in r.turns]) for mode, r in runs.items()}
    m = runs["kvtier"].kvtier_metrics
    looked = m.get("kvtier_lookup_tokens_total", 0.0)
    hit = {
        tier: m.get(f"kvtier_matched_tokens_total{{tier={tier}}}", 0.0) / looked if looked else 0.0
        for tier in ("host", "disk")
    }
    queries = m.get("vllm:external_prefix_cache_queries", 0.0)
    vllm_rate = m.get("vllm:external_prefix_cache_hits", 0.0) / queries if queries else 0.0
    sources = {mode: _sources(r, r.kvtier_metrics) for mode, r in runs.items()}
    triples = list(
        zip(runs["baseline"].turns, runs["kvtier"].turns, runs["reference"].turns, strict=True)
    )
    rows = [
        {
            "user": a.user,
            "turn": a.turn,
            "prompt_tokens": a.prompt_tokens,
            "cached_tokens": {m: t.cached_tokens for m, t in zip(MODES, (a, b, c), strict=True)},
            "ttft_ms": {
                m: round(1000 * t.ttft_s, 1) for m, t in zip(MODES, (a, b, c), strict=True)
            },
            "kvtier_output_equals": {
                "baseline": a.output == b.output,
                "reference": b.output == c.output,
            },
        }
        for a, b, c in triples
    ]
    base, kvt = per_turn["baseline"], per_turn["kvtier"]
    return Summary(
        config=asdict(cfg),
        ttft_per_turn_ms=per_turn,
        ttft_overall_ms=overall,
        speedup_per_turn=[b / k if k else 0.0 for b, k in zip(base, kvt, strict=True)],
        speedup_overall=overall["baseline"] / overall["kvtier"] if overall["kvtier"] else 0.0,
        recomputed_tokens={mode: r.recomputed_tokens for mode, r in runs.items()},
        prompt_tokens=sum(t.prompt_tokens for t in runs["baseline"].turns),
        tokens_by_source=sources,
        hit_rate=hit,
        vllm_external_hit_rate=vllm_rate,
        identical_outputs=sum(a.output == b.output for a, b, _ in triples),
        identical_to_reference=sum(b.output == c.output for _, b, c in triples),
        requests=len(triples),
        engine_start_s={mode: r.engine_start_s for mode, r in runs.items()},
        per_request=rows,
    )


def report(cfg: DemoConfig, runs: dict[str, RunResult], out_dir: Path, console: Console) -> Summary:
    """Print the table and the checks; write ``demo.json`` and ``demo.png`` to ``out_dir``."""
    from rich.table import Table

    s = summarize(cfg, runs)
    table = Table(title="time to first token (mean per turn, ms)")
    for name in ("turn", "vLLM alone", "vLLM + kvtier", "speed-up", "ideal (G1 holds all)"):
        table.add_column(name, justify="right")
    labels = [*[str(k + 1) for k in range(cfg.turns)], "overall"]
    base, kvt, ref = ([*s.ttft_per_turn_ms[m], s.ttft_overall_ms[m]] for m in MODES)
    speedups = [*s.speedup_per_turn, s.speedup_overall]
    for label, b, k, x, r in zip(labels, base, kvt, speedups, ref, strict=True):
        table.add_row(label, f"{b:.0f}", f"{k:.0f}", f"{x:.2f}x", f"{r:.0f}")
    console.print(table)
    src = s.tokens_by_source
    console.print(
        f"prompt tokens ({s.prompt_tokens}): vLLM alone recomputed {src['baseline']['recomputed']}"
        f" (G1 served {src['baseline']['G1']}); with kvtier recomputed "
        f"{src['kvtier']['recomputed']} (G1 {src['kvtier']['G1']}, G2 host {src['kvtier']['G2']},"
        f" G3 disk {src['kvtier']['G3']}); ideal recomputed {src['reference']['recomputed']}"
    )
    console.print(
        f"kvtier hit rate (of the tokens looked up beyond G1): G2 host {s.hit_rate['host']:.1%}, "
        f"G3 disk {s.hit_rate['disk']:.1%}; vLLM's own external hit rate "
        f"{s.vllm_external_hit_rate:.1%}"
    )
    console.print(
        f"greedy outputs of vLLM + kvtier identical to the ideal run (same KV reused): "
        f"{s.identical_to_reference}/{s.requests}; to vLLM alone (recomputing): "
        f"{s.identical_outputs}/{s.requests}"
    )
    (out_dir / "demo.json").write_text(json.dumps(asdict(s), indent=2))
    plot(cfg, runs, s, out_dir / "demo.png")
    console.print(f"wrote {out_dir / 'demo.json'} and {out_dir / 'demo.png'}")
    return s


def plot(cfg: DemoConfig, runs: dict[str, RunResult], s: Summary, path: Path) -> None:
    """TTFT of every request, mean TTFT per turn, and where the prompt tokens came from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"baseline": "#c0504d", "kvtier": "#3b7dd8", "reference": "#999999"}
    for mode, r in runs.items():
        style = {"color": colors[mode], "label": LABELS[mode], "marker": "o"}
        style["linestyle"] = "--" if mode == "reference" else "-"
        left.plot(range(1, len(r.turns) + 1), [1000 * t.ttft_s for t in r.turns], **style)
        mid.plot(range(1, cfg.turns + 1), s.ttft_per_turn_ms[mode], **style)
    for k, x in enumerate(s.speedup_per_turn):
        mid.annotate(f"{x:.1f}x", (k + 1, s.ttft_per_turn_ms["kvtier"][k]), xytext=(4, 6),
                     textcoords="offset points", color=colors["kvtier"])  # fmt: skip
    left.set_xlabel("request (turn by turn, users round-robin)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("time to first token (ms)")
    left.set_title("every request")
    mid.set_xlabel("turn")
    mid.set_ylabel("mean time to first token (ms)")
    mid.set_title(f"mean per turn (overall {s.speedup_overall:.2f}x faster with kvtier)")
    mid.set_xticks(range(1, cfg.turns + 1))
    for ax in (left, mid):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    shades = {"G1": "#7f7f7f", "G2": "#3b7dd8", "G3": "#8cb4ec", "recomputed": "#c0504d"}
    names = {"G1": "G1 (vLLM prefix cache)", "G2": "G2 host", "G3": "G3 disk"}
    rows = list(reversed(MODES))
    lefts = [0.0] * len(rows)
    for source in SOURCES:
        share = [100 * s.tokens_by_source[m][source] / s.prompt_tokens for m in rows]
        right.barh([LABELS[m] for m in rows], share, left=lefts, color=shades[source],
                   label=names.get(source, source))  # fmt: skip
        lefts = [a + b for a, b in zip(lefts, share, strict=True)]
    right.set_xlabel("% of prompt tokens")
    right.set_xlim(0, 100)
    right.set_title(
        f"where the KV came from (kvtier hit rate: G2 {s.hit_rate['host']:.0%}, "
        f"G3 {s.hit_rate['disk']:.0%})"
    )
    right.legend(loc="lower center", bbox_to_anchor=(0.5, -0.38), ncol=4, fontsize="small")
    fig.suptitle(
        f"vLLM CPU, tiny Llama: {cfg.users} users over {cfg.docs} shared "
        f"{cfg.doc_tokens}-token documents, {cfg.turns} questions each; G1 {cfg.g1_blocks} "
        f"blocks, kvtier G2 {cfg.host_blocks} + G3 {cfg.disk_blocks} blocks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
