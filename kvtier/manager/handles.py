"""What ``KvBlockManager`` hands its caller: ``KvHandle`` (copies in flight), ``TierMatch``, and
``KvTierStats`` (``stats()``: frozen snapshots of the running ``Tally``).

Why apart: plain return values, read from the caller's thread (``wait_layer`` from any) and by
benchmarks and tests as plain data, apart from the facade and copy jobs that update them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvtier.transfer.handle import TransferError, TransferHandle, TransferPath

__all__ = ["KvHandle", "KvTierStats", "PathCounters", "Tally", "TierHits", "TierMatch"]


class KvHandle:
    """What ``offload`` and ``onboard`` return: the transfer batches of one call (``parts``).

    Owner's thread: ``done()`` (every part applied by ``poll``), ``ok``, ``error`` (a
    ``TransferError``; an onboard's ``failed_device_block_ids`` are to recompute). Any thread:
    ``wait_layer(l)``, ``wait_data()``, ``data_done()``. ``skipped``: offloaded hashes not copied
    from the device (already held or being written, or no room).
    """

    def __init__(
        self,
        parts: Sequence[TransferHandle],
        block_hashes: Sequence[int],
        device_block_ids: Sequence[int],
        num_layers: int,
        skipped: Sequence[int] = (),
    ) -> None:
        self.parts = tuple(parts)
        self.block_hashes = tuple(block_hashes)
        self.device_block_ids = tuple(device_block_ids)
        self.num_layers = num_layers
        self.skipped = tuple(skipped)

    def done(self) -> bool:
        return all(p.done() for p in self.parts)

    @property
    def ok(self) -> bool:
        return self.done() and self.error is None

    @property
    def error(self) -> TransferError | None:
        errors = [p.error for p in self.parts if p.error is not None]
        if not errors:
            return None
        if len(errors) == 1:
            return errors[0]
        return TransferError(
            errors[0].path,
            "; ".join(str(e) for e in errors),
            [h for e in errors for h in e.failed_hashes],
            [d for e in errors for d in e.failed_device_block_ids],
            [h for e in errors for h in e.corrupt_hashes],
        )

    def data_done(self) -> bool:
        return all(p.data_done() for p in self.parts)

    def wait_data(self, timeout: float | None = None) -> bool:
        return all([p.wait_data(timeout) for p in self.parts])

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return all([p.wait_layer(layer, timeout) for p in self.parts])

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"KvHandle({len(self.block_hashes)} blocks, {len(self.parts)} parts, {state})"


class TierMatch:
    """A prefix found in G2 (``host_hashes``, read from ``host_slots``) and then G3
    (``disk_hashes``). The planner pins every block (load ``job``; none for an empty match) until
    ``release()`` or until ``KvBlockManager.onboard``, which takes the pins over."""

    def __init__(
        self,
        job: int,
        host_hashes: list[int],
        host_slots: list[int],
        disk_hashes: list[int],
        trim: Callable[[int, int], None],
    ) -> None:
        self.job = job
        self.host_hashes = host_hashes
        self.host_slots = host_slots
        self.disk_hashes = disk_hashes
        self.num_host, self.num_disk = len(host_hashes), len(disk_hashes)
        self._trim = trim  # the planner's trim_load
        self.released = False

    @property
    def sequence_hashes(self) -> list[int]:
        return self.host_hashes + self.disk_hashes

    def __len__(self) -> int:
        return self.num_host + self.num_disk

    def take(self, n: int) -> None:
        """Hand the pins of the first ``n`` blocks over to an onboard; drop the rest."""
        if self.released:
            raise ValueError("this match was already released or onboarded")
        self.released = True
        if n < len(self):  # an empty match has no load job
            self._trim(self.job, n)

    def release(self) -> None:
        """Drop every pin (idempotent)."""
        if not self.released:
            self.take(0)


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
