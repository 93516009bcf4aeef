"""Sequence hashes of a growing token sequence, each full block hashed once, when it completes.

Why: during decode a request gains one token per step; re-hashing the whole prompt each step
would be O(n) per token. ``SequenceHashes`` keeps only the hashes (vLLM's request already holds
the tokens) and chains each new block from the previous block's sequence hash, giving the same
values as ``kvtier.hashing.sequence_hashes``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.hashing import chain_hash, hash_block_bytes, hash_chain, token_bytes

__all__ = ["SequenceHashes"]


class SequenceHashes:
    """Sequence hashes of the full blocks of a growing token sequence held elsewhere."""

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
