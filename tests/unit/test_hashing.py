"""Hashing pinned against values computed here, independently, from the spec with xxhash+struct."""

from __future__ import annotations

import array
import struct

import numpy as np
import pytest
import xxhash

from kvtier.hashing import (
    block_hashes,
    chain_hash,
    hash_chain,
    salt_hash,
    sequence_hashes,
    token_bytes,
)


def _ref_block(tokens: list[int], seed: int) -> int:
    return xxhash.xxh3_64(struct.pack(f"<{len(tokens)}I", *tokens), seed=seed).intdigest()


def _ref_chain(prev: int, block: int, seed: int) -> int:
    return xxhash.xxh3_64(struct.pack("<Q", prev) + struct.pack("<Q", block), seed=seed).intdigest()


def test_salt_hash_with_nothing_hashes_two_braces() -> None:
    assert salt_hash() == xxhash.xxh3_64(b"{}", seed=0).intdigest()
    assert salt_hash() == xxhash.xxh3_64_intdigest(b"{}")


def test_salt_hash_key_order_and_omission() -> None:
    assert salt_hash("abc") == xxhash.xxh3_64(b'{"salt":"abc"}').intdigest()
    assert salt_hash(lora_name="l1") == xxhash.xxh3_64(b'{"lora_name":"l1"}').intdigest()
    both = b'{"salt":"s","lora_name":"my-lora"}'
    assert salt_hash("s", "my-lora") == xxhash.xxh3_64(both).intdigest()
    assert salt_hash("é") == xxhash.xxh3_64('{"salt":"é"}'.encode()).intdigest()
    assert salt_hash('a"b') == xxhash.xxh3_64(b'{"salt":"a\\"b"}').intdigest()


def test_salt_hash_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="cache_salt"):
        salt_hash(5)  # type: ignore[arg-type]


def test_block_and_sequence_hashes_match_spec() -> None:
    tokens = list(range(100, 100 + 10))  # block_size 4: two full blocks, tail of 2 ignored
    seed = 0
    b0 = _ref_block([100, 101, 102, 103], seed)
    b1 = _ref_block([104, 105, 106, 107], seed)
    assert block_hashes(tokens, 4) == [b0, b1]
    assert sequence_hashes(tokens, 4) == [b0, _ref_chain(b0, b1, seed)]


def test_salted_hashes_use_salt_as_seed() -> None:
    seed = salt_hash("tenant-a")
    tokens = [7, 8, 9, 4_000_000_000, 1, 2]
    b0 = _ref_block([7, 8, 9], seed)
    b1 = _ref_block([4_000_000_000, 1, 2], seed)
    assert block_hashes(tokens, 3, salt_hash=seed) == [b0, b1]
    assert sequence_hashes(tokens, 3, seed) == [b0, _ref_chain(b0, b1, seed)]
    assert sequence_hashes(tokens, 3) != sequence_hashes(tokens, 3, seed)


def test_pinned_literal_values() -> None:
    # Literals computed once with xxhash+struct straight from the spec (not from kvtier): they
    # guard against a dependency change silently moving every stored key.
    assert salt_hash() == 1389868326933519382
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)[0] == 8052976908588476977
    assert sequence_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == [
        8052976908588476977,
        4185132130981121146,
    ]


def test_long_chain_matches_reference() -> None:
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 2**32, size=16 * 50 + 5, dtype=np.uint64).tolist()
    seed = salt_hash(None, "x")
    expected_blocks = [_ref_block(tokens[i : i + 16], seed) for i in range(0, 16 * 50, 16)]
    expected_seqs = [expected_blocks[0]]
    for b in expected_blocks[1:]:
        expected_seqs.append(_ref_chain(expected_seqs[-1], b, seed))
    assert block_hashes(tokens, 16, seed) == expected_blocks
    assert sequence_hashes(tokens, 16, seed) == expected_seqs
    # numpy and array inputs hash identically to lists
    assert sequence_hashes(np.asarray(tokens, dtype=np.uint32), 16, seed) == expected_seqs
    assert sequence_hashes(np.asarray(tokens, dtype=np.int64), 16, seed) == expected_seqs
    assert sequence_hashes(array.array("I", tokens), 16, seed) == expected_seqs
    # continuing a chain from a parent gives the same tail
    blocks, seqs = hash_chain(tokens[16 * 10 :], 16, seed, parent_sequence_hash=expected_seqs[9])
    assert blocks == expected_blocks[10:]
    assert seqs == expected_seqs[10:]
    assert chain_hash(expected_seqs[0], expected_blocks[1], seed) == expected_seqs[1]
    assert chain_hash(None, expected_blocks[0], seed) == expected_seqs[0]


def test_partial_and_empty() -> None:
    assert block_hashes([1, 2, 3], 4) == []
    assert sequence_hashes([], 4) == []
    assert token_bytes([]) == b""
    assert token_bytes(np.zeros(0, dtype=np.int64)) == b""


@pytest.mark.parametrize("bad", [0, -1])
def test_block_size_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="block_size must be > 0"):
        block_hashes([1, 2], bad)
    with pytest.raises(ValueError, match="block_size must be > 0"):
        sequence_hashes([1, 2], bad)


def test_block_size_must_be_int() -> None:
    with pytest.raises(TypeError, match="block_size must be an int"):
        block_hashes([1, 2], 2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, -1], "index 1 is out of the u32 range"),
        ([2**32], "index 0 is out of the u32 range"),
        ([1, 2, 1.5], "index 2 is not an integer"),
        (np.array([0, 2**32], dtype=np.int64), "index 1 is out of the u32 range"),
        (np.array([-3], dtype=np.int32), "index 0 is out of the u32 range"),
    ],
)
def test_bad_tokens_are_named(tokens: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sequence_hashes(tokens, 1)  # type: ignore[arg-type]


def test_bad_token_containers() -> None:
    with pytest.raises(TypeError, match="integer dtype"):
        sequence_hashes(np.array([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="one-dimensional"):
        sequence_hashes(np.zeros((2, 2), dtype=np.int64), 1)
    with pytest.raises(TypeError, match="sequence of ints"):
        sequence_hashes(b"abcd", 1)  # type: ignore[arg-type]


def test_bad_parent_hash() -> None:
    with pytest.raises(ValueError, match="parent_sequence_hash must be None or in the u64 range"):
        hash_chain([1], 1, parent_sequence_hash=-5)


def test_bad_salt_seed() -> None:
    with pytest.raises(ValueError, match="u64 range"):
        sequence_hashes([1], 1, salt_hash=-1)
    with pytest.raises(ValueError, match="u64 range"):
        block_hashes([1], 1, salt_hash=2**64)


def test_hashes_do_not_depend_on_the_process() -> None:
    import subprocess
    import sys

    code = "from kvtier.hashing import sequence_hashes as s; print(s(list(range(64)), 16, 5))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {str(sequence_hashes(list(range(64)), 16, 5)) + "\n"}
