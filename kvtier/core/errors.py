"""Errors of the control plane: each names what was wrong, so a caller can fix its input."""

from __future__ import annotations

__all__ = ["BlockStateError", "InvariantError", "PoolError", "RegistryError"]


class PoolError(RuntimeError):
    """A pool operation was used wrongly (foreign or dead handle, slot not free, hash present)."""


class BlockStateError(PoolError):
    """An illegal block state transition (e.g. registering a block that is not COMPLETE)."""


class RegistryError(RuntimeError):
    """The tier registry was told something inconsistent (e.g. a tier storing a hash twice)."""


class InvariantError(AssertionError):
    """``check_invariants()`` found internal structures that disagree; the message names which."""
