"""The G2 -> G3 frequency filter: only blocks seen more than once are written to disk.

Why: writing every host block to disk wears the SSD out and costs bandwidth for blocks that are
never reused. As in Dynamo KVBM, each sighting of a sequence hash sets its count to 1 (first time,
or after it decayed to 0) or doubles it; every ``decay_interval_s`` (600 s), all counts drop by 1;
a block is offloaded once its count reaches ``min_frequency`` (2: seen twice before decaying).

Decay is computed lazily per entry from whole intervals elapsed since the filter's first use, which
equals decrementing every entry at each interval boundary, without a timer thread. The clock is
injected (tests drive it by hand); the filter can be switched off (then everything passes).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FrequencyFilter", "FrequencyFilterConfig"]

_MAX_COUNT = 1 << 30


@dataclass(frozen=True)
class FrequencyFilterConfig:
    enabled: bool = True
    min_frequency: int = 2
    decay_interval_s: float = 600.0
    max_entries: int = 1_000_000

    def __post_init__(self) -> None:
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if not (math.isfinite(self.decay_interval_s) and self.decay_interval_s > 0):
            raise ValueError(f"decay_interval_s must be finite, > 0; got {self.decay_interval_s}")
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {self.max_entries}")


class FrequencyFilter:
    """Counts sightings of sequence hashes; ``should_offload`` records one and decides."""

    def __init__(
        self,
        config: FrequencyFilterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config if config is not None else FrequencyFilterConfig()
        self._clock = clock
        self._origin: float | None = None  # time of first use; decay epochs count from here
        self._entries: OrderedDict[int, tuple[int, int]] = OrderedDict()  # hash -> (count, epoch)
        self.rejections = 0
        """Sightings ``should_offload`` turned away (cumulative): the filter-rejection metric."""

    @property
    def config(self) -> FrequencyFilterConfig:
        return self._config

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def __len__(self) -> int:
        return len(self._entries)

    def _epoch(self) -> int:
        now = self._clock()
        if self._origin is None:
            self._origin = now
        return max(0, int((now - self._origin) // self._config.decay_interval_s))

    @staticmethod
    def _decayed(entry: tuple[int, int] | None, epoch: int) -> int:
        if entry is None:
            return 0
        count, since = entry
        return max(0, count - (epoch - since))

    def count(self, sequence_hash: int) -> int:
        """Current (decayed) count, without recording a sighting."""
        return self._decayed(self._entries.get(sequence_hash), self._epoch())

    def should_offload(self, sequence_hash: int) -> bool:
        """Record a sighting of ``sequence_hash``; True when it is now frequent enough."""
        if not self._config.enabled:
            return True
        epoch = self._epoch()
        entries = self._entries
        current = self._decayed(entries.pop(sequence_hash, None), epoch)
        count = 1 if current == 0 else min(current * 2, _MAX_COUNT)
        entries[sequence_hash] = (count, epoch)
        while entries:  # drop decayed entries from the stale end, then enforce the bound
            oldest = next(iter(entries.items()))
            if self._decayed(oldest[1], epoch) > 0 and len(entries) <= self._config.max_entries:
                break
            entries.popitem(last=False)
        if count >= self._config.min_frequency:
            return True
        self.rejections += 1
        return False
