"""The three tiers as pairs of a control-plane ``BlockPool`` and the storage holding its bytes.

Why this exists: a pool decides which slot holds which sequence hash; a storage holds the slot's
bytes. Keeping the pair in one small object lets the facade hand out "the host pool" as one thing
and keeps slot ids and byte rows from drifting apart. ``TierMatch`` is a cross-tier prefix match.
The pairs are composition, so they live here beside ``KvBlockManager`` and not in
``kvtier/storage/``, which imports nothing of the control plane's pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.core.block import ImmutableBlock
from kvtier.core.pool import BlockPool
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage
from kvtier.storage.host import HostStorage

__all__ = ["DevicePool", "DiskPool", "HostPool", "TierMatch"]


@dataclass
class DevicePool:
    """G1: slot i of ``pool`` is block i of the engine's (or kvtier's own) KV tensors."""

    pool: BlockPool
    storage: DeviceStorage


@dataclass
class HostPool:
    """G2: slot i of ``pool`` is row i of ``storage.rows``."""

    pool: BlockPool
    storage: HostStorage


@dataclass
class DiskPool:
    """G3: slot i of ``pool`` is the file of the hash ``slot_hashes[i]`` last written into it.

    Files are named by sequence hash, so when the pool evicts a slot the old file must go:
    ``reclaim`` deletes the files of slots the pool has handed out again.
    """

    pool: BlockPool
    storage: DiskStorage
    slot_hashes: dict[int, int] = field(default_factory=dict)

    def match_shared(
        self, sequence_hashes: Sequence[int], parent: int | None, writing: set[int]
    ) -> list[ImmutableBlock]:
        """Prefix match in this process's index and, where it misses, in the directory.

        Several processes share one G3 directory: a block another process wrote since this one
        started is not in this pool, but its file is there (one ``lstat``). Such a block is
        adopted (given a slot, which may evict a local block, and registered under its parent)
        and matched like the others; the read verifies it. The walk stops at the first hash
        missing from both, so a miss costs one ``lstat``.
        """
        out: list[ImmutableBlock] = []
        n = len(sequence_hashes)
        while len(out) < n:
            found = self.pool.match(sequence_hashes[len(out) :])
            out.extend(found)
            if len(out) == n:
                break
            if out:
                parent = out[-1].sequence_hash
            h = sequence_hashes[len(out)]
            if h in writing or not self.storage.has_block(h):
                break
            blocks = self.pool.allocate(1)
            if not blocks:
                break
            self.reclaim([blocks[0].block_id], writing | {h})
            blocks[0].mark_complete()
            imm = self.pool.register(blocks[0], h, parent_sequence_hash=parent)
            self.slot_hashes[imm.block_id] = h
            out.append(imm)
        return out

    def reclaim(self, block_ids: list[int], keep: set[int]) -> None:
        """Delete the old files of freshly allocated slots (unless registered again or in
        ``keep``, the hashes being written right now)."""
        for b in block_ids:
            old = self.slot_hashes.pop(b, None)
            if old is not None and not self.pool.contains(old) and old not in keep:
                self.storage.remove(old)


@dataclass
class TierMatch:
    """A prefix found in G2 (``host``) and then G3 (``disk``); each handle holds one reference.

    Release with ``release()`` unless it is passed to ``KvBlockManager.onboard`` (which takes the
    references over).
    """

    host: list[ImmutableBlock]
    disk: list[ImmutableBlock]
    released: bool = False

    @property
    def sequence_hashes(self) -> list[int]:
        return [b.sequence_hash for b in self.host] + [b.sequence_hash for b in self.disk]

    @property
    def num_host(self) -> int:
        return len(self.host)

    @property
    def num_disk(self) -> int:
        return len(self.disk)

    def __len__(self) -> int:
        return len(self.host) + len(self.disk)

    def release(self) -> None:
        """Drop every reference (idempotent)."""
        if self.released:
            return
        self.released = True
        for b in (*self.host, *self.disk):
            if b.alive:
                b.release()
