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

Start-up is bounded: up to ``scan_headers_up_to`` files every header is read (bad files removed,
parents, priorities and ages restored into the caller's index); beyond that only names are read
(a few seconds per million files, ``names_only``), the caller indexes nothing at start, and each
block joins its index when first looked up, header verified when it is read.

This class is thread-safe for different sequence hashes; the transfer manager never reads and
writes the same hash at once.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import mmap
import os
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.storage.block_file import (
    BLOCK_SUFFIX,
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
    block_file_name,
    file_size,
    payload_checksum,
)
from kvtier.storage.tier_dir import STATE_PREFIX, TierDir

__all__ = ["IDENTITY_FILE", "DiskBlockError", "DiskStorage", "StoredBlock"]

logger = logging.getLogger(__name__)

_SUFFIX = BLOCK_SUFFIX
_TMP_SUFFIX = ".tmp"
_ALIGN = 4096
_EVICT_TRIES = 64
_BLOCK_NAME = re.compile(r"[0-9a-f]{16}\.kvb")
IDENTITY_FILE = STATE_PREFIX + "identity.json"
"""The model identity of a namespace folder (JSON, written once; shown by ``kvtier inspect``)."""


class DiskBlockError(OSError):
    """A block could not be written or read; ``sequence_hash`` names it, the message says why."""

    def __init__(self, sequence_hash: int, message: str, *, corrupt: bool = False) -> None:
        super().__init__(f"disk block {sequence_hash:016x}: {message}")
        self.sequence_hash = sequence_hash
        self.corrupt = corrupt


@dataclass(frozen=True)
class StoredBlock:
    """A block found on ``open()`` (with ``parent_hash``/``priority``/age from its header when
    the scan read headers; None / 0 / 0 when it read names only)."""

    sequence_hash: int
    parent_hash: int | None
    priority: int
    mtime_ns: int


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous uint8 CPU tensor (no copy)."""
    view: memoryview = t.numpy().data
    return view


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0 and t.numel() % _ALIGN == 0


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
        """Create or reopen the folder; return the blocks found, newest first (none when the
        folder is too large to read headers: ``names_only``). Leftover temporary files (a crash
        mid-write, no live writer) and truncated or corrupt-header files are removed; files of
        another fingerprint are left alone and listed in ``skipped``; anything else (other
        names, symlinks, FIFOs, folders) is ignored.
        """
        d = self._dir
        d.open()
        self.writable = d.writable
        if not self.writable:
            logger.warning(
                "kvtier: G3 directory %s is read-only: serving the blocks it holds, storing none",
                self.directory,
            )
        self.o_direct = self._probe_o_direct() if self.want_o_direct and self.writable else False
        if not self.writable and self.want_o_direct:
            self.o_direct = hasattr(os, "O_DIRECT")  # reads fall back per file if refused
        self.skipped = []
        hashes: list[int] = []
        is_block = _BLOCK_NAME.fullmatch
        for entry in d.scan():
            name = entry.name
            if is_block(name):
                if entry.is_file(follow_symlinks=False):
                    hashes.append(int(name[:16], 16))
            elif name.endswith(_TMP_SUFFIX) and self.writable and d.is_leftover(name):
                d.unlink(name)
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
        self._write_identity()
        return found

    def _read_headers(self, names: list[tuple[str, int]]) -> list[StoredBlock]:
        found: list[StoredBlock] = []
        for name, h in names:
            try:
                header, size, mtime_ns = self._read_header(name)
                if header.fingerprint != self.fingerprint:
                    raise BlockFileError(
                        f"fingerprint {header.fingerprint:016x}, this tier is "
                        f"{self.fingerprint:016x}"
                    )
                if header.sequence_hash != h:
                    raise BlockFileError(f"file name does not match sequence hash in {name}")
                self._check_geometry(header, size)
            except FileNotFoundError:
                continue  # deleted by another process meanwhile: simply not there
            except BlockFileError as exc:
                self.skipped.append((self.directory / name, str(exc)))
                if "fingerprint" not in str(exc):
                    self._drop(name)
                continue
            except OSError as exc:
                self.skipped.append((self.directory / name, f"unreadable: {exc.strerror or exc}"))
                continue
            found.append(StoredBlock(h, header.parent_hash, header.priority, mtime_ns))
        return found

    def _read_header(self, name: str) -> tuple[BlockHeader, int, int]:
        fd = self._dir.open_regular(name, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            head = os.pread(fd, HEADER_SIZE, 0)
        finally:
            os.close(fd)
        return BlockHeader.unpack(head), st.st_size, st.st_mtime_ns

    def _write_identity(self) -> None:
        if self.identity is None or not self.writable:
            return
        if self._dir.is_regular(IDENTITY_FILE):
            return
        tmp = f"{IDENTITY_FILE}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            fd = self._dir.create(tmp, os.O_WRONLY)
            try:
                doc = {**self.identity, "block_bytes": self.block_bytes}
                os.write(fd, json.dumps(doc, indent=2, sort_keys=True).encode())
            finally:
                os.close(fd)
            self._dir.publish(tmp, IDENTITY_FILE)
        except OSError as exc:
            logger.warning("kvtier: cannot write %s: %s", self.directory / IDENTITY_FILE, exc)

    def _probe_o_direct(self) -> bool:
        if not hasattr(os, "O_DIRECT"):
            return False
        probe = f".probe-{uuid.uuid4().hex}{_TMP_SUFFIX}"
        buf = mmap.mmap(-1, _ALIGN)
        try:
            fd = self._dir.create(probe, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            return False
        try:
            os.pwritev(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            self._dir.unlink(probe)
            buf.close()

    def _check_geometry(self, header: BlockHeader, size: int) -> None:
        if header.payload_len != self.block_bytes:
            raise BlockFileError(
                f"payload is {header.payload_len} bytes, blocks here are {self.block_bytes}"
            )
        if size != file_size(header.payload_len):
            raise BlockFileError(
                f"file is {size} bytes, expected {file_size(header.payload_len)} (truncated?)"
            )

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

    def contains_file(self, sequence_hash: int) -> bool:
        return self._dir.is_regular(self._name(sequence_hash))

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
        payload = _bytes_of(row)
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
        tmp = f"{final}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        total = file_size(self.block_bytes)
        flags = os.O_WRONLY
        direct = self.o_direct
        if direct:
            flags |= os.O_DIRECT
            if _aligned(row):
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
            _write_all(fd, bufs)
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
        payload = _bytes_of(row)
        copy_out = False
        try:
            size = os.fstat(fd).st_size
            if direct and _aligned(row):
                hbuf = self._bounce(HEADER_SIZE)
                got = _read_all(fd, [memoryview(hbuf)[:HEADER_SIZE], payload])
                head = memoryview(hbuf)[:HEADER_SIZE]
            elif direct:
                buf = self._bounce(total)
                got = _read_all(fd, [memoryview(buf)[:total]])
                head = memoryview(buf)[:HEADER_SIZE]
                copy_out = True
            else:
                hb = bytearray(HEADER_SIZE)
                got = _read_all(fd, [hb, payload])
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
            self._check_geometry(header, size)
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


def _write_all(fd: int, bufs: list[memoryview | mmap.mmap]) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    offset = 0
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        _consume(views, n)


def _read_all(fd: int, bufs: list[memoryview | bytearray]) -> int:
    views = [memoryview(b).cast("B") for b in bufs]
    offset = 0
    while views:
        n = os.preadv(fd, views, offset)
        if n <= 0:
            break
        offset += n
        _consume(views, n)
    return offset


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from ``views`` (what one vectored call moved)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]
