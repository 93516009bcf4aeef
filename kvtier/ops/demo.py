"""``kvtier demo`` (``make demo``): a multi-turn chat on vLLM's CPU build, with and without kvtier.

Why this workload: it is where a KV tier pays off. Several users chat in turns; every prompt is a
long shared system prompt, the user's whole history, and a new message. The engine's own KV pool
(G1) is made deliberately small, so by the time a user comes back their history was evicted from
G1: without kvtier it is recomputed; with kvtier it comes back from G2 (host) or G3 (disk).

All runs replay the same token ids on the same tiny random-weight Llama (built offline by
:mod:`kvtier.ops.tinymodel`), each engine in its own process (no state leaks from one to another).
The engines take turns request by request (the order reversed every other request), so whatever
else loads the machine falls on every run alike; only one of them computes at any moment.

Correctness: a third run, vLLM alone with a G1 big enough to keep every conversation, reuses its
own cached KV for exactly the blocks kvtier brings back, so its greedy outputs must equal kvtier's
token for token. Against vLLM alone with the small G1 (recomputing), outputs can differ now and
then: recomputing a prefix in other chunk sizes rounds differently, with or without kvtier.
The kvtier run serves its Prometheus metrics, and the demo reads the per-tier hit rates from that
endpoint. Reported: time to first token per turn and overall, prompt tokens recomputed, hit rate
per tier, whether the greedy outputs of both runs are identical; plus a PNG plot of both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

MODES: tuple[str, ...] = ("baseline", "kvtier", "reference")
"""The runs: vLLM alone (small G1), vLLM with kvtier (same small G1), and the correctness
reference: vLLM alone with a G1 big enough to keep every conversation (its own prefix cache
reuses exactly the blocks kvtier brings back, so the outputs must be identical)."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo workload and the engine's sizes (defaults: a few minutes on a 2-core machine).

    ``g1_blocks`` is the engine's own KV pool in blocks of ``BLOCK_TOKENS`` tokens: big enough for
    one conversation, too small for all users' histories. ``host_blocks`` / ``disk_blocks`` size
    kvtier's G2 and G3 (0 disables a tier).
    """

    users: int = 6
    turns: int = 3
    system_tokens: int = 256
    user_tokens: int = 640
    reply_tokens: int = 32
    g1_blocks: int = 19
    host_blocks: int = 48
    disk_blocks: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "users",
            "turns",
            "system_tokens",
            "user_tokens",
            "reply_tokens",
            "g1_blocks",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"demo {name} must be a positive int, got {value!r}")
        for name in ("host_blocks", "disk_blocks", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"demo {name} must be an int >= 0, got {value!r}")
        if self.host_blocks == 0 and self.disk_blocks == 0:
            raise ValueError("demo needs at least one kvtier tier (host_blocks or disk_blocks)")
        longest = self.max_prompt_tokens + self.reply_tokens
        if longest > self.g1_blocks * BLOCK_TOKENS:
            raise ValueError(
                f"demo g1_blocks={self.g1_blocks} ({self.g1_blocks * BLOCK_TOKENS} tokens) cannot "
                f"hold the longest conversation ({longest} tokens)"
            )

    @property
    def reference_g1_blocks(self) -> int:
        """A G1 that keeps every user's whole conversation (the reference run)."""
        per_user = -(-(self.max_prompt_tokens + self.reply_tokens) // BLOCK_TOKENS)
        return self.users * per_user + 4

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens of the last turn's prompt."""
        per_turn = self.user_tokens + self.reply_tokens
        return self.system_tokens + (self.turns - 1) * per_turn + self.user_tokens


BLOCK_TOKENS = 128
"""vLLM's CPU block size (tokens per KV block)."""
MAX_MODEL_LEN = 8192
"""Context limit of the demo model (its max_position_embeddings)."""
VOCAB = 4096
"""Vocabulary of the demo model; token ids are drawn from [3, VOCAB)."""


def demo_model_spec() -> Any:
    """The demo's model: bigger than the test model, so that recomputing a prefix costs time
    (about 50 MFLOP per token) while its KV stays small (4 KiB per token, GQA with 2 KV heads)."""
    from kvtier.ops.tinymodel import TinyLlamaSpec

    return TinyLlamaSpec(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_MODEL_LEN,
    )


@dataclass
class Turn:
    """One request as measured: who, which turn, its size, TTFT, cache hits, and its output."""

    user: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    output: list[int]


@dataclass
class RunResult:
    """One run (one mode) of the workload."""

    mode: str
    engine_start_s: float
    turns: list[Turn] = field(default_factory=list)
    kvtier_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def recomputed_tokens(self) -> int:
        """Prompt tokens the engine had to compute (not served by G1 or kvtier)."""
        return sum(t.prompt_tokens - t.cached_tokens for t in self.turns)


def _messages(cfg: DemoConfig) -> tuple[list[int], list[list[list[int]]]]:
    rng = random.Random(cfg.seed)
    system = [rng.randrange(3, VOCAB) for _ in range(cfg.system_tokens)]
    msgs = [
        [[rng.randrange(3, VOCAB) for _ in range(cfg.user_tokens)] for _ in range(cfg.turns)]
        for _ in range(cfg.users)
    ]
    return system, msgs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
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


class _Session:
    """One mode's engine in this process, driven one request at a time (the child side)."""

    def __init__(self, mode: str, cfg: DemoConfig, work: Path) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown demo mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode, self.cfg, self.work = mode, cfg, work
        self.port = _free_port()
        self.llm: Any = None
        self.params: Any = None
        self.system, self.msgs = _messages(cfg)
        self.history: list[list[int]] = [[] for _ in range(cfg.users)]

    def start(self) -> float:
        """Build the model and the engine, warm it up; returns the engine start time."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from kvtier.ops.tinymodel import build_tiny_llama

        model = build_tiny_llama(self.work / "model", demo_model_spec())
        kwargs: dict[str, Any] = {}
        if self.mode == "kvtier":
            from vllm.config import KVTransferConfig

            extra: dict[str, Any] = {
                "disk_filter": False,
                "metrics": True,
                "metrics_port": self.port,
            }
            if self.cfg.host_blocks:
                extra["cpu_cache_blocks"] = self.cfg.host_blocks
            if self.cfg.disk_blocks:
                extra["disk_cache_blocks"] = self.cfg.disk_blocks
                extra["disk_dir"] = str(self.work / "g3")
            kwargs["kv_transfer_config"] = KVTransferConfig(
                kv_connector="KvTierConnector",
                kv_connector_module_path="kvtier.vllm",
                kv_role="kv_both",
                kv_connector_extra_config=extra,
            )
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        g1_blocks = self.cfg.g1_blocks
        if self.mode == "reference":
            g1_blocks = self.cfg.reference_g1_blocks
        start = time.perf_counter()
        self.llm = LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=min(self.cfg.g1_blocks * BLOCK_TOKENS, MAX_MODEL_LEN),
            kv_cache_memory_bytes=g1_blocks * _block_bytes(),
            disable_log_stats=False,
            seed=self.cfg.seed,
            **kwargs,
        )
        took = time.perf_counter() - start
        self.params = SamplingParams(
            max_tokens=self.cfg.reply_tokens, temperature=0.0, ignore_eos=True
        )
        # Warm-up (first-call kernel set-up), on tokens no conversation uses.
        warm = [VOCAB - 1 - (i % 7) for i in range(self.cfg.user_tokens)]
        self.llm.generate([TokensPrompt(prompt_token_ids=warm)], self.params, use_tqdm=False)
        return took

    def request(self, user: int, turn: int) -> Turn:
        """The user's next turn: system prompt + their history + the new message."""
        from vllm.inputs import TokensPrompt

        prompt = self.system + self.history[user] + self.msgs[user][turn]
        t0 = time.perf_counter()
        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)], self.params, use_tqdm=False
        )
        wall = time.perf_counter() - t0
        ttft = getattr(out[0].metrics, "first_token_latency", 0.0) or wall
        reply = list(out[0].outputs[0].token_ids)
        self.history[user] = self.history[user] + self.msgs[user][turn] + reply
        return Turn(user, turn, len(prompt), int(out[0].num_cached_tokens or 0), ttft, reply)

    def metrics(self) -> dict[str, float]:
        """kvtier's metrics, scraped from its endpoint (empty for the baseline)."""
        return _scrape(self.port) if self.mode == "kvtier" else {}


