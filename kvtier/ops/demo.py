"""``kvtier demo`` (``make demo``): users chatting over long shared documents, on vLLM's CPU build.

Why this workload: it is what a KV tier is for. A few long documents (a RAG corpus, manuals,
contracts) are shared by several users; every prompt is one document, the user's own history
with it and a new question, so thousands of tokens per prompt and almost all of them seen before.
The engine's own KV pool (G1) holds one conversation, far too few for all of them, so without
kvtier each request recomputes its document and history; with kvtier they come back from G2
(host memory, which holds some) or G3 (disk, which holds the rest).

All runs replay the same token ids on the same tiny random-weight Llama (built offline by
:mod:`kvtier.ops.tinymodel`), each engine in its own process. The engines take turns request by
request (the order reversed every other request), so whatever else loads the machine falls on
every run alike, and only one of them computes at any moment. Every engine is warmed up (model
and kvtier's store and load paths) before the timings start, and runs with the same CPU settings
(``VLLM_CPU_NUM_OF_RESERVED_CPU=1``; see docs/operations.md, "vLLM's CPU build").

Correctness: a third run, vLLM alone with a G1 big enough to keep everything, reuses its own
cached KV for exactly the blocks kvtier brings back, so its greedy outputs must equal kvtier's
token for token. The kvtier run serves its Prometheus metrics; the report reads the per-tier hits
from that endpoint. The report and the plot are in :mod:`kvtier.ops.demo_report`; each engine
runs in :mod:`kvtier.ops.demo_child`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rich.console import Console

    from kvtier.ops.demo_report import Summary

MODES: tuple[str, ...] = ("baseline", "kvtier", "reference")
"""The runs: vLLM alone (small G1), vLLM with kvtier (same small G1), the correctness reference."""

BLOCK_TOKENS = 128
"""vLLM's CPU block size (tokens per KV block)."""
MAX_MODEL_LEN = 8192
"""Context limit of the demo model (its max_position_embeddings)."""
VOCAB = 4096
"""Vocabulary of the demo model; token ids are drawn from [3, VOCAB)."""
CPU_ENV: dict[str, str] = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
"""Set for every engine alike: vLLM's CPU build reserves one more core when a KV connector is
configured unless this is set, which would give the two runs different CPU bindings."""

