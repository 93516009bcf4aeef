"""Block states and the handles through which callers own pool slots.

Why handles: a slot's life (Reset -> Partial -> Complete -> Registered) is driven by whoever
holds it. A ``MutableBlock`` is exclusive and fillable; an ``ImmutableBlock`` is one counted
reference to a registered, shareable block. Each handle is released exactly once (explicitly or
by ``with``); a second release raises instead of silently underflowing a reference count.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

from kvtier.core.errors import BlockStateError, PoolError

if TYPE_CHECKING:
    from kvtier.core.pool import BlockPool

__all__ = ["BlockState", "ImmutableBlock", "MutableBlock"]


class BlockState(enum.Enum):
    """Life of a slot. RESET = free/empty; REGISTERED = immutable, shareable, matchable."""

    RESET = "reset"
    PARTIAL = "partial"
    COMPLETE = "complete"
    REGISTERED = "registered"


@dataclass(slots=True, eq=False)
class Slot:
    """Pool-private metadata of one non-free slot (free slots have no record at all)."""

    block_id: int
    state: BlockState = BlockState.RESET
    tokens: tuple[int, ...] = ()  # a tuple: not tracked by the GC, unlike a list per slot
    sequence_hash: int = 0
    parent_sequence_hash: int | None = None
    block_hash: int | None = None
    priority: int = 0
    ref_count: int = 0
    release_tick: int = 0
    linked: bool = False  # registered and findable by its sequence hash


class _Handle:
    __slots__ = ("_alive", "_pool", "_slot")

    def __init__(self, pool: BlockPool, slot: Slot) -> None:
        self._pool = pool
        self._slot = slot
        self._alive = True

    @property
    def block_id(self) -> int:
        return self._slot.block_id

    @property
    def alive(self) -> bool:
        """False once released (or, for a MutableBlock, consumed by ``register``)."""
        return self._alive

    def _check_alive(self) -> Slot:
        if not self._alive:
            raise PoolError(f"{type(self).__name__} for block {self.block_id} was already released")
        return self._slot

    def release(self) -> None:
        self._pool.release(self)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._alive:
            self.release()


class MutableBlock(_Handle):
    """Exclusive ownership of a slot being filled (RESET, PARTIAL or COMPLETE)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"MutableBlock(block_id={self.block_id}, state={self._slot.state.name})"

    @property
    def state(self) -> BlockState:
        return self._slot.state

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._slot.tokens

    @property
    def block_size(self) -> int:
        return self._pool.block_size

    def append_tokens(self, tokens: Iterable[int]) -> None:
        """Add tokens: RESET/PARTIAL -> PARTIAL, or COMPLETE once the block is full.

        Overfilling raises and leaves the block unchanged.
        """
        slot = self._check_alive()
        new = tuple(tokens)
        if slot.state not in (BlockState.RESET, BlockState.PARTIAL):
            raise BlockStateError(
                f"cannot append tokens to block {slot.block_id} in state {slot.state.name}"
            )
        room = self._pool.block_size - len(slot.tokens)
        if len(new) > room:
            raise BlockStateError(
                f"block {slot.block_id} has room for {room} more tokens, got {len(new)}"
            )
        slot.tokens += new
        if len(slot.tokens) == self._pool.block_size:
            slot.state = BlockState.COMPLETE
        elif slot.tokens:
            slot.state = BlockState.PARTIAL

    def mark_complete(self) -> None:
        """RESET/PARTIAL -> COMPLETE, for storage tiers whose content is bytes, not tokens."""
        slot = self._check_alive()
        if slot.state not in (BlockState.RESET, BlockState.PARTIAL):
            raise BlockStateError(
                f"cannot mark block {slot.block_id} complete in state {slot.state.name}"
            )
        slot.state = BlockState.COMPLETE

    def reset(self) -> None:
        """Back to RESET (contents discarded), keeping ownership of the slot."""
        slot = self._check_alive()
        slot.tokens = ()
        slot.state = BlockState.RESET


class ImmutableBlock(_Handle):
    """One counted reference to a REGISTERED block; several may exist for one block."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"ImmutableBlock(block_id={self.block_id}, sequence_hash={self.sequence_hash})"

    @property
    def state(self) -> BlockState:
        return BlockState.REGISTERED

    @property
    def sequence_hash(self) -> int:
        return self._slot.sequence_hash

    @property
    def parent_sequence_hash(self) -> int | None:
        return self._slot.parent_sequence_hash

    @property
    def block_hash(self) -> int | None:
        return self._slot.block_hash

    @property
    def priority(self) -> int:
        return self._slot.priority

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._slot.tokens
