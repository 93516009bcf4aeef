"""Argument checks of ``BlockPool``'s verbs, written once for ``register`` and its pre-check.

Why apart: ``register`` and ``check_registration`` (``KvBlockManager.offload`` calls it before
anything moves) share these rules; ``register`` inlines their cheap common case.
"""

from __future__ import annotations

from kvtier.core import slot_table as st

U64_MAX = 2**64 - 1


def check_hash(name: str, value: int | None, *, optional: bool = False) -> None:
    if type(value) is int and 0 <= value <= U64_MAX:  # the common case, checked cheaply
        return
    if value is None and optional:
        return
    raise ValueError(f"{name} must be an int in the u64 range [0, 2**64), got {value!r}")


def check_int(name: str, value: int, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_priority(priority: int) -> None:
    check_int("priority", priority)
    if not st.INT64_MIN <= priority <= st.INT64_MAX:
        raise ValueError(f"priority must fit in 64 bits, got {priority}")


def check_registration(
    sequence_hash: int,
    *,
    parent_sequence_hash: int | None = None,
    block_hash: int | None = None,
    priority: int = 0,
) -> None:
    """Raise (ValueError/TypeError naming it) for any argument ``register`` would refuse.

    Why: a caller that registers only later (when a copy lands) checks first, so bad input
    fails before anything is allocated or moved, not inside ``poll``.
    """
    check_hash("sequence_hash", sequence_hash)
    check_hash("parent_sequence_hash", parent_sequence_hash, optional=True)
    check_hash("block_hash", block_hash, optional=True)
    check_priority(priority)
    if parent_sequence_hash == sequence_hash:
        raise ValueError(f"block {sequence_hash} cannot be its own parent")
