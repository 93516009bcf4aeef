"""Block states and the handles through which callers own pool slots.

Why handles: whoever holds a slot drives its life (below). A ``MutableBlock`` is exclusive and fills
its slot; an ``ImmutableBlock`` is one counted reference to a registered, shareable block. Each
handle is released once (explicitly or by ``with``): a second release raises instead of underflowing
a reference count. A released handle knows only its block id: the slot may hold another block now.

A slot's states::

            allocate()              append_tokens (full) / mark_complete()
  [free] ------------> RESET ---------------------------------------------> COMPLETE
    ^                    |  append_tokens (not full)                      ^      |
    |                    v                                                |      | register(h)
    |                 PARTIAL --- append_tokens (full) / mark_complete() -+      v
    |                                                                   REGISTERED (immutable)
    |   release() of a MutableBlock (any mutable state); register() of a     |  refs > 0: active
    +-- duplicate hash (dedup frees it); eviction or remove() of an inactive  |  refs = 0: inactive,
        REGISTERED block; last release() of a removed one <------------------+  still matchable

Anything else raises ``BlockStateError`` (registering a non-COMPLETE block, appending past the
block size or to a COMPLETE block, marking a COMPLETE block complete) and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from kvtier.core import slot_table as st
from kvtier.core.errors import BlockStateError, PoolError

if TYPE_CHECKING:
    from kvtier.core.pool import BlockPool

__all__ = ["BlockState", "ImmutableBlock", "ImmutableBlockGroup", "MutableBlock"]


class BlockState(enum.Enum):
    """Life of a slot. RESET = empty; REGISTERED = immutable, shareable, matchable."""

    RESET = "reset"
    PARTIAL = "partial"
    COMPLETE = "complete"
    REGISTERED = "registered"


_MUTABLE_STATES = {
    st.RESET: BlockState.RESET,
    st.PARTIAL: BlockState.PARTIAL,
    st.COMPLETE: BlockState.COMPLETE,
}


class _Owned:
    """What every handle shares: its pool, whether it is still held, release and ``with``."""

    __slots__ = ("_alive", "_pool")

    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._alive = True

    @property
    def alive(self) -> bool:
        """False once released (or, for a MutableBlock, consumed by ``register``)."""
        return self._alive

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


class _Handle(_Owned):
    __slots__ = ("_block_id",)

    def __init__(self, pool: BlockPool, block_id: int) -> None:
        super().__init__(pool)
        self._block_id = block_id

    @property
    def block_id(self) -> int:
        """The slot this handle is (or was) for; the data plane indexes its storage with it."""
        return self._block_id

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._pool._slots.tokens.get(self._live_id(), ())

    def _live_id(self) -> int:
        if not self._alive:
            raise PoolError(f"{type(self).__name__} for block {self.block_id} was already released")
        return self.block_id


class MutableBlock(_Handle):
    """Exclusive ownership of a slot being filled (RESET, PARTIAL or COMPLETE)."""

    __slots__ = ()

    def __repr__(self) -> str:
        state = self.state.name if self._alive else "released"
        return f"MutableBlock(block_id={self.block_id}, {state})"

    @property
    def state(self) -> BlockState:
        return _MUTABLE_STATES[self._pool._slots.state[self._live_id()]]

    def _check_fillable(self, block_id: int, refused: str) -> None:
        """Raise unless RESET or PARTIAL; the block id fills ``refused``'s ``{}`` only then."""
        if self._pool._slots.state[block_id] not in (st.RESET, st.PARTIAL):
            raise BlockStateError(f"cannot {refused.format(block_id)} in state {self.state.name}")

    def append_tokens(self, tokens: Iterable[int]) -> None:
        """Add tokens: RESET/PARTIAL -> PARTIAL, or COMPLETE once the block is full. Overfilling
        raises and leaves the block unchanged."""
        block_id, new = self._live_id(), tuple(tokens)
        self._check_fillable(block_id, "append tokens to block {}")
        slots, size = self._pool._slots, self._pool._block_size
        filled = slots.tokens.get(block_id, ()) + new
        if len(filled) > size:
            room = size - len(filled) + len(new)
            raise BlockStateError(
                f"block {block_id} has room for {room} more tokens, got {len(new)}"
            )
        if filled:
            slots.tokens[block_id] = filled
            slots.state[block_id] = st.COMPLETE if len(filled) == size else st.PARTIAL

    def mark_complete(self) -> None:
        """RESET/PARTIAL -> COMPLETE, for storage tiers whose content is bytes, not tokens."""
        block_id = self._live_id()
        self._check_fillable(block_id, "mark block {} complete")
        self._pool._slots.state[block_id] = st.COMPLETE

    def reset(self) -> None:
        """Back to RESET (contents discarded), keeping ownership of the slot."""
        block_id = self._live_id()
        self._pool._slots.tokens.pop(block_id, None)
        self._pool._slots.state[block_id] = st.RESET


class ImmutableBlock(_Handle):
    """One counted reference to a REGISTERED block; several may exist for one block."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"ImmutableBlock(block_id={self.block_id}, alive={self._alive})"

    @property
    def state(self) -> BlockState:
        return BlockState.REGISTERED

    @property
    def sequence_hash(self) -> int:
        return self._pool._slots.seq[self._live_id()]

    @property
    def parent_sequence_hash(self) -> int | None:
        return self._pool._slots.parent_of(self._live_id())

    @property
    def block_hash(self) -> int | None:
        return self._pool._slots.block_hash.get(self._live_id())

    @property
    def priority(self) -> int:
        return self._pool._slots.prio[self._live_id()]


class ImmutableBlockGroup(_Owned):
    """One reference on each block of a matched prefix (``BlockPool.match_group``), taken and
    released together, with ``match``'s semantics. Why: a long prompt matches thousands of blocks,
    and one handle object per block is most of the cost of ``match``."""

    __slots__ = ("_block_ids",)

    def __init__(self, pool: BlockPool, block_ids: list[int]) -> None:
        super().__init__(pool)
        self._block_ids = block_ids

    def __repr__(self) -> str:
        return f"ImmutableBlockGroup({len(self._block_ids)} blocks, alive={self._alive})"

    def __len__(self) -> int:
        return len(self._block_ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self._block_ids)

    @property
    def block_ids(self) -> tuple[int, ...]:
        """Block ids of the matched prefix, in prefix order."""
        return tuple(self._block_ids)

    @property
    def sequence_hashes(self) -> list[int]:
        seq = self._pool._slots.seq
        return [seq[i] for i in self._live_ids()]

    def _live_ids(self) -> list[int]:
        if not self._alive:
            raise PoolError("ImmutableBlockGroup was already released")
        return self._block_ids