def _block_bytes() -> int:
    spec = demo_model_spec()
    elem = 4  # the tiny model is float32
    return int(
        BLOCK_TOKENS * spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * elem
    )


# -- the parent side: run both modes, report, plot ---------------------------------------------


@dataclass(frozen=True)
class Summary:
    """The demo's figures, as printed and written to ``demo.json``."""

    config: dict[str, Any]
    ttft_per_turn_ms: dict[str, list[float]]
    ttft_overall_ms: dict[str, float]
    recomputed_tokens: dict[str, int]
    prompt_tokens: int
    hit_rate: dict[str, float]
    identical_outputs: int
    identical_to_reference: int
    requests: int
    engine_start_s: dict[str, float]
    per_request: list[dict[str, Any]]


def summarize(cfg: DemoConfig, runs: dict[str, RunResult]) -> Summary:
    """Per-turn and overall mean TTFT, recompute, hit rates (from the kvtier metrics)."""
    per_turn = {
        mode: [
            1000 * sum(t.ttft_s for t in r.turns if t.turn == k) / cfg.users
            for k in range(cfg.turns)
        ]
        for mode, r in runs.items()
    }
    overall = {
        mode: 1000 * sum(t.ttft_s for t in r.turns) / len(r.turns) for mode, r in runs.items()
    }
    m = runs["kvtier"].kvtier_metrics
    looked = m.get("kvtier_lookup_tokens_total", 0.0)
    hit = {
        tier: (
            m.get(f"kvtier_matched_tokens_total{{tier={tier}}}", 0.0) / looked if looked else 0.0
        )
        for tier in ("host", "disk")
    }
    prompt_total = sum(t.prompt_tokens for t in runs["baseline"].turns)
    hit["device (vLLM prefix cache)"] = (
        sum(t.cached_tokens for t in runs["baseline"].turns) / prompt_total if prompt_total else 0.0
    )
    triples = list(
        zip(runs["baseline"].turns, runs["kvtier"].turns, runs["reference"].turns, strict=True)
    )
    same = sum(a.output == b.output for a, b, _ in triples)
    same_ref = sum(b.output == c.output for _, b, c in triples)
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
    return Summary(
        per_request=rows,
        config=asdict(cfg),
        ttft_per_turn_ms=per_turn,
        ttft_overall_ms=overall,
        recomputed_tokens={mode: r.recomputed_tokens for mode, r in runs.items()},
        prompt_tokens=prompt_total,
        hit_rate=hit,
        identical_outputs=same,
        identical_to_reference=same_ref,
        requests=len(runs["baseline"].turns),
        engine_start_s={mode: r.engine_start_s for mode, r in runs.items()},
    )


