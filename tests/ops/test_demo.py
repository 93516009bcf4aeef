"""``kvtier demo`` on a small workload: both runs on real vLLM (CPU), report, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.ops.cli import main
from kvtier.ops.demo import DemoConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_demo_runs_both_modes_and_kvtier_recomputes_less(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # G1 (9 blocks) holds one conversation but not the three users' histories (2 + 3 x 3 blocks).
    args = ["--users", "3", "--turns", "2", "--system-tokens", "256", "--user-tokens", "384"]
    args += ["--reply-tokens", "8", "--g1-blocks", "9", "--host-blocks", "8", "--disk-blocks", "64"]
    assert main(["demo", *args, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "time to first token" in text and "overall" in text
    doc = json.loads((tmp_path / "demo.json").read_text())
    cfg = DemoConfig(3, 2, 256, 384, 8, 9, 8, 64)
    assert doc["config"] == {**cfg.__dict__}
    assert doc["requests"] == 6 and len(doc["per_request"]) == 6
    # Turn 1: 256 + 384 tokens; turn 2 adds the first message and its 8-token reply.
    assert doc["prompt_tokens"] == 3 * 640 + 3 * (640 + 392)
    assert len(doc["ttft_per_turn_ms"]["baseline"]) == 2
    recomputed = doc["recomputed_tokens"]
    assert recomputed["kvtier"] < recomputed["baseline"]
    assert doc["hit_rate"]["host"] + doc["hit_rate"]["disk"] > 0
    # Bit-exact KV: kvtier's outputs equal vLLM's own when vLLM kept the same blocks in G1.
    assert doc["identical_to_reference"] == 6
    assert recomputed["reference"] <= recomputed["kvtier"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.log"))  # logs are kept only when a run fails


def test_demo_refuses_a_g1_too_small_for_one_conversation() -> None:
    with pytest.raises(ValueError, match="cannot hold the longest conversation"):
        DemoConfig(users=2, turns=3, system_tokens=1024, user_tokens=512, g1_blocks=4)
