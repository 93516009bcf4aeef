"""G4 (remote tier) on the worker side: fetch planned blocks into GPU blocks (keeping a G2 copy)
and write registered G2 blocks behind to G4.

Why this exists: the worker owns the bytes, so it talks to G4 for data (the scheduler half only
asks EXISTS). ``RemoteExecutor.fetch`` runs one ``LoadJob``'s G4 part on a fetch thread: one
batched GET (pipelined per shard), every value verified (header, layout fingerprint, sequence hash,
length, xxh3_64 checksum) as it arrives, before its bytes are used (``RemoteStore.get_each``: each
value is copied out and dropped while warm, none kept); good blocks land in their reserved G2 slot
(so the prefix stays local) and in the request's GPU blocks; a missing, corrupt or failed block
is reported as a load error (vLLM recomputes from there) and counted, never served. The fetch is
asynchronous (the request waits outside the forward pass), so a slow G4 costs that request at most
the socket timeout, never a step. Writes copy the G2 row at once (the slot may be reused) and go
out through the bounded ``WriteBehindQueue``.

Keys are namespaced by the model identity (``kvtier.storage.identity.ModelIdentity``: which
model's weights produced the KV, dtype, TP rank and size, the layout fingerprint), the same key
space G3 uses, and by the layout fingerprint and TP rank again in clear: ``remote_namespace``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvtier.executor.jobs import FETCH_FIGURES, RemoteLoad, RemoteReport, RemoteWrites, add_figures
from kvtier.lifecycle import Lifecycle
from kvtier.storage.block_file import HEADER_SIZE, BlockFileError
from kvtier.storage.host import HostStorage
from kvtier.storage.remote import RemoteConfig, RemoteError, RemoteStore
from kvtier.storage.remote_block import decode_block, remote_key
from kvtier.storage.write_behind import WriteBehindQueue
from kvtier.transfer.copy_api import CopyFuture

if TYPE_CHECKING:
    from kvtier.executor.plane import RankDataPlane

__all__ = ["RemoteExecutor", "RemoteFetch"]

logger = logging.getLogger(__name__)


@dataclass
class RemoteFetch:
    """One ``RemoteLoad`` in flight; the lists are final once ``future.done()``."""

    load: RemoteLoad
    future: CopyFuture
    failed_gpu_blocks: list[int] = field(default_factory=list)
    host_stored: list[int] = field(default_factory=list)
    host_failed: list[int] = field(default_factory=list)
    bad_hashes: list[int] = field(default_factory=list)


class RemoteExecutor(Lifecycle):
    """The worker's G4 client: fetches and write-behind (see the module docstring)."""

    def __init__(
        self,
        config: RemoteConfig,
        namespace: str,
        fingerprint: int,
        block_bytes: int,
        *,
        max_write_queue_bytes: int,
        max_write_age_s: float = 5.0,
    ) -> None:
        self.config = config
        self.namespace = namespace
        self.fingerprint = fingerprint
        self.block_bytes = block_bytes
        self.store = RemoteStore(config)
        self.writer = WriteBehindQueue(
            self.store,
            namespace,
            fingerprint,
            max_bytes=max_write_queue_bytes,
            max_age_s=max_write_age_s,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._report = RemoteReport(namespace=namespace)
        self._miss_logged = False

    def start(self) -> RemoteExecutor:
        self.store.start()
        self.writer.start()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-g4-fetch")
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.writer.close()
        self.store.close()

    # -- fetch -----------------------------------------------------------------------------------

    def fetch(
        self, load: RemoteLoad, plane: RankDataPlane, gate: object | None = None
    ) -> RemoteFetch:
        """Start fetching ``load`` into the plane's device blocks (and G2 slots), the copy to the
        device ordered after ``gate`` (returns at once; the fetch thread completes ``future``)."""
        run = RemoteFetch(load, CopyFuture(plane.layout.model.num_layers))
        if self._pool is None:
            self._fail_all(run)
            run.future.complete()
            return run
        self._pool.submit(self._fetch, run, plane, gate)
        return run

    def _fail_all(self, run: RemoteFetch) -> None:
        run.bad_hashes = list(run.load.hashes)
        run.failed_gpu_blocks = list(run.load.gpu_blocks)
        run.host_failed = [
            h for h, s in zip(run.load.hashes, run.load.host_slots, strict=True) if s >= 0
        ]
        run.host_stored = []

    def _fetch(self, run: RemoteFetch, plane: RankDataPlane, gate: object | None) -> None:
        load, fut = run.load, run.future
        host = plane.host
        r = RemoteReport()
        try:
            t0 = time.perf_counter()
            # Page-locked on CUDA: the CUDA engine copies from pinned rows only.
            staging = HostStorage(len(load.hashes), self.block_bytes, pin_memory=plane.on_cuda)
            staging.allocate()
            rows = staging.rows.numpy()
            host_rows = host.rows.numpy() if host is not None else None
            # Per block: True (verified, landed), None (missing) or why it was rejected.
            got: list[bool | BlockFileError | None] = [None] * len(load.hashes)

            def land(i: int, value: bytes | None) -> None:
                """Verify one value and copy it into its staging row (and G2 slot) while it is
                warm; runs on the store's I/O threads, each on its own ``i``."""
                if value is None:
                    return
                h, slot = load.hashes[i], load.host_slots[i]
                try:
                    _, payload = decode_block(value, self.fingerprint, h, self.block_bytes)
                except BlockFileError as exc:
                    got[i] = exc
                    return
                rows[i] = np.frombuffer(payload, dtype=np.uint8)
                if slot >= 0 and host_rows is not None:
                    host_rows[slot] = rows[i]
                got[i] = True

            try:
                self.store.get_each([remote_key(self.namespace, h) for h in load.hashes], land)
            except RemoteError as exc:
                r.fetch_failed += len(load.hashes)
                self._log_miss(f"G4 fetch of {len(load.hashes)} blocks failed: {exc}")
                self._fail_all(run)
                self._merge(r, run.bad_hashes)
                fut.complete()
                return
            good_rows: list[int] = []
            good_gpu: list[int] = []
            corrupt: list[bytes] = []
            for i, (h, status) in enumerate(zip(load.hashes, got, strict=True)):
                slot = load.host_slots[i]
                if status is not True:
                    if status is None:
                        r.fetch_missing += 1
                        self._log_miss(f"G4 block {h:016x} missing (evicted or expired)")
                    else:
                        corrupt.append(remote_key(self.namespace, h))
                        r.fetch_corrupt += 1
                        self._log_miss(f"G4 block {h:016x} rejected: {status}")
                    run.bad_hashes.append(h)
                    run.failed_gpu_blocks.append(load.gpu_blocks[i])
                    if slot >= 0:
                        run.host_failed.append(h)
                    continue
                good_rows.append(i)
                good_gpu.append(load.gpu_blocks[i])
                if slot >= 0:
                    (run.host_failed if host_rows is None else run.host_stored).append(h)
            nbytes = len(good_rows) * (HEADER_SIZE + self.block_bytes)
            handle = plane.engine.host_to_device(staging, plane.device, good_rows, good_gpu, gate)
            handle.wait()
            if corrupt:  # verifiably bad values: remove them for the whole fleet
                with contextlib.suppress(RemoteError):
                    self.store.delete(corrupt)
            if handle.error is not None:
                run.bad_hashes.extend(load.hashes[i] for i in good_rows)
                run.failed_gpu_blocks.extend(good_gpu)
                r.fetch_failed += len(good_gpu)
            else:
                r.fetched_blocks += len(good_gpu)
                r.fetched_bytes += nbytes
                if len(good_gpu) == len(load.hashes):
                    self._miss_logged = False
            r.fetch_seconds += time.perf_counter() - t0
            self._merge(r, run.bad_hashes)
            fut.complete()
        except BaseException as exc:  # the run carries the failure to the model runner thread
            self._fail_all(run)
            r.fetch_failed += len(load.hashes)
            self._merge(r, run.bad_hashes)
            fut.fail(exc)

    def _merge(self, r: RemoteReport, bad: list[int]) -> None:
        with self._lock:
            self._report.bad.extend(bad)
            add_figures(self._report, r, FETCH_FIGURES)

    def _log_miss(self, message: str) -> None:
        """Log the first G4 miss of an episode (until a fetch fully succeeds again)."""
        if not self._miss_logged:
            self._miss_logged = True
            logger.warning("kvtier: %s (recomputed; more G4 misses counted, not logged)", message)

    # -- write-behind -----------------------------------------------------------------------------

    def write_behind(
        self, writes: RemoteWrites | None, host: HostStorage | None, failed: set[int]
    ) -> None:
        """Queue this step's landed G2 stores for G4 (copies their rows now; never blocks)."""
        if writes is None or host is None:
            return
        for h, parent, slot in zip(writes.hashes, writes.parents, writes.host_slots, strict=True):
            if h in failed:
                continue
            self.writer.offer(h, parent, host.row(slot).numpy().data)

    # -- report ----------------------------------------------------------------------------------

    def take_report(self) -> RemoteReport | None:
        stats = self.writer.take_stats()
        with self._lock:
            report, self._report = self._report, RemoteReport()
        report.written = stats.written
        report.written_parents = stats.written_parents
        report.written_bytes = stats.written_bytes
        report.write_seconds = stats.write_seconds
        report.write_dropped = stats.dropped
        report.write_failed = stats.failed
        report.breaker_state = self.store.breaker.state
        return None if report.is_empty else report
