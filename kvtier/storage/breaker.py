"""``CircuitBreaker``: stop talking to a sick remote tier for a while, then probe it again.

Why this exists: when the G4 server is down or slow, every request that touches it would pay a
timeout. After ``failures`` consecutive failures the breaker opens: calls are refused at once (no
I/O, a G4 miss) for ``cooldown_s``; then one probe is let through (half open): success closes the
breaker, failure opens it again. Only G4 goes through it; G2/G3 never wait on it. Thread-safe
(the worker's fetch and write-behind threads share one). Pure Python.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState:
    """The three states, as the strings metrics and logs use."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a cooldown (see the module docstring)."""

    def __init__(
        self,
        failures: int = 3,
        cooldown_s: float = 2.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures <= 0 or cooldown_s < 0:
            raise ValueError(
                f"CircuitBreaker needs failures >= 1 and cooldown_s >= 0, got "
                f"{failures}, {cooldown_s}"
            )
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False
        self.trips = 0
        """How many times the breaker opened (for metrics)."""

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """May a call go out now? In the half-open state only one probe at a time does."""
        with self._lock:
            state = self._state()
            if state == BreakerState.CLOSED:
                return True
            if state == BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._probing = False

    def failure(self) -> bool:
        """Record a failed call; True when this failure opened (or re-opened) the breaker."""
        with self._lock:
            self._consecutive += 1
            reopen = self._probing or (
                self._opened_at is None and self._consecutive >= self.failures
            )
            self._probing = False
            if reopen:
                self._opened_at = self._clock()
                self.trips += 1
            return reopen
