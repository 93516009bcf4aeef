"""G3 disk storage: one verified file per block in a folder namespaced by model and layout.

Why this exists: the disk tier must survive restarts and crashes, be shared by several engines,
and never serve wrong bytes. Each block is written to a temporary name and published with
``link()`` (a crash leaves no readable half-block; of two writers of one block one wins, the other
discards its copy), read back with its header and checksum verified (a bad file is a miss and is
removed), and the folder is scanned on ``open()`` so a restarted engine keeps its cache. Files are
read and written with ``os.preadv``/``os.pwritev`` (which release the GIL) and O_DIRECT where the
filesystem allows it (tmpfs refuses it; kvtier then falls back to buffered I/O: ``o_direct``).

Sharing (see ``kvtier.storage.tier_dir`` for the mechanism and what the filesystem must provide):
the file names are the index, so a block another process wrote is found with one ``lstat``
(``has_block``); a file deleted by another process is a miss, never an error; with a
``capacity`` the number of block files stays within it across processes, and a writer that finds
the tier full deletes blocks it knows of, oldest known first, to make room.

Start-up reads the folder with ``kvtier.storage.disk_scan``. This class is thread-safe for
different sequence hashes; the transfer manager never reads and writes the same hash at once.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch

from kvtier.storage.block_file import (
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
    block_file_name,
    file_size,
    payload_checksum,
)
from kvtier.storage.disk_scan import (
    IDENTITY_FILE,
    TMP_SUFFIX,
    StoredBlock,
    check_geometry,
    probe_o_direct,
    read_header,
    scan_names,
    write_identity,
)
from kvtier.storage.tier_dir import TierDir
from kvtier.storage.vectored_io import aligned, bytes_of, read_all, write_all

__all__ = ["DiskBlockError", "DiskStorage", "StoredBlock"]

logger = logging.getLogger(__name__)

_EVICT_TRIES = 64


class DiskBlockError(OSError):
    """A block could not be written or read; ``sequence_hash`` names it, the message says why."""

    def __init__(self, sequence_hash: int, message: str, *, corrupt: bool = False) -> None:
        super().__init__(f"disk block {sequence_hash:016x}: {message}")
        self.sequence_hash = sequence_hash
        self.corrupt = corrupt


class DiskStorage:
    """Block files under ``<root>/<fingerprint as 16 hex digits>/<sequence hash>.kvb``.

    ``fingerprint`` is the namespace: ``ModelIdentity.namespace(layout.fingerprint)`` for an
    engine (``identity`` is then its description, written beside the blocks), or the layout
    fingerprint alone for a caller that keys by layout only.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fingerprint: int,
        block_bytes: int,
        *,
        o_direct: bool = True,
        fsync: bool = False,
        capacity: int | None = None,
        group: str | None = None,
        identity: Mapping[str, object] | None = None,
        scan_headers_up_to: int = 65536,
    ) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        if capacity is not None and capacity <= 0:
            raise ValueError(f"capacity must be positive or None, got {capacity}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.block_bytes = block_bytes
        self.want_o_direct = o_direct
        self.fsync = fsync
        self.capacity = capacity
        self.identity = dict(identity) if identity is not None else None
        self.scan_headers_up_to = scan_headers_up_to
        self.directory = self.root / f"{fingerprint:016x}"
        self.o_direct = False
        self.writable = False
        self.skipped: list[tuple[Path, str]] = []
        self.evicted_for_room = 0
        self.names_only = False
        """Set by ``open()``: the folder held more than ``scan_headers_up_to`` files, so only
        names were read. A caller then need not index them: a block is found by its file name
        when first looked up (``has_block``), like a block another process wrote."""
        self._dir = TierDir(
            self.root, self.directory.name, group=group, counted=capacity is not None
        )
        self._known: collections.deque[int] = collections.deque()
        self._local = threading.local()

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> list[StoredBlock]:
        """Create or reopen the folder; return the blocks found, newest first (none when
        ``names_only``). Truncated or corrupt-header files are removed, files of another
        fingerprint left alone; both are listed in ``skipped`` (the rest: ``scan_names``)."""
        d = self._dir
        d.open()
        self.writable = d.writable
        if not self.writable:
            logger.warning(
                "kvtier: G3 directory %s is read-only: serving the blocks it holds, storing none",
                self.directory,
            )
        self.o_direct = probe_o_direct(d) if self.want_o_direct and self.writable else False
        if not self.writable and self.want_o_direct:
            self.o_direct = hasattr(os, "O_DIRECT")  # reads fall back per file if refused
        self.skipped = []
        hashes = scan_names(d, self.writable)
        self.names_only = len(hashes) > self.scan_headers_up_to
        if self.names_only:  # nothing to index: names are the index (a few seconds per 1M)
            found: list[StoredBlock] = []
            count = len(hashes)
            self._known = collections.deque(hashes)
        else:
            found = self._read_headers([(self._name(h), h) for h in hashes])
            found.sort(key=lambda s: s.mtime_ns, reverse=True)
            count = len(found)
            self._known = collections.deque(s.sequence_hash for s in reversed(found))
        if (d.alone or d.fresh_count) and self.capacity is not None and self.writable:
            d.recount(count)
        d.shared()
        if self.identity is not None and self.writable:
            doc = {**self.identity, "block_bytes": self.block_bytes}
            write_identity(d, doc, self.directory / IDENTITY_FILE)
        return found

    def _read_headers(self, names: list[tuple[str, int]]) -> list[StoredBlock]:
        found: list[StoredBlock] = []
        for name, h in names:
            try:
                found.append(read_header(self._dir, name, self.fingerprint, h, self.block_bytes))
            except FileNotFoundError:
                continue  # deleted by another process meanwhile: simply not there
            except BlockFileError as exc:
                self.skipped.append((self.directory / name, str(exc)))
                if "fingerprint" not in str(exc):
                    self._drop(name)
            except OSError as exc:
                self.skipped.append((self.directory / name, f"unreadable: {exc.strerror or exc}"))
        return found

    # -- blocks -------------------------------------------------------------------------------

    @staticmethod
    def _name(sequence_hash: int) -> str:
        return block_file_name(sequence_hash)

    def path(self, sequence_hash: int) -> Path:
        """Where the block of ``sequence_hash`` lives."""
        return self.directory / self._name(sequence_hash)

    def has_block(self, sequence_hash: int) -> bool:
        """A complete-looking block file of this hash is there now (one ``lstat``; any process
        may have written it). The read still verifies it."""
        ok = self._dir.is_regular(self._name(sequence_hash), file_size(self.block_bytes))
        if ok:
            self._known.append(sequence_hash)
        return ok

    def _bounce(self, nbytes: int) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, nbytes)
            self._local.buf = buf
        return buf

    def _make_room(self, sequence_hash: int) -> None:
        """Count one more block file, deleting known blocks (oldest first) while the tier is
        full across processes; raise ``DiskBlockError`` when it stays full."""
        d = self._dir
        for _ in range(_EVICT_TRIES):
            if d.claim(self.capacity):
                return
            try:
                victim = self._known.popleft()
            except IndexError:
                break
            if victim != sequence_hash and d.unlink(self._name(victim)):
                d.unclaim()
                self.evicted_for_room += 1
        raise DiskBlockError(
            sequence_hash,
            f"G3 is full ({d.count()} of {self.capacity} blocks across processes) and none "
            "this process knows of could be deleted",
        )

    def write(
        self,
        sequence_hash: int,
        row: torch.Tensor,
        *,
        parent_hash: int | None = None,
        priority: int = 0,
    ) -> None:
        """Store one block (a 1-D uint8 CPU tensor of ``block_bytes``) under ``sequence_hash``.

        Atomic: the file appears under its final name only when complete; if another process
        published the same block first, its copy is kept and this one discarded. Raises
        ``DiskBlockError`` (with the OS reason: no space, read-only, tier full) and leaves
        nothing behind.
        """
        if row.numel() != self.block_bytes or row.dtype != torch.uint8:
            raise ValueError(f"row must be {self.block_bytes} uint8 bytes")
        if not self.writable:
            raise DiskBlockError(sequence_hash, f"directory {self.directory} is not writable")
        payload = bytes_of(row)
        header = BlockHeader(
            self.fingerprint,
            sequence_hash,
            parent_hash,
            priority,
            self.block_bytes,
            payload_checksum(payload),
        ).pack()
        final = self._name(sequence_hash)
        if self._dir.is_regular(final, file_size(self.block_bytes)):
            return  # another process stored it already: same hash, same bytes
        tmp = f"{final}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        total = file_size(self.block_bytes)
        flags = os.O_WRONLY
        direct = self.o_direct
        if direct:
            flags |= os.O_DIRECT
            if aligned(row):
                hbuf = self._bounce(HEADER_SIZE)
                hbuf[:HEADER_SIZE] = header
                bufs: list[memoryview | mmap.mmap] = [memoryview(hbuf)[:HEADER_SIZE], payload]
            else:
                buf = self._bounce(total)
                buf[:HEADER_SIZE] = header
                buf[HEADER_SIZE : HEADER_SIZE + self.block_bytes] = payload
                bufs = [memoryview(buf)[:total]]
        else:
            bufs = [memoryview(header), payload]
        self._make_room(sequence_hash)
        try:
            fd = self._dir.create(tmp, flags)
        except OSError as exc:
            self._dir.unclaim()
            raise DiskBlockError(sequence_hash, f"cannot create {tmp}: {exc.strerror}") from exc
        self._dir.hold(fd)
        try:
            write_all(fd, bufs)
            if not direct:
                pad = total - HEADER_SIZE - self.block_bytes
                if pad:
                    os.ftruncate(fd, total)
            if self.fsync:
                os.fsync(fd)
            published = self._dir.publish(tmp, final)
            os.close(fd)
            fd = -1
            if published:
                self._known.append(sequence_hash)
            elif not self._dir.is_regular(final):
                raise OSError(errno.EEXIST, f"{final} exists and is not a block file")
            else:
                self._dir.unclaim()  # another writer's copy won; ours is discarded
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self._dir.unlink(tmp)
            self._dir.unclaim()
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EFBIG:
                reason = "file size limit exceeded (RLIMIT_FSIZE)"
            raise DiskBlockError(sequence_hash, f"write failed: {reason}") from exc

    def read(self, sequence_hash: int, row: torch.Tensor) -> BlockHeader:
        """Read and verify one block into ``row``; raise ``DiskBlockError`` on any problem.

        ``corrupt=True`` on the error means the file is bad (checksum, header, size) and was
        removed; otherwise it is missing (e.g. evicted by another process) or unreadable.
        ``row`` may be partly overwritten on error. Every length is checked against this
        tier's block size before anything is read or allocated.
        """
        if row.numel() != self.block_bytes or row.dtype != torch.uint8:
            raise ValueError(f"row must be {self.block_bytes} uint8 bytes")
        name = self._name(sequence_hash)
        total = file_size(self.block_bytes)
        direct = self.o_direct
        try:
            fd = self._dir.open_regular(name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            if exc.errno == errno.EINVAL and direct:
                try:
                    fd, direct = self._dir.open_regular(name, os.O_RDONLY), False
                except OSError as again:
                    raise DiskBlockError(sequence_hash, f"cannot open: {again.strerror}") from again
            else:
                raise DiskBlockError(sequence_hash, f"cannot open: {exc.strerror}") from exc
        payload = bytes_of(row)
        copy_out = False
        try:
            size = os.fstat(fd).st_size
            if direct and aligned(row):
                hbuf = self._bounce(HEADER_SIZE)
                got = read_all(fd, [memoryview(hbuf)[:HEADER_SIZE], payload])
                head = memoryview(hbuf)[:HEADER_SIZE]
            elif direct:
                buf = self._bounce(total)
                got = read_all(fd, [memoryview(buf)[:total]])
                head = memoryview(buf)[:HEADER_SIZE]
                copy_out = True
            else:
                hb = bytearray(HEADER_SIZE)
                got = read_all(fd, [hb, payload])
                head = memoryview(hb)
        except OSError as exc:
            raise DiskBlockError(sequence_hash, f"read failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            header = BlockHeader.unpack(head)
            if header.fingerprint != self.fingerprint:
                raise BlockFileError(f"fingerprint {header.fingerprint:016x} is not this tier's")
            if header.sequence_hash != sequence_hash:
                raise BlockFileError(f"holds sequence hash {header.sequence_hash:016x}")
            check_geometry(header, size, self.block_bytes)
            if got < HEADER_SIZE + self.block_bytes:
                raise BlockFileError(f"short read of {got} bytes")
            if copy_out:
                payload[:] = memoryview(self._bounce(total))[
                    HEADER_SIZE : HEADER_SIZE + self.block_bytes
                ]
            if payload_checksum(payload) != header.checksum:
                raise BlockFileError("payload checksum mismatch (corrupted data)")
        except BlockFileError as exc:
            self._drop(name)
            raise DiskBlockError(sequence_hash, f"{exc}; file removed", corrupt=True) from exc
        return header

    def remove(self, sequence_hash: int) -> None:
        """Delete a block file (missing is fine; a read-only directory keeps it)."""
        self._drop(self._name(sequence_hash))

    def _drop(self, name: str) -> None:
        if self.writable and self._dir.unlink(name):
            self._dir.unclaim()

    def close(self) -> None:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is not None:
            buf.close()
            self._local.buf = None
        self._dir.close()
