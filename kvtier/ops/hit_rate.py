"""``SlidingHitRate``: a hit rate per tier over the lookups of the last few seconds.

Why apart: ``kvtier_hit_rate`` (G2/G3) and G4's hit rate both read one; it is thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class SlidingHitRate:
    """Hit rate per tier over the lookups of the last ``window_s`` seconds.

    Each lookup adds (time, blocks looked up, blocks matched per tier); old entries fall out when
    the rate is read. With no lookup in the window the rate is 0.0 (nothing was served).
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: deque[tuple[float, int, dict[str, int]]] = deque()

    def add(self, looked_up: int, matched: dict[str, int]) -> None:
        """Record one lookup of ``looked_up`` blocks, of which ``matched[tier]`` came from tier."""
        with self._lock:
            self._entries.append((self._clock(), looked_up, dict(matched)))

    def rate(self, tier: str) -> float:
        """Matched blocks of ``tier`` / looked-up blocks, within the window."""
        with self._lock:
            horizon = self._clock() - self._window_s
            while self._entries and self._entries[0][0] < horizon:
                self._entries.popleft()
            total = sum(e[1] for e in self._entries)
            hits = sum(e[2].get(tier, 0) for e in self._entries)
        return hits / total if total else 0.0
