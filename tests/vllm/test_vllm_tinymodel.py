"""kvtier.ops.tinymodel: an offline, deterministic tiny Llama directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.ops.tinymodel import TinyLlamaSpec, build_tiny_llama


def test_build_is_deterministic_and_complete(tmp_path: Path) -> None:
    a = build_tiny_llama(tmp_path / "a")
    b = build_tiny_llama(tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 32)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    build_tiny_llama(a)  # same spec: nothing rewritten
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_weights_follow_the_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    w0 = load_file(str(build_tiny_llama(tmp_path / "s0") / "model.safetensors"))
    w1 = load_file(
        str(build_tiny_llama(tmp_path / "s1", TinyLlamaSpec(seed=1)) / "model.safetensors")
    )
    assert set(w0) == set(w1)
    assert len(w0) == 3 + 9 * 2
    assert tuple(w0["model.layers.0.self_attn.k_proj.weight"].shape) == (64, 128)
    assert not w0["lm_head.weight"].equal(w1["lm_head.weight"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 64, "num_attention_heads": 4}, "head_dim"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "divisible"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_spec_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TinyLlamaSpec(**kwargs)  # type: ignore[arg-type]
