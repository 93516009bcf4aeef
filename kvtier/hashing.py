"""KVBM-compatible block hashing (bit-compatible with NVIDIA Dynamo KVBM v1).

Why this exists: a block of KV is identified everywhere (pools, disk file names, KV events, other
processes and hosts) by a chained content hash, so the same prefix maps to the same key in any
process. Nothing here depends on the process: no ``hash()``, no PYTHONHASHSEED, no pickling.

Specification (Dynamo KVBM v1's, restated here in full; ``tests/unit/test_hashing.py`` pins it
with known values):

- tokens are u32, serialised little-endian; the hash function is xxh3_64;
- ``block_hash(i) = xxh3_64(le_u32(tokens of block i), seed=salt_hash)``;
- ``sequence_hash(0) = block_hash(0)``; for i > 0, ``sequence_hash(i) =
  xxh3_64(le_u64(sequence_hash(i-1)) || le_u64(block_hash(i)), seed=salt_hash)``;
- ``salt_hash = xxh3_64(compact JSON of {"salt": ..., "lora_name": ...}, seed=0)``, keys in that
  order, each omitted when absent;
- only full blocks are hashed; a partial tail is ignored.
"""

from __future__ import annotations

import array
import json
import struct
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

__all__ = [
    "TOKEN_MAX",
    "SequenceHashes",
    "block_hashes",
    "chain_hash",
    "hash_block_bytes",
    "hash_chain",
    "salt_hash",
    "sequence_hashes",
    "token_bytes",
]

TOKEN_MAX = 2**32 - 1
"""Largest valid token id (tokens are u32)."""

_U64_MAX = 2**64 - 1
_xxh3 = xxhash.xxh3_64_intdigest
_PAIR = struct.Struct("<QQ")


def salt_hash(cache_salt: str | None = None, lora_name: str | None = None) -> int:
    """Seed for all block hashes of a request: xxh3_64 of the compact JSON of its salt and LoRA."""
    for name, value in (("cache_salt", cache_salt), ("lora_name", lora_name)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    obj: dict[str, str] = {}
    if cache_salt is not None:
        obj["salt"] = cache_salt
    if lora_name is not None:
        obj["lora_name"] = lora_name
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return _xxh3(text.encode("utf-8"), 0)


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"salt_hash must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= _U64_MAX:
        raise ValueError(f"salt_hash must be in the u64 range [0, 2**64), got {seed}")


def _bad_token(tokens: Iterable[object]) -> str:
    """Describe the first invalid token (error path only)."""
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            return f"token at index {i} is not an integer: {t!r}"
        if not 0 <= int(t) <= TOKEN_MAX:
            return f"token at index {i} is out of the u32 range [0, 2**32): {int(t)}"
    return "tokens are not valid u32 token ids"


def token_bytes(tokens: Sequence[int] | np.ndarray | array.array[int]) -> bytes:
    """Little-endian u32 bytes of all tokens at once; raises ValueError/TypeError on bad tokens."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be one-dimensional, got shape {tokens.shape}")
        if tokens.size == 0:
            return b""
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if int(tokens.min()) < 0 or int(tokens.max()) > TOKEN_MAX:
            raise ValueError(_bad_token(tokens.tolist()))
        return tokens.astype("<u4", copy=False).tobytes()
    if isinstance(tokens, str | bytes | bytearray):
        raise TypeError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    try:
        packed = array.array("I", tokens)
    except (OverflowError, TypeError):
        raise ValueError(_bad_token(tokens)) from None
    if packed.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        return np.asarray(packed, dtype="<u4").tobytes()
    if sys.byteorder != "little":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def hash_block_bytes(data: bytes | memoryview, salt_hash: int = 0) -> int:
    """Block hash of one block's little-endian u32 token bytes."""
    return _xxh3(data, salt_hash)


def chain_hash(parent_sequence_hash: int | None, block_hash: int, salt_hash: int = 0) -> int:
    """Sequence hash of a block given its parent's sequence hash (None for the first block)."""
    if parent_sequence_hash is None:
        return block_hash
    return _xxh3(_PAIR.pack(parent_sequence_hash, block_hash), salt_hash)


def hash_chain(
    tokens: Sequence[int] | np.ndarray | array.array[int],
    block_size: int,
    salt_hash: int = 0,
    parent_sequence_hash: int | None = None,
) -> tuple[list[int], list[int]]:
    """Block hashes and sequence hashes of every full block of ``tokens``, in one pass.

    ``parent_sequence_hash`` continues an existing chain (the tokens start a new block after it).
    """
    _check_block_size(block_size)
    _check_seed(salt_hash)
    if parent_sequence_hash is not None and not (
        type(parent_sequence_hash) is int and 0 <= parent_sequence_hash <= _U64_MAX
    ):
        raise ValueError(
            f"parent_sequence_hash must be None or in the u64 range, got {parent_sequence_hash!r}"
        )
    blocks = block_hashes(tokens, block_size, salt_hash)
    xxh3, pack, seed = _xxh3, _PAIR.pack, salt_hash
    seqs: list[int] = []
    append = seqs.append
    seq = parent_sequence_hash
    for b in blocks:
        seq = b if seq is None else xxh3(pack(seq, b), seed)
        append(seq)
    return blocks, seqs


def block_hashes(
    tokens: Sequence[int] | np.ndarray | array.array[int], block_size: int, salt_hash: int = 0
) -> list[int]:
    """Block hash (content only, not chained) of every full block of ``tokens``."""
    _check_block_size(block_size)
    _check_seed(salt_hash)
    data = memoryview(token_bytes(tokens))
    step = 4 * block_size
    end = len(data) - len(data) % step
    xxh3, seed = _xxh3, salt_hash
    return [xxh3(data[i : i + step], seed) for i in range(0, end, step)]


def sequence_hashes(
    tokens: Sequence[int] | np.ndarray | array.array[int], block_size: int, salt_hash: int = 0
) -> list[int]:
    """Chained sequence hash of every full block of ``tokens`` (the keys pools are indexed by)."""
    return hash_chain(tokens, block_size, salt_hash)[1]


class SequenceHashes:
    """Sequence hashes of the full blocks of a growing token sequence held elsewhere, each block
    hashed once, when it completes: re-hashing a decoding request's whole prompt each step would
    be O(n) per token. Chains each new block from the previous sequence hash (the same values
    as ``sequence_hashes``)."""

    __slots__ = ("block_size", "hashes", "num_tokens", "salt_hash")

    def __init__(self, block_size: int, salt_hash: int = 0) -> None:
        self.block_size = block_size
        self.salt_hash = salt_hash
        self.hashes: list[int] = []
        self.num_tokens = 0
        """Tokens hashed so far (a multiple of ``block_size``)."""

    def advance(self, tokens: Sequence[int], num_tokens: int) -> None:
        """Hash the blocks of ``tokens[:num_tokens]`` not hashed yet (full blocks only)."""
        bs = self.block_size
        full = (num_tokens // bs) * bs
        if full <= self.num_tokens:
            return
        if full - self.num_tokens == bs and self.hashes:  # decode: one block, no batch set-up
            block = hash_block_bytes(token_bytes(tokens[self.num_tokens : full]), self.salt_hash)
            self.hashes.append(chain_hash(self.hashes[-1], block, self.salt_hash))
            self.num_tokens = full
            return
        parent = self.hashes[-1] if self.hashes else None
        _, seqs = hash_chain(list(tokens[self.num_tokens : full]), bs, self.salt_hash, parent)
        self.hashes.extend(seqs)
        self.num_tokens = full
