"""``WriteBehindQueue``: blocks go to G4 on a background thread, never on the engine's step.

Why this exists: writing a 2 MiB block to a remote store takes milliseconds; a step must not
wait for it, and a slow or dead server must not make blocks pile up in memory. ``offer`` copies
the block's bytes into the queue (the G2 row it came from may be reused right after) and returns
at once; the queue is bounded in bytes (a block that does not fit is dropped and counted) and in
time (a block that waited longer than ``max_age_s`` is dropped and counted when its turn comes).
The writer thread sends batches through the ``RemoteStore`` (its connections fill in each
value's header and checksum as they send it: ``RemoteStore.put_each``), whose
breaker makes a sick server cost nothing: refused batches are dropped and counted. No torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.lifecycle import Lifecycle
from kvtier.storage.block_file import HEADER_SIZE
from kvtier.storage.remote import RemoteError, RemoteStore, RemoteUnavailable
from kvtier.storage.remote_block import ValueBuffers, encode_in_place, remote_key

__all__ = ["WriteBehindQueue", "WriteStats"]

logger = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20
"""Most bytes one writer batch sends (and the most spare value buffers kept between batches)."""


@dataclass
class WriteStats:
    """Figures since the last ``take_stats`` (``written``: the sequence hashes now in G4)."""

    written: list[int] = field(default_factory=list)
    written_parents: list[int | None] = field(default_factory=list)
    written_bytes: int = 0
    write_seconds: float = 0.0
    dropped_full: int = 0
    dropped_old: int = 0
    dropped_unavailable: int = 0
    failed: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_old + self.dropped_unavailable


@dataclass
class _Item:
    seq_hash: int
    parent: int | None
    value: bytearray  # header room + payload (``ValueBuffers.fill``)
    queued_at: float


class WriteBehindQueue(Lifecycle):
    """Bounded write-behind of blocks into one namespace of a ``RemoteStore``."""

    def __init__(
        self,
        store: RemoteStore,
        namespace: str,
        fingerprint: int,
        *,
        max_bytes: int,
        max_age_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0 or max_age_s <= 0:
            raise ValueError(
                f"WriteBehindQueue: bad bounds max_bytes={max_bytes} max_age_s={max_age_s}"
            )
        self.store = store
        self.namespace = namespace
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._bytes = 0
        self._busy = False
        self._stats = WriteStats()
        self._buffers = ValueBuffers(min(max_bytes, BATCH_BYTES))
        self._thread: threading.Thread | None = None
        self._stop = False

    def start(self) -> WriteBehindQueue:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvtier-g4-write", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the writer (blocks still queued after ``timeout`` are dropped, not waited for)."""
        self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def offer(self, seq_hash: int, parent: int | None, payload: bytes | memoryview) -> bool:
        """Queue one block (copies ``payload`` once); False if dropped: the queue is full."""
        with self._cond:
            if self._bytes + HEADER_SIZE + len(payload) > self.max_bytes:
                self._stats.dropped_full += 1
                return False
        value = self._buffers.fill(payload)  # the copy, outside the lock
        with self._cond:
            self._items.append(_Item(seq_hash, parent, value, self._clock()))
            self._bytes += len(value)
            self._cond.notify()
            return True

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty and the writer idle (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def take_stats(self) -> WriteStats:
        with self._cond:
            stats, self._stats = self._stats, WriteStats()
        return stats

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or bool(self._items))
                if self._stop and not self._items:
                    return
                batch: list[_Item] = []
                size = 0
                now = self._clock()
                while self._items and (
                    not batch or size + len(self._items[0].value) <= BATCH_BYTES
                ):
                    item = self._items.popleft()
                    self._bytes -= len(item.value)
                    if now - item.queued_at > self.max_age_s:
                        self._stats.dropped_old += 1
                        self._buffers.give_back([item.value])
                        continue
                    batch.append(item)
                    size += len(item.value)
                self._busy = bool(batch)
            if batch:
                self._send(batch)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send(self, batch: list[_Item]) -> None:
        try:
            self._put(batch)
        finally:  # sent or given up: nothing reads the buffers any more
            self._buffers.give_back(it.value for it in batch)

    def _put(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()

        def value_of(i: int) -> memoryview:  # on the connection's thread: checksums in parallel
            it = batch[i]
            return encode_in_place(self.fingerprint, it.seq_hash, it.parent, it.value)

        try:
            self.store.put_each([remote_key(self.namespace, it.seq_hash) for it in batch], value_of)
        except RemoteUnavailable:
            with self._cond:
                self._stats.dropped_unavailable += len(batch)
            return
        except RemoteError as exc:
            logger.debug("kvtier: G4 write of %d blocks failed: %s", len(batch), exc)
            with self._cond:
                self._stats.failed += len(batch)
            return
        with self._cond:
            self._stats.written.extend(it.seq_hash for it in batch)
            self._stats.written_parents.extend(it.parent for it in batch)
            self._stats.written_bytes += sum(len(it.value) for it in batch)
            self._stats.write_seconds += time.perf_counter() - t0
