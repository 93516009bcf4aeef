"""A token sequence cut into fixed-size blocks, hashed incrementally as it grows.

Why: during decode a request gains one token per step; re-hashing the whole prompt each step
would be O(n) per token. ``TokenBlockSequence`` hashes each block exactly once, when it
completes, chaining from the previous block's sequence hash (same values as
``kvtier.hashing.sequence_hashes``). ``SequenceHashes`` is the lean form the vLLM scheduler half
uses (hashes only, no copies of the tokens: vLLM's request already holds them), one batch
``kvtier.hashing.hash_chain`` call per advance.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kvtier import hashing
from kvtier.hashing import TOKEN_MAX, chain_hash, hash_chain, token_bytes

__all__ = ["SequenceHashes", "TokenBlock", "TokenBlockSequence"]


@dataclass(frozen=True, slots=True)
class TokenBlock:
    """One full block: its tokens and its identity in the hash chain."""

    tokens: tuple[int, ...]
    block_hash: int
    sequence_hash: int
    parent_sequence_hash: int | None


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
            block = hashing.hash_block_bytes(
                token_bytes(tokens[self.num_tokens : full]), self.salt_hash
            )
            self.hashes.append(chain_hash(self.hashes[-1], block, self.salt_hash))
            self.num_tokens = full
            return
        parent = self.hashes[-1] if self.hashes else None
        _, seqs = hash_chain(list(tokens[self.num_tokens : full]), bs, self.salt_hash, parent)
        self.hashes.extend(seqs)
        self.num_tokens = full


class TokenBlockSequence:
    """Tokens of one request, as completed (hashed) blocks plus a partial tail (never hashed)."""

    def __init__(
        self,
        tokens: Sequence[int] | np.ndarray | array.array[int] = (),
        *,
        block_size: int,
        salt_hash: int = 0,
    ) -> None:
        hashes = hash_chain(tokens, block_size, salt_hash)  # validates everything
        self._block_size = block_size
        self._salt_hash = salt_hash
        flat = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
        self._blocks: list[TokenBlock] = []
        parent: int | None = None
        for i, (bh, sh) in enumerate(zip(*hashes, strict=True)):
            chunk = tuple(flat[i * block_size : (i + 1) * block_size])
            self._blocks.append(TokenBlock(chunk, bh, sh, parent))
            parent = sh
        self._tail: list[int] = flat[len(self._blocks) * block_size :]

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def salt_hash(self) -> int:
        return self._salt_hash

    @property
    def blocks(self) -> tuple[TokenBlock, ...]:
        """Completed blocks, in order."""
        return tuple(self._blocks)

    @property
    def tail(self) -> tuple[int, ...]:
        """Tokens of the partial last block (fewer than ``block_size``)."""
        return tuple(self._tail)

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * self._block_size + len(self._tail)

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def last_sequence_hash(self) -> int | None:
        """Sequence hash of the last completed block, None when there is none."""
        return self._blocks[-1].sequence_hash if self._blocks else None

    def sequence_hashes(self) -> list[int]:
        return [b.sequence_hash for b in self._blocks]

    def block_hashes(self) -> list[int]:
        return [b.block_hash for b in self._blocks]

    def tokens(self) -> list[int]:
        out: list[int] = []
        for b in self._blocks:
            out.extend(b.tokens)
        out.extend(self._tail)
        return out

    def append(self, token: int) -> TokenBlock | None:
        """Add one token; returns the block it completed, if any."""
        if isinstance(token, bool) or not isinstance(token, int | np.integer):
            raise TypeError(f"token must be an int, got {type(token).__name__}")
        if not 0 <= int(token) <= TOKEN_MAX:
            raise ValueError(f"token {int(token)} is out of the u32 range [0, 2**32)")
        self._tail.append(int(token))
        if len(self._tail) < self._block_size:
            return None
        return self._complete_tail()

    def extend(self, tokens: Iterable[int]) -> list[TokenBlock]:
        """Add many tokens; returns the blocks they completed, in order.

        All tokens are validated before any is added, so bad input changes nothing.
        """
        new = list(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)
        token_bytes(new)  # validation only
        done: list[TokenBlock] = []
        for t in new:
            self._tail.append(int(t))
            if len(self._tail) == self._block_size:
                done.append(self._complete_tail())
        return done

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens (e.g. rejected speculative tokens)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(
                f"cannot truncate to {num_tokens} tokens: sequence has {self.num_tokens}"
            )
        full, rest = divmod(num_tokens, self._block_size)
        if full < len(self._blocks):
            self._tail = list(self._blocks[full].tokens[:rest])
            del self._blocks[full:]
        else:
            del self._tail[rest:]

    def _complete_tail(self) -> TokenBlock:
        chunk = tuple(self._tail)
        bh = hashing.hash_block_bytes(token_bytes(chunk), self._salt_hash)
        parent = self.last_sequence_hash
        block = TokenBlock(chunk, bh, chain_hash(parent, bh, self._salt_hash), parent)
        self._blocks.append(block)
        self._tail = []
        return block
