"""SequenceHashes: incremental hashing equals bulk hashing, whatever the advance steps."""

from __future__ import annotations

import pytest

from kvtier.hashing import SequenceHashes, sequence_hashes


def test_sequence_hashes_match_the_batch_hash_whatever_the_advance_steps() -> None:
    # Decode advances one block at a time (a fast path); prefill many at once.
    tokens = [(i * 7919) % 50000 for i in range(16 * 9 + 5)]
    want = sequence_hashes(tokens, 16, 1234)
    for steps in ([len(tokens)], list(range(1, len(tokens) + 1)), [40, 41, 100, 160, 200]):
        seq = SequenceHashes(16, 1234)
        for n in steps:
            seq.advance(tokens, min(n, len(tokens)))
        assert seq.hashes == want and seq.num_tokens == 16 * 9


def test_bad_tokens_raise_and_change_nothing() -> None:
    seq = SequenceHashes(4)
    seq.advance([1, 2, 3, 4], 4)
    before = list(seq.hashes)
    with pytest.raises(ValueError, match="out of the u32 range"):
        seq.advance([1, 2, 3, 4, 5, -6, 7, 8], 8)
    with pytest.raises(ValueError, match="out of the u32 range"):
        seq.advance([1, 2, 3, 4, 5, 6, 7, 8, 9, 2**32, 11, 12, 13, 14, 15, 16], 16)
    assert seq.hashes == before and seq.num_tokens == 4
