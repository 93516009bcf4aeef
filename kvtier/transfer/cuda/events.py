"""Typed wrappers over ``torch.cuda`` events and streams, shared by the CUDA engine's parts.

Why this exists: torch's CUDA event and stream calls are untyped; wrapping them once keeps
``mypy --strict`` clean everywhere else without a ``type: ignore`` at each call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["new_event", "new_stream", "query", "record_through"]


def new_event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def query(event: torch.cuda.Event) -> bool:
    return bool(event.query())  # type: ignore[no-untyped-call]


def new_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]


def record_through(events: Sequence[torch.cuda.Event] | None, upto: int, through: int) -> int:
    """Record ``events[upto..through]`` on the current stream; returns the next to record."""
    if events is not None:
        while upto <= through:
            events[upto].record()
            upto += 1
    return upto
