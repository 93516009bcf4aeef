"""The manager's counters as frozen snapshots: per transfer path, per tier's prefix lookups.

Why a file of its own: ``stats()`` is read by benchmarks and tests as plain data, apart from the
facade that updates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KvTierStats", "PathCounters", "TierHits"]


@dataclass(frozen=True)
class PathCounters:
    """Totals of one transfer path: blocks and bytes that arrived, seconds spent, blocks failed."""

    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed_blocks: int = 0

    def add(self, blocks: int, nbytes: int, seconds: float, failed: int) -> PathCounters:
        return PathCounters(
            self.blocks + blocks,
            self.bytes + nbytes,
            self.seconds + seconds,
            self.failed_blocks + failed,
        )


@dataclass(frozen=True)
class TierHits:
    """Prefix-lookup totals of one tier: blocks found, and blocks asked for but not found."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def add(self, hits: int, misses: int) -> TierHits:
        return TierHits(self.hits + hits, self.misses + misses)


@dataclass(frozen=True)
class KvTierStats:
    """A snapshot of the manager's counters (``paths`` keyed by ``TransferPath.value``)."""

    paths: Mapping[str, PathCounters]
    host: TierHits
    disk: TierHits
    filter_rejections: int
    skipped_offloads: int