HELP: dict[str, str] = {
    "users": "users chatting at the same time (user u reads document u mod docs)",
    "turns": "questions each user asks, one per round",
    "docs": "shared documents (the corpus)",
    "doc_tokens": "tokens per document",
    "question_tokens": "tokens per question",
    "reply_tokens": "tokens of each (greedy) reply",
    "g1_blocks": f"vLLM's own KV pool (G1), in blocks of {BLOCK_TOKENS} tokens",
    "host_blocks": "kvtier's G2 (host memory), in blocks (0: no G2)",
    "disk_blocks": "kvtier's G3 (disk), in blocks (0: no G3)",
    "seed": "seed of the token ids and of the model's weights",
}
"""Help text of each ``kvtier demo`` option (one per DemoConfig field)."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo workload and the engine's sizes (``HELP``; defaults: a few minutes on a 2-core
    machine, G1 holds one conversation, G2 about one document and G3 everything)."""

    users: int = 6
    turns: int = 3
    docs: int = 2
    doc_tokens: int = 6144
    question_tokens: int = 128
    reply_tokens: int = 32
    g1_blocks: int = 54
    host_blocks: int = 56
    disk_blocks: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name in ("host_blocks", "disk_blocks", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"demo {f.name} must be an int >= {low}, got {value!r}")
        if self.host_blocks == 0 and self.disk_blocks == 0:
            raise ValueError("demo needs at least one kvtier tier (host_blocks or disk_blocks)")
        if self.docs > self.users:
            raise ValueError(f"demo docs ({self.docs}) must not exceed users ({self.users})")
        longest = self.max_prompt_tokens + self.reply_tokens
        if longest > MAX_MODEL_LEN:
            raise ValueError(
                f"demo's longest conversation ({longest} tokens) exceeds the model's "
                f"{MAX_MODEL_LEN}-token context; lower doc_tokens, turns or question_tokens"
            )
        if longest > (self.g1_blocks - 1) * BLOCK_TOKENS:
            raise ValueError(
                f"demo g1_blocks={self.g1_blocks} ({self.g1_blocks - 1} usable blocks: vLLM keeps "
                f"one back) cannot hold the longest conversation ({longest} tokens)"
            )

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens of the last turn's prompt."""
        per_turn = self.question_tokens + self.reply_tokens
        return self.doc_tokens + (self.turns - 1) * per_turn + self.question_tokens

    @property
    def reference_g1_blocks(self) -> int:
        """A G1 that keeps every user's whole conversation (the reference run)."""
        per_user = -(-(self.max_prompt_tokens + self.reply_tokens) // BLOCK_TOKENS)
        return self.users * per_user + 4


def demo_model_spec() -> Any:
    """The demo's model: big enough that recomputing a prefix costs time (about 50 MFLOP per
    token) while its KV stays small (2 KiB per token in bfloat16, GQA with 2 KV heads)."""
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


def model_dtype(cpuinfo: str | None = None) -> Literal["bfloat16", "float32"]:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32: vLLM's CPU
    build emulates bfloat16 on AVX2, 2x slower (a 6k-token prefill: 25 s, 12 s in float32)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = set(cpuinfo.split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def block_bytes(dtype: str) -> int:
    """Bytes of one KV block of the demo model computing in ``dtype`` (its KV's dtype too)."""
    spec = demo_model_spec()
    elem = 2 if dtype == "bfloat16" else 4
    return int(
        BLOCK_TOKENS * spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * elem
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


@dataclass(frozen=True)
class Workload:
    """The token ids of the demo: the documents and every user's questions."""

    documents: list[list[int]]
    questions: list[list[list[int]]]

    @classmethod
    def build(cls, cfg: DemoConfig) -> Workload:
        rng = random.Random(cfg.seed)
        docs = [[rng.randrange(3, VOCAB) for _ in range(cfg.doc_tokens)] for _ in range(cfg.docs)]
        n = cfg.question_tokens
        questions = [
            [[rng.randrange(3, VOCAB) for _ in range(n)] for _ in range(cfg.turns)]
            for _ in range(cfg.users)
        ]
        return cls(docs, questions)

    def document_of(self, user: int) -> list[int]:
        return self.documents[user % len(self.documents)]


MARK = "KVTIER-DEMO "
"""Prefix of the protocol lines a child writes on stdout (vLLM's own log lines go there too)."""


class _Child:
    """A child process running one mode, answering one request at a time (parent side)."""

    def __init__(self, mode: str, cfg: DemoConfig, work: Path, log: Path) -> None:
        self.mode, self.log_path = mode, log
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        cmd = [sys.executable, "-m", "kvtier.ops.demo_child", "--child", mode]
        cmd += ["--config-json", json.dumps(asdict(cfg)), "--work", str(work)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, **CPU_ENV},
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                reply: dict[str, Any] = json.loads(line[len(MARK) :])
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
    """All engines alive at once, taking turns request by request (ABBA order)."""
    children: dict[str, _Child] = {}
    runs: dict[str, RunResult] = {}
    try:
        for mode in MODES:
            with console.status(f"starting vLLM ({mode}) and warming it up"):
                child = _Child(mode, cfg, work, out_dir / f"demo-{mode}.log")
                children[mode] = child
                runs[mode] = RunResult(mode, float(child.read()["engine_start_s"]))
        order = [(turn, user) for turn in range(cfg.turns) for user in range(cfg.users)]
        with console.status("replaying the chats") as status:
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
    """All runs in child processes, then the report, ``demo.json`` and ``demo.png``."""
    from kvtier.ops.demo_report import report

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as tmp:
        runs = _run_lockstep(cfg, Path(tmp), out_dir, console)
    return report(cfg, runs, out_dir, console)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvtier demo`` (every DemoConfig field, plus the output folder)."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for name, value in asdict(DemoConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=int, default=value, metavar="N", help=HELP[name])
    parser.add_argument("--out", default="demo-out", help="folder for demo.json, demo.png, logs")


def run_cli(args: argparse.Namespace, console: Console) -> int:
    """``kvtier demo``: run, print, write; exit status 0."""
    cfg = DemoConfig(**{name: getattr(args, name) for name in asdict(DemoConfig())})
    run_demo(cfg, Path(args.out), console)
    return 0
