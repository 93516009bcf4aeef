"""Hashing properties: incremental == bulk == the spec, for any tokens, block size and salt."""

from __future__ import annotations

import struct

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.hashing import SequenceHashes, hash_chain, sequence_hashes

tokens_st = st.lists(st.integers(0, 2**32 - 1), max_size=80)
seed_st = st.integers(0, 2**64 - 1)


def spec(tokens: list[int], block_size: int, seed: int) -> list[int]:
    out: list[int] = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        raw = struct.pack(f"<{block_size}I", *tokens[i : i + block_size])
        b = xxhash.xxh3_64_intdigest(raw, seed)
        out.append(b if not out else xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], b), seed))
    return out


@settings(max_examples=200, deadline=None)
@given(tokens=tokens_st, block_size=st.integers(1, 9), seed=seed_st)
def test_bulk_matches_spec(tokens: list[int], block_size: int, seed: int) -> None:
    assert sequence_hashes(tokens, block_size, seed) == spec(tokens, block_size, seed)


@settings(max_examples=150, deadline=None)
@given(
    tokens=tokens_st,
    block_size=st.integers(1, 9),
    seed=seed_st,
    cuts=st.lists(st.integers(0, 80), max_size=6),
)
def test_incremental_matches_bulk(
    tokens: list[int], block_size: int, seed: int, cuts: list[int]
) -> None:
    """Any split into advances (prefill chunks, single decode blocks): the same chain."""
    seq = SequenceHashes(block_size, seed)
    for cut in [*cuts, *range(len(tokens) + 1)]:
        seq.advance(tokens, min(cut, len(tokens)))
        assert seq.hashes == spec(tokens[: seq.num_tokens], block_size, seed)
    assert seq.hashes == spec(tokens, block_size, seed)
    split = len(tokens) // 2 // block_size * block_size
    head = sequence_hashes(tokens[:split], block_size, seed)
    _, tail = hash_chain(tokens[split:], block_size, seed, head[-1] if head else None)
    assert head + tail == spec(tokens, block_size, seed)