def plot(cfg: DemoConfig, runs: dict[str, RunResult], path: Path) -> None:
    """TTFT of every request of both runs, and the mean per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    from matplotlib.ticker import MaxNLocator

    colors = {"baseline": "#c0504d", "kvtier": "#3b7dd8", "reference": "#999999"}
    labels = {
        "baseline": "vLLM alone",
        "kvtier": "vLLM + kvtier",
        "reference": "vLLM, G1 big enough for all (ideal)",
    }
    for mode, r in runs.items():
        left.plot(
            range(1, len(r.turns) + 1),
            [1000 * t.ttft_s for t in r.turns],
            marker="o",
            color=colors[mode],
            label=labels[mode],
            linestyle="--" if mode == "reference" else "-",
        )
        means = [
            1000 * sum(t.ttft_s for t in r.turns if t.turn == k) / cfg.users
            for k in range(cfg.turns)
        ]
        right.plot(
            range(1, cfg.turns + 1),
            means,
            marker="o",
            color=colors[mode],
            label=labels[mode],
            linestyle="--" if mode == "reference" else "-",
        )
    left.set_xlabel("request (turn by turn, users round-robin)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("time to first token (ms)")
    left.set_title("every request")
    right.set_xlabel("turn")
    right.set_ylabel("mean time to first token (ms)")
    right.set_title("mean per turn")
    right.set_xticks(range(1, cfg.turns + 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.suptitle(
        f"vLLM CPU, tiny Llama: {cfg.users} users x {cfg.turns} turns, "
        f"{cfg.system_tokens}-token system prompt, G1 {cfg.g1_blocks} blocks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MARK = "KVTIER-DEMO "
"""Prefix of the protocol lines a child writes on stdout (vLLM's own log lines go there too)."""


class _Child:
    """A child process running one mode, answering one request at a time (parent side)."""

    def __init__(self, mode: str, cfg: DemoConfig, work: Path, log: Path) -> None:
        self.mode, self.log_path = mode, log
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        cmd = [sys.executable, "-m", "kvtier.ops.demo", "--child", mode]
        cmd += ["--config-json", json.dumps(asdict(cfg)), "--work", str(work)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                reply: dict[str, Any] = json.loads(line[len(_MARK) :])
                return reply
            self.log.write(line)
        self.log.flush()
        code = self.proc.wait()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(
            f"demo {self.mode} run failed (exit {code}); log {self.log_path}:\n{tail}"
        )

    def send(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def _run_lockstep(
    cfg: DemoConfig, work: Path, out_dir: Path, console: Console
) -> dict[str, RunResult]:
    """Both engines alive at once, taking turns request by request (ABBA order), so background
    load on the machine falls on both runs alike; only one computes at any moment."""
    children: dict[str, _Child] = {}
    runs: dict[str, RunResult] = {}
    try:
        for mode in MODES:
            with console.status(f"starting vLLM ({mode})"):
                child = _Child(mode, cfg, work, out_dir / f"demo-{mode}.log")
                children[mode] = child
                runs[mode] = RunResult(mode, float(child.read()["engine_start_s"]))
        order = [(turn, user) for turn in range(cfg.turns) for user in range(cfg.users)]
        with console.status("replaying the chat") as status:
            for i, (turn, user) in enumerate(order):
                status.update(f"turn {turn + 1}/{cfg.turns}, user {user + 1}/{cfg.users}")
                modes = MODES if i % 2 == 0 else tuple(reversed(MODES))
                for mode in modes:
                    got = children[mode].send(op="request", user=user, turn=turn)
                    runs[mode].turns.append(Turn(**got))
        for mode in MODES:
            runs[mode].kvtier_metrics = children[mode].send(op="finish")["metrics"]
    finally:
        for child in children.values():
            child.close()
    for mode in MODES:
        (out_dir / f"demo-{mode}.log").unlink(missing_ok=True)  # kept only when a run fails
    return runs


def run_demo(cfg: DemoConfig, out_dir: Path, console: Console) -> Summary:
    """Both runs in child processes, then the report, ``demo.json`` and ``demo.png``."""
    from rich.table import Table

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as tmp:
        runs = _run_lockstep(cfg, Path(tmp), out_dir, console)
    summary = summarize(cfg, runs)
    table = Table(title="time to first token (mean per turn, ms)")
    table.add_column("turn", justify="right")
    table.add_column("vLLM alone", justify="right")
    table.add_column("vLLM + kvtier", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("ideal (G1 holds all)", justify="right")
    rows = [*[str(k + 1) for k in range(cfg.turns)], "overall"]
    base, kvt, ref = ([*summary.ttft_per_turn_ms[m], summary.ttft_overall_ms[m]] for m in MODES)
    for label, b, k, r in zip(rows, base, kvt, ref, strict=True):
        table.add_row(label, f"{b:.0f}", f"{k:.0f}", f"{b / k:.2f}x" if k else "-", f"{r:.0f}")
    console.print(table)
    console.print(
        f"prompt tokens recomputed: vLLM alone {summary.recomputed_tokens['baseline']}, "
        f"with kvtier {summary.recomputed_tokens['kvtier']} (of {summary.prompt_tokens})"
    )
    h = summary.hit_rate
    console.print(
        f"kvtier hit rate (of the tokens looked up in kvtier): G2 host {h['host']:.1%}, "
        f"G3 disk {h['disk']:.1%}; vLLM's own G1 prefix cache without kvtier served "
        f"{h['device (vLLM prefix cache)']:.1%} of the prompt tokens"
    )
    n = summary.requests
    console.print(
        f"greedy outputs of vLLM + kvtier identical to the ideal run (same KV reused): "
        f"{summary.identical_to_reference}/{n}; to vLLM alone (recomputing): "
        f"{summary.identical_outputs}/{n}"
    )
    (out_dir / "demo.json").write_text(json.dumps(asdict(summary), indent=2))
    plot(cfg, runs, out_dir / "demo.png")
    console.print(f"wrote {out_dir / 'demo.json'} and {out_dir / 'demo.png'}")
    return summary


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvtier demo`` (every DemoConfig field, plus the output folder)."""
    defaults = DemoConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--out", default="demo-out", help="folder for demo.json, demo.png, logs")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The DemoConfig named by parsed ``kvtier demo`` options."""
    return DemoConfig(**{name: getattr(args, name) for name in asdict(DemoConfig())})


def run_cli(args: argparse.Namespace, console: Console) -> int:
    """``kvtier demo``: run, print, write; exit status 0."""
    run_demo(config_from_args(args), Path(args.out), console)
    return 0


def _emit(obj: dict[str, Any]) -> None:
    print(_MARK + json.dumps(obj), flush=True)


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.ops.demo")
    parser.add_argument("--child", choices=MODES, required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    session = _Session(args.child, DemoConfig(**json.loads(args.config_json)), Path(args.work))
    _emit({"engine_start_s": session.start()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "request":
            _emit(asdict(session.request(int(cmd["user"]), int(cmd["turn"]))))
        elif cmd["op"] == "finish":
            _emit({"metrics": session.metrics()})
            return 0
        else:
            raise ValueError(f"unknown demo command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
