"""The manager's counters: per transfer path, per tier's prefix lookups, skipped offloads.

Why a file of its own: ``stats()`` is read by benchmarks and tests as plain data (frozen
snapshots), apart from the facade and copy jobs that update it (``Tally``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvtier.transfer.manager import TransferPath

__all__ = ["KvTierStats", "PathCounters", "Tally", "TierHits"]


@dataclass(frozen=True)
class PathCounters:
    """Totals of one transfer path: blocks and bytes that arrived, seconds spent, blocks failed."""

    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed_blocks: int = 0


@dataclass(frozen=True)
class TierHits:
    """Prefix-lookup totals of one tier: blocks found, and blocks asked for but not found."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class KvTierStats:
    """A snapshot of the manager's counters (``paths`` keyed by ``TransferPath.value``)."""

    paths: Mapping[str, PathCounters]
    host: TierHits
    disk: TierHits
    filter_rejections: int
    skipped_offloads: int


@dataclass
class Tally:
    """The running counters behind ``KvBlockManager.stats()``."""

    paths: dict[str, PathCounters] = field(
        default_factory=lambda: {p.value: PathCounters() for p in TransferPath}
    )
    host: TierHits = TierHits()
    disk: TierHits = TierHits()
    skipped: int = 0

    def lookup(self, n: int, host: int | None, disk: int | None) -> None:
        """A lookup of ``n`` blocks found ``host`` in G2, then ``disk`` in G3 (None: no tier)."""
        if host is not None:
            self.host = TierHits(self.host.hits + host, self.host.misses + n - host)
        if disk is not None:
            self.disk = TierHits(self.disk.hits + disk, self.disk.misses + n - (host or 0) - disk)

    def transfer(self, path: str, blocks: int, nbytes: int, seconds: float, failed: int) -> None:
        c = self.paths[path]
        total = (c.blocks + blocks, c.bytes + nbytes, c.seconds + seconds, c.failed_blocks + failed)
        self.paths[path] = PathCounters(*total)

    def snapshot(self, filter_rejections: int) -> KvTierStats:
        return KvTierStats(dict(self.paths), self.host, self.disk, filter_rejections, self.skipped)
