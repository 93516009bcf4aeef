"""Model identity: what, besides the layout, makes two engines' KV bytes differ.

Why this exists: two models with the same shapes and dtype but different weights produce KV of
the same size and layout, so a key space namespaced by geometry alone serves one model's KV to
the other (wrong output, no error). Every persistent tier (G3 disk, G4 remote) therefore keys its
blocks by ``ModelIdentity.namespace(layout_fingerprint)``: a 64-bit value over

- the model name or path and its revision,
- a cheap digest of the weights' identity (``weights_digest``: config.json, the checkpoint index
  and, per weight file, its name, size and first/last 64 KiB; no full read),
- the dtype, the tensor-parallel rank and size,
- and the layout fingerprint (geometry, dtype, block size, layout kind, format version).

``model_id`` (the operator's knob) replaces name, revision and weights digest: engines given the
same ``model_id`` share blocks on purpose (e.g. copies of one checkpoint under different paths),
different ones never do. dtype, layout and TP rank/size stay in the key regardless, since they
change the bytes. The ``cache_salt`` and LoRA adapter are not here because they are already in
every sequence hash (the hash seed is ``salt_hash(cache_salt, lora_name)``, kvtier.hashing).

No torch, no disk tier: G3 and G4 both build their key space from this module.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

__all__ = ["ModelIdentity", "weights_digest"]

_SAMPLE = 64 * 1024
_INDEX_MAX = 64 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that separates one model's KV from another's (see the module docstring)."""

    model: str = ""
    revision: str = ""
    weights: str = ""
    dtype: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    model_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "revision", "weights", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"ModelIdentity.{name} must be a str")
        if self.model_id is not None and (not isinstance(self.model_id, str) or not self.model_id):
            raise ValueError("model_id must be a non-empty string or None")
        if not (isinstance(self.tp_size, int) and self.tp_size >= 1):
            raise ValueError(f"tp_size must be an int >= 1, got {self.tp_size!r}")
        if not (isinstance(self.tp_rank, int) and 0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank must be in 0..{self.tp_size - 1}, got {self.tp_rank!r}")

    @classmethod
    def from_vllm_config(
        cls, vllm_config: object, *, tp_rank: int, tp_size: int, model_id: str | None = None
    ) -> ModelIdentity:
        """The identity of the model a vLLM engine serves (read from ``vllm_config``'s
        ``model_config``: model name or path, revision, dtype; weights digest of a local
        checkpoint folder). Duck-typed: no vLLM import."""
        mc = getattr(vllm_config, "model_config", None)
        model = str(getattr(mc, "model", "") or "")
        weights = str(getattr(mc, "model_weights", "") or "") or model
        dtype = str(getattr(mc, "dtype", "") or "").removeprefix("torch.")
        return cls(
            model=model,
            revision=str(getattr(mc, "revision", "") or ""),
            weights=weights_digest(weights) if weights else "",
            dtype=dtype,
            tp_rank=tp_rank,
            tp_size=tp_size,
            model_id=model_id,
        )

    def fields(self) -> dict[str, object]:
        """The fields that enter the key (``model_id`` replaces model, revision, weights)."""
        doc: dict[str, object] = asdict(self)
        if self.model_id is not None:
            doc = {"model_id": self.model_id, "dtype": self.dtype}
            doc.update(tp_rank=self.tp_rank, tp_size=self.tp_size)
        else:
            del doc["model_id"]
        return doc

    def namespace(self, layout_fingerprint: int) -> int:
        """The 64-bit key space of this model's blocks with the given layout."""
        body = json.dumps(self.fields(), sort_keys=True, separators=(",", ":")).encode()
        return xxhash.xxh3_64_intdigest(struct.pack("<Q", layout_fingerprint) + body)

    def describe(self, layout_fingerprint: int) -> dict[str, object]:
        """What ``kvtier inspect`` shows for a namespace (written beside its blocks)."""
        return {
            "namespace": f"{self.namespace(layout_fingerprint):016x}",
            "layout_fingerprint": f"{layout_fingerprint:016x}",
            **self.fields(),
        }


def weights_digest(model_path: str | os.PathLike[str]) -> str:
    """A cheap digest of a local checkpoint's identity ('' when ``model_path`` is no folder).

    Reads config.json, any ``*.index.json`` (the sharded checkpoint index) and, for each weight
    file, its name, size and its first and last 64 KiB: different weights of the same shapes
    differ there (the header names the same tensors, the tail holds their values), and a copy of
    the same checkpoint elsewhere gets the same digest. Symlinks are followed (a Hugging Face
    snapshot is a folder of symlinks to blobs). Never reads a whole weight file.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return ""
    h = xxhash.xxh3_64()
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
            if name == "config.json" or name.endswith(".index.json"):
                if size > _INDEX_MAX:
                    continue
                h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            elif name.endswith(_WEIGHT_SUFFIXES):
                h.update(name.encode() + b"\0" + struct.pack("<Q", size))
                with open(path, "rb") as f:
                    h.update(f.read(_SAMPLE))
                    if size > 2 * _SAMPLE:
                        f.seek(size - _SAMPLE)
                    h.update(f.read(_SAMPLE))
        except OSError:
            continue
    return h.hexdigest()
