"""``kvtier demo`` on a small workload: all runs on real vLLM (CPU), report, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.ops.cli import build_parser, main
from kvtier.ops.demo import HELP, DemoConfig, model_dtype


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_runs_every_mode_and_kvtier_recomputes_less(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # G1 (8 blocks, 7 usable) holds one conversation (at most 6 blocks) but not both documents.
    args = ["--users", "3", "--turns", "2", "--docs", "2", "--doc-tokens", "512"]
    args += ["--question-tokens", "128", "--reply-tokens", "8", "--g1-blocks", "8"]
    args += ["--host-blocks", "4", "--disk-blocks", "64"]
    assert main(["demo", *args, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "time to first token" in text and "overall" in text
    doc = json.loads((tmp_path / "demo.json").read_text())
    cfg = DemoConfig(3, 2, 2, 512, 128, 8, 8, 4, 64)
    assert doc["config"] == {**cfg.__dict__}
    assert doc["requests"] == 6 and len(doc["per_request"]) == 6
    # Turn 1: document + question; turn 2 adds the first question and its 8-token reply.
    assert doc["prompt_tokens"] == 3 * 640 + 3 * (640 + 136)
    assert len(doc["ttft_per_turn_ms"]["baseline"]) == 2 and len(doc["speedup_per_turn"]) == 2
    recomputed = doc["recomputed_tokens"]
    assert recomputed["kvtier"] < recomputed["baseline"]
    sources = doc["tokens_by_source"]["kvtier"]
    assert sources["G2"] > 0 and sources["G3"] > 0
    assert sum(sources.values()) == doc["prompt_tokens"]
    # kvtier's hit rate is counted as vLLM counts its external hits.
    kvtier_rate = doc["hit_rate"]["host"] + doc["hit_rate"]["disk"]
    assert kvtier_rate == pytest.approx(doc["vllm_external_hit_rate"], abs=0.01)
    # Bit-exact KV: kvtier's outputs equal vLLM's own when vLLM kept the same blocks in G1.
    assert doc["identical_to_reference"] == 6
    assert recomputed["reference"] == recomputed["kvtier"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.log"))  # logs are kept only when a run fails


def test_demo_refuses_a_g1_too_small_for_one_conversation() -> None:
    with pytest.raises(ValueError, match="cannot hold the longest conversation"):
        DemoConfig(users=2, turns=3, doc_tokens=2048, question_tokens=512, g1_blocks=4)


def test_demo_refuses_junk() -> None:
    with pytest.raises(ValueError, match="demo users must be an int >= 1"):
        DemoConfig(users=0)
    with pytest.raises(ValueError, match="docs"):
        DemoConfig(users=2, docs=3)


def test_demo_help_explains_every_option_with_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the texts checked below
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["demo", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = DemoConfig()
    for name, help_text in HELP.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text
        assert f"{' '.join(help_text.split())} (default: {getattr(defaults, name)})" in text
    assert "(default: demo-out)" in text


def test_demo_computes_in_bfloat16_only_where_the_cpu_does_natively() -> None:
    assert model_dtype("flags\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile") == "bfloat16"
    assert model_dtype("flags\t: fpu avx2 amx_bf16") == "bfloat16"
    assert model_dtype("flags\t: fpu sse2 avx2 avx512f") == "float32"  # emulated: 2x slower
    assert model_dtype("") == "float32"
