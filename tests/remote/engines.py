"""Drive ``engine_child.py`` processes from a test (one vLLM engine per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvtier.lifecycle import Lifecycle

CHILD = Path(__file__).with_name("engine_child.py")
BLOCK = 128  # vLLM's CPU block size


def prompt(seed: int, length: int, *, vocab: int = 1000) -> list[int]:
    """A deterministic token-id prompt (different seeds share no block)."""
    return [(seed * 7919 + i * 31 + (i * i) % 97) % vocab + 3 for i in range(length)]


class EngineProcess(Lifecycle):
    """One engine in a child process; ``call`` sends a command and returns its JSON answer."""

    def __init__(self, model: Path, extra: dict[str, Any]) -> None:
        self.model = model
        self.extra = extra
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> EngineProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(self.model), json.dumps(self.extra)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        return self

    def wait_ready(self) -> None:
        assert self._readline().get("ready"), "engine did not start"

    def _readline(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"engine process exited (rc={self._proc.poll()})")
            if line.startswith("{"):
                answer: dict[str, Any] = json.loads(line)
                return answer

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        return self._readline()

    def run(self, prompts: list[list[int]]) -> dict[str, Any]:
        return self.call("run", prompts=prompts)

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.poll() is None:
                self.call("quit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
