"""The manager's copy jobs: the planner's choices as transfer batches, their outcomes reported back.

Why: ``TierPlanner`` decides, ``TransferManager`` moves bytes; this glue, in one process, submits
a batch per path, and when ``poll`` settles one reports each block (commit or abort a store, unpin
a load, forget a bad G3 block), starts G3 writes whose G2 copy landed, deletes the G3 files the
planner let go, and counts blocks, bytes and seconds per path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.manager.handles import KvHandle, Tally, TierMatch
from kvtier.plan.planner import G2, G3, TierPlanner
from kvtier.storage.disk import DiskStorage
from kvtier.storage.layout import KvLayout
from kvtier.transfer.manager import TransferHandle, TransferManager, TransferPath

if TYPE_CHECKING:
    from kvtier.ops.metrics import KvTierMetrics

__all__ = ["Copies"]

_Write = tuple[int, int, "int | None", int]
"""A G3 write from G2: (sequence hash, G2 slot, parent, priority)."""


@dataclass
class _Load:
    job: int  # the planner's load job
    parts: int  # its batches not settled yet


@dataclass
class _Copy:
    tier: str  # a store into this tier, or "" for a load
    load: _Load | None = None


class Copies:
    """Copy jobs of one ``KvBlockManager`` (owner's thread only)."""

    def __init__(
        self,
        planner: TierPlanner,
        transfers: TransferManager,
        disk: DiskStorage | None,
        *,
        layout: KvLayout,
        tally: Tally,
        metrics: KvTierMetrics | None = None,
    ) -> None:
        self.planner = planner
        self.transfers = transfers
        self.disk = disk
        self.block_bytes, self.num_layers = layout.block_bytes, layout.model.num_layers
        self.tally = tally  # the manager's counters, updated in place
        self.metrics = metrics
        self.jobs: dict[TransferHandle, _Copy] = {}
        self._after_host: dict[int, tuple[int, int | None, int]] = {}  # G3 writes awaiting G2

    def store(
        self,
        device_block_ids: Sequence[int],
        hashes: Sequence[int],
        parents: list[int | None],
        priority: int,
        gate: object | None,
    ) -> KvHandle:
        """Plan and submit the stores of an offload (arguments already checked); the handle's
        ``skipped`` are the blocks not copied from the device."""
        store, ready = self.planner.store, self.planner.host.lookup
        to_host: list[int] = []  # indices copied device -> host, and their G2 slots
        host_slots: list[int] = []
        to_disk: list[int] = []  # indices copied device -> disk (no G2, or no room in it)
        from_host: list[_Write] = []
        for i, h in enumerate(hashes):
            c = store(h, parents[i], priority)
            if c.host_slot is not None:
                to_host.append(i)
                host_slots.append(c.host_slot)
            if not c.disk_write:
                continue
            if c.disk_host_slot < 0:
                to_disk.append(i)
            elif c.host_slot is None and ready(h) is not None:
                from_host.append((h, c.disk_host_slot, parents[i], priority))
            else:  # its G2 copy is in flight: written once that lands (``settle``)
                self._after_host[h] = (c.disk_host_slot, parents[i], priority)
        self.flush_deletes()
        parts = []
        for tier, path, picked, slots in (
            (G2, TransferPath.DEVICE_TO_HOST, to_host, host_slots),
            (G3, TransferPath.DEVICE_TO_DISK, to_disk, []),
        ):
            if picked:
                sub = [hashes[i] for i in picked]
                dids = [device_block_ids[i] for i in picked]
                heads = ([parents[i] for i in picked], [priority] * len(picked))
                part = self._submit(tier, path, sub, dids, slots, headers=heads, gate=gate)
                parts.append(part)
        self._write_from_host(from_host)
        moved = sorted(to_host + to_disk) if to_disk else to_host
        dids = [device_block_ids[i] for i in moved]
        if len(moved) == len(hashes):
            return KvHandle(parts, hashes, dids, self.num_layers)
        kept = set(moved)
        skipped = [h for i, h in enumerate(hashes) if i not in kept]
        self.tally.skipped += len(skipped)
        return KvHandle(parts, [hashes[i] for i in moved], dids, self.num_layers, skipped)

    def pin_prefix(self, hashes: Sequence[int]) -> TierMatch:
        """The planner's G2-then-G3 prefix of ``hashes``, pinned as one load job."""
        planner = self.planner
        host_end, end = planner.match(hashes, 0, len(hashes))
        self.flush_deletes()
        host, disk = list(hashes[:host_end]), list(hashes[host_end:end])
        job, slots = planner.begin_load("", host, disk) if end else (-1, [])
        return TierMatch(job, host, slots, disk, planner.trim_load)

    def load(self, match: TierMatch, device_block_ids: list[int], gate: object | None) -> KvHandle:
        """Onboard the first ``len(device_block_ids)`` blocks of ``match`` (checked), taking
        over its pins: G2 ones first, then G3 ones. A G2 block read again is a sighting for
        the frequency filter, so maybe a G3 write."""
        n = len(device_block_ids)
        match.take(n)
        nh = min(n, match.num_host)
        host, disk = match.host_hashes[:nh], match.disk_hashes[: n - nh]
        host_slots = match.host_slots[:nh]
        load = _Load(match.job, bool(host) + bool(disk))
        parts = [
            self._submit("", path, hs, src, dids, gate=gate, load=load)
            for path, hs, src, dids in (
                (TransferPath.HOST_TO_DEVICE, host, host_slots, device_block_ids[:nh]),
                (TransferPath.DISK_TO_DEVICE, disk, [], device_block_ids[nh:]),
            )
            if hs
        ]
        writes = [(h, *w) for h in host if (w := self.planner.host_read(h)) is not None]
        self.flush_deletes()
        self._write_from_host(writes)
        return KvHandle(parts, host + disk, device_block_ids, self.num_layers)

    def settle(self, parts: Sequence[TransferHandle], *, closing: bool = False) -> None:
        """Report settled batches; start the G3 writes they allow (``closing``: fail them)."""
        landed: list[_Write] = []
        for part in parts:
            landed.extend(self._apply(part))
        if closing:
            self._fail_writes([w[0] for w in landed] + list(self._after_host))
            self._after_host.clear()
            return
        self.flush_deletes()
        self._write_from_host(landed)

    def flush_deletes(self) -> None:
        """Delete the G3 files the planner let go (evicted, or beyond G3's size at restore),
        before any new write of the same name; a hash held again keeps its file."""
        gone = self.planner.take_deletes()
        if gone and self.disk is not None:
            for h in gone:
                if h not in self.planner.disk:
                    self.disk.remove(h)

    def _submit(
        self,
        tier: str,
        path: TransferPath,
        *ids: list[int],
        headers: tuple[list[int | None], list[int]] | None = None,
        gate: object | None = None,
        load: _Load | None = None,
    ) -> TransferHandle:
        """Submit one batch (hashes, source ids, target ids); ``headers`` (parents, priorities)
        go into G3 block files."""
        pars, prios = headers if headers is not None else (None, None)
        part = self.transfers.submit(path, *ids, parents=pars, priorities=prios, gate=gate)
        self.jobs[part] = _Copy(tier, load)
        return part

    def _write_from_host(self, writes: list[_Write]) -> None:
        """Submit the G3 writes the planner made from G2 blocks (pinned until reported)."""
        if writes:
            hashes, slots, parents, prios = map(list, zip(*writes, strict=True))
            path = TransferPath.HOST_TO_DISK
            self._submit(G3, path, hashes, slots, [], headers=(parents, prios))

    def _fail_writes(self, hashes: Sequence[int]) -> None:
        """Report G3 writes failed; a file of their name is another process's: not deleted."""
        if hashes:
            self.flush_deletes()
            for h in hashes:
                self.planner.store_reported(G3, h, ok=False)
            self.planner.take_deletes()

    def _apply(self, part: TransferHandle) -> list[_Write]:
        """Report one settled batch to the planner; returns the G3 writes it lets start."""
        copy = self.jobs.pop(part, None)
        if copy is None:
            return []
        bad = set(part.error.failed_hashes) if part.error is not None else set()
        failed = [h for h in part.block_hashes if h in bad] if bad else []
        self._count(part, len(failed))
        planner = self.planner
        if copy.load is not None:
            from_disk = part.path is TransferPath.DISK_TO_DEVICE
            for h in failed if from_disk else ():
                planner.disk_bad(h)  # missing or corrupt: forgotten, never served again
            if failed and self.metrics is not None:
                self.metrics.record_load_errors("disk" if from_disk else "host", len(failed))
            copy.load.parts -= 1
            if not copy.load.parts:
                planner.load_reported(copy.load.job)
            return []
        if copy.tier == G3:
            for h in part.block_hashes:
                if h not in bad:
                    planner.store_reported(G3, h, ok=True)
            self._fail_writes(failed)
            return []
        landed: list[_Write] = []
        dropped: list[int] = []
        for h in part.block_hashes:
            ok = h not in bad
            planner.store_reported(G2, h, ok=ok)
            w = self._after_host.pop(h, None)
            if w is not None:
                if ok:
                    landed.append((h, *w))
                else:
                    dropped.append(h)
        self._fail_writes(dropped)
        return landed

    def _count(self, part: TransferHandle, nfailed: int) -> None:
        key = part.path.value
        ok = part.num_blocks - nfailed
        nbytes = ok * self.block_bytes
        seconds = part.seconds or 0.0
        self.tally.transfer(key, ok, nbytes, seconds, nfailed)
        if self.metrics is not None and part.num_blocks:
            self.metrics.record_transfer(key, ok, nbytes, seconds)
