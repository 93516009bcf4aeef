"""A tiny DeepSeek-V2-shaped model (MLA attention, no MoE) written offline, for the MLA tests.

Why this exists: MLA backends (FLASH_ATTN_MLA, FLASHMLA, TRITON_MLA on CUDA; CPU_MLA on vLLM's
CPU build) hand kvtier one latent tensor per layer, ``(num_blocks, block_size, 576)``, with no K/V
axis; only a DeepSeek-style model makes vLLM allocate it. The latent is DeepSeek-V2's own
(kv_lora_rank 512 + qk_rope_head_dim 64 = 576, the head size every MLA kernel needs); everything
else is small. Every layer is dense (``first_k_dense_replace`` = layers, ``n_routed_experts`` 0),
so no MoE kernel is needed. The weights are random but seeded and large enough (std 0.1, not
vLLM's ``load_format="dummy"`` 1e-3 noise) that greedy outputs change when the KV they attend to
is wrong. Used by ``tests/gpu_vllm/test_gpu_mla.py`` and ``tests/vllm/test_e2e_mla.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyMlaSpec:
    """Shape of the tiny MLA model (DeepSeek-V2-Lite's attention dims, small everything else)."""

    num_hidden_layers: int = 4
    num_attention_heads: int = 16
    hidden_size: int = 256
    intermediate_size: int = 512
    vocab_size: int = 1024
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    init_std: float = 0.1
    seed: int = 0

    @property
    def latent(self) -> int:
        """The KV head size vLLM allocates per token: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def hf_config(self) -> dict[str, object]:
        n = self.num_hidden_layers
        return {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.intermediate_size,
            "num_hidden_layers": n,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": 0,
            "n_shared_experts": 0,
            "first_k_dense_replace": n,
            "moe_layer_freq": 1,
            "num_experts_per_tok": 1,
            "topk_method": "greedy",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": self.dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "kvtier_tiny_mla_spec": asdict(self),
        }

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, heads = self.hidden_size, self.intermediate_size, self.num_attention_heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (self.vocab_size, h),
        }
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (heads * qk, h)
            shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (self.latent, h)
            shapes[p + "self_attn.kv_a_layernorm.weight"] = (self.kv_lora_rank,)
            shapes[p + "self_attn.kv_b_proj.weight"] = (
                heads * (self.qk_nope_head_dim + self.v_head_dim),
                self.kv_lora_rank,
            )
            shapes[p + "self_attn.o_proj.weight"] = (h, heads * self.v_head_dim)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        return shapes


def build_tiny_mla(path: str | os.PathLike[str], spec: TinyMlaSpec | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of ``spec`` to ``path``; return it."""
    import torch
    from safetensors.torch import save_file

    spec = spec or TinyMlaSpec()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    tensors = {}
    for name, shape in spec.weight_shapes().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * spec.init_std).to(dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(spec.hf_config(), indent=2), encoding="utf-8")
    return out
