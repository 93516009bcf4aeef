"""TokenBlockSequence: incremental hashing equals bulk hashing, each block hashed once."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash

import kvtier.hashing as hashing_mod
from kvtier.hashing import block_hashes, salt_hash, sequence_hashes
from kvtier.tokens import SequenceHashes, TokenBlock, TokenBlockSequence


def _ref_block(tokens: list[int], seed: int) -> int:
    return xxhash.xxh3_64(struct.pack(f"<{len(tokens)}I", *tokens), seed=seed).intdigest()


def test_initial_tokens_split_into_blocks_and_tail() -> None:
    seq = TokenBlockSequence(list(range(10)), block_size=4)
    assert len(seq) == 10
    assert seq.tail == (8, 9)
    b0, b1 = seq.blocks
    assert b0.tokens == (0, 1, 2, 3)
    assert b0.block_hash == _ref_block([0, 1, 2, 3], 0)
    assert b0.sequence_hash == b0.block_hash
    assert b0.parent_sequence_hash is None
    assert b1.tokens == (4, 5, 6, 7)
    assert b1.parent_sequence_hash == b0.sequence_hash
    assert seq.sequence_hashes() == sequence_hashes(list(range(10)), 4)
    assert seq.block_hashes() == block_hashes(list(range(10)), 4)
    assert seq.tokens() == list(range(10))
    assert seq.last_sequence_hash == b1.sequence_hash


def test_append_completes_blocks_incrementally() -> None:
    seed = salt_hash("s")
    seq = TokenBlockSequence(block_size=3, salt_hash=seed)
    assert seq.last_sequence_hash is None
    completed: list[TokenBlock] = []
    for t in range(11):
        done = seq.append(t)
        if done is not None:
            completed.append(done)
    assert [b.tokens for b in completed] == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert [b.sequence_hash for b in completed] == sequence_hashes(list(range(11)), 3, seed)
    assert seq.tail == (9, 10)
    assert seq.blocks == tuple(completed)


def test_extend_matches_bulk_and_hashes_each_block_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hashing_mod.hash_block_bytes

    def counting(data: bytes | memoryview, seed: int = 0) -> int:
        calls.append(bytes(data))
        return real(data, seed)

    monkeypatch.setattr(hashing_mod, "hash_block_bytes", counting)
    seq = TokenBlockSequence([1, 2], block_size=4)
    assert seq.extend([3]) == []
    done = seq.extend(np.array([4, 5, 6, 7, 8, 9], dtype=np.int64))
    assert [b.tokens for b in done] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert seq.extend([]) == []
    seq.append(10)
    assert len(calls) == 2
    assert seq.sequence_hashes() == sequence_hashes(list(range(1, 11)), 4)


def test_bad_tokens_change_nothing() -> None:
    seq = TokenBlockSequence([1, 2, 3], block_size=4)
    with pytest.raises(ValueError, match="index 1 is out of the u32 range"):
        seq.extend([4, -5, 6])
    with pytest.raises(ValueError, match="out of the u32 range"):
        seq.append(2**32)
    with pytest.raises(TypeError, match="token must be an int"):
        seq.append(1.0)  # type: ignore[arg-type]
    assert seq.tokens() == [1, 2, 3]
    assert seq.blocks == ()
    with pytest.raises(ValueError, match="block_size must be > 0"):
        TokenBlockSequence([1], block_size=0)


def test_truncate_rolls_back_blocks_and_tail() -> None:
    seq = TokenBlockSequence(list(range(10)), block_size=4)
    seq.truncate(9)
    assert seq.tail == (8,)
    assert len(seq.blocks) == 2
    seq.truncate(6)
    assert len(seq.blocks) == 1
    assert seq.tail == (4, 5)
    seq.extend([60, 70])
    assert seq.sequence_hashes() == sequence_hashes([0, 1, 2, 3, 4, 5, 60, 70], 4)
    seq.truncate(8)
    assert len(seq) == 8
    seq.truncate(0)
    assert len(seq) == 0
    assert seq.blocks == ()
    with pytest.raises(ValueError, match="cannot truncate to 1 tokens"):
        seq.truncate(1)


def test_sequence_hashes_match_the_batch_hash_whatever_the_advance_steps() -> None:
    # Decode advances one block at a time (a fast path); prefill many at once.
    tokens = [(i * 7919) % 50000 for i in range(16 * 9 + 5)]
    want = sequence_hashes(tokens, 16, 1234)
    for steps in ([len(tokens)], list(range(1, len(tokens) + 1)), [40, 41, 100, 160, 200]):
        seq = SequenceHashes(16, 1234)
        for n in steps:
            seq.advance(tokens, min(n, len(tokens)))
        assert seq.hashes == want and seq.num_tokens == 16 * 9
