"""Real vLLM engines (CPU build) in separate processes sharing one ``disk_dir``.

Shows: a prompt one running engine stored in G3 is a G3 hit in another engine that was already
running (a miss in its own index is not a miss in the tier), with identical greedy output; and a
model of the same shape with different weights, at the same path, never sees those blocks
(the weights digest is in the namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import BLOCK, prompt

from kvtier.ops.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("shared_engine.py")
P = prompt(77, 3 * BLOCK + 5)


class Engine:
    """A child process running one engine; ``ask`` sends a command and returns its answer."""

    def __init__(self, model: Path, disk_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(model), str(disk_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("KVT "):
                doc: dict[str, Any] = json.loads(line[4:])
                return doc
        raise RuntimeError(f"engine exited with {self.proc.wait()}")

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, RuntimeError):
                self.ask(op="quit")  # the engine exits without an answer
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for e in started:
        e.close()


def test_two_engines_share_one_disk_dir_and_another_model_sees_nothing(
    tmp_path: Path, engines: list[Engine]
) -> None:
    model = build_tiny_llama(tmp_path / "model", TinyLlamaSpec(seed=0))
    disk = tmp_path / "g3"
    a, b = Engine(model, disk), Engine(model, disk)
    engines.extend([a, b])
    assert a.answer()["ready"] and b.answer()["ready"]  # both running before anything is stored
    ref = a.ask(op="gen", prompt=P)
    a.ask(op="drain")
    assert len(list(disk.glob("*/*.kvb"))) == 3  # A's three full blocks, written through to G3
    got = b.ask(op="gen", prompt=P)
    assert got["disk_hit_blocks"] == 3  # B found A's blocks while running
    assert got["tokens"] == ref["tokens"]  # and they are the right KV
    a.close()
    b.close()

    config = (model / "config.json").read_bytes()
    build_tiny_llama(model, TinyLlamaSpec(seed=1))  # new weights at the same path...
    (model / "config.json").write_bytes(config)  # ...with the very same config.json
    c = Engine(model, disk)
    engines.append(c)
    assert c.answer()["ready"]
    other = c.ask(op="gen", prompt=P)
    assert other["disk_hit_blocks"] == 0  # another model's KV is never served
    assert other["tokens"] != ref["tokens"]  # (it is another model: its own output differs)
    c.ask(op="drain")
    assert len([p for p in disk.iterdir() if p.is_dir()]) == 2  # one namespace per model
    assert len(list(disk.glob("*/*.kvb"))) == 6  # A's blocks are still there, untouched
