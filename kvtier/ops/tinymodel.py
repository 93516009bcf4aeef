"""Build a tiny ``LlamaForCausalLM`` model directory offline (no download).

Why this exists: the vLLM end-to-end tests and the demo need a real model that a real vLLM (CPU
build) can load in seconds, on a machine with no network. A random-weight Llama with 2 layers is
enough: prefix caching, KV offload and onboarding exercise exactly the same code paths as a 70B
model, and because the weights are random but fixed (seeded), greedy outputs are deterministic and
change when the KV they attend to is wrong, so wrong KV is detectable.

The directory holds ``config.json`` and ``model.safetensors`` (no pickle). Prompts are passed as
token ids (``skip_tokenizer_init=True``), so no tokenizer is needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["TinyLlamaSpec", "build_tiny_llama"]


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the tiny model. CPU attention needs ``hidden_size // num_heads >= 32``."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    init_std: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyLlamaSpec.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyLlamaSpec.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyLlamaSpec.num_attention_heads ({self.num_attention_heads}) must be divisible "
                f"by num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim < 32:
            raise ValueError(
                f"TinyLlamaSpec head_dim = hidden_size / num_attention_heads = {self.head_dim}; "
                "vLLM's CPU attention needs at least 32"
            )
        if not self.init_std > 0:
            raise ValueError(f"TinyLlamaSpec.init_std must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict[str, object]:
        """The Hugging Face ``config.json`` content."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "kvtier_tiny_spec": asdict(self),
        }


def _weight_shapes(spec: TinyLlamaSpec) -> dict[str, tuple[int, ...]]:
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
    }
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes


def build_tiny_llama(path: str | os.PathLike[str], spec: TinyLlamaSpec | None = None) -> Path:
    """Write a tiny random-weight Llama to ``path`` (created if missing) and return it.

    The weights depend only on ``spec`` (seeded generator), so two builds are byte-identical.
    Rebuilding over an existing directory with the same spec is a no-op.
    """
    import torch
    from safetensors.torch import save_file

    spec = spec or TinyLlamaSpec()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    weights_path = out / "model.safetensors"
    config_text = json.dumps(spec.hf_config(), indent=2, sort_keys=True)
    if (
        config_path.exists()
        and weights_path.exists()
        and config_path.read_text(encoding="utf-8") == config_text
    ):
        return out
    gen = torch.Generator().manual_seed(spec.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _weight_shapes(spec).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.float32)
        else:
            tensors[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * spec.init_std
    tmp_weights = weights_path.with_suffix(".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, weights_path)
    tmp_config = config_path.with_suffix(".tmp")
    tmp_config.write_text(config_text, encoding="utf-8")
    os.replace(tmp_config, config_path)
    return out
