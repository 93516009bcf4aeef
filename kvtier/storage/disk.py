"""G3 disk storage: one verified file per block in a directory namespaced by the layout fingerprint.

Why this exists: the disk tier must survive restarts and crashes and never serve wrong bytes. Each
block is written to a temporary name and renamed into place (a crash leaves no readable half-block),
read back with its header and checksum verified (a bad file is a miss and is removed), and the
directory is scanned on ``open()`` so a restarted engine keeps its cache. Files are read and
written with ``os.preadv``/``os.pwritev`` (which release the GIL) and O_DIRECT where the filesystem
allows it (tmpfs refuses it; kvtier then falls back to buffered I/O and says so in ``o_direct``).

This class is thread-safe for different sequence hashes; the transfer manager never reads and
writes the same hash at once.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.storage.block_file import (
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
    file_size,
    payload_checksum,
)

__all__ = ["DiskBlockError", "DiskStorage", "StoredBlock"]

_SUFFIX = ".kvb"
_TMP_SUFFIX = ".tmp"
_ALIGN = 4096


class DiskBlockError(OSError):
    """A block could not be written or read; ``sequence_hash`` names it, the message says why."""

    def __init__(self, sequence_hash: int, message: str, *, corrupt: bool = False) -> None:
        super().__init__(f"disk block {sequence_hash:016x}: {message}")
        self.sequence_hash = sequence_hash
        self.corrupt = corrupt


@dataclass(frozen=True)
class StoredBlock:
    """An entry found on ``open()``: a valid-looking block file of this fingerprint."""

    header: BlockHeader
    mtime_ns: int


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous uint8 CPU tensor (no copy)."""
    view: memoryview = t.numpy().data
    return view


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0 and t.numel() % _ALIGN == 0


class DiskStorage:
    """Block files under ``<root>/<fingerprint as 16 hex digits>/<sequence hash>.kvb``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        fingerprint: int,
        block_bytes: int,
        *,
        o_direct: bool = True,
        fsync: bool = False,
    ) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.block_bytes = block_bytes
        self.want_o_direct = o_direct
        self.fsync = fsync
        self.directory = self.root / f"{fingerprint:016x}"
        self.o_direct = False
        self.writable = False
        self.skipped: list[tuple[Path, str]] = []
        self._local = threading.local()

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> list[StoredBlock]:
        """Create or reopen the directory; return the valid blocks found (newest first).

        Leftover temporary files (a crash mid-write) and truncated or corrupt-header files are
        removed; files of another fingerprint are left alone and listed in ``skipped``.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if not self.directory.is_dir():
                raise OSError(
                    exc.errno, f"cannot create disk cache directory {self.directory}: {exc}"
                ) from exc
        self.writable = os.access(self.directory, os.W_OK)
        self.o_direct = self._probe_o_direct() if self.want_o_direct else False
        found: list[StoredBlock] = []
        self.skipped = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(_TMP_SUFFIX):
                self._unlink(Path(entry.path))
                continue
            if not entry.name.endswith(_SUFFIX):
                continue
            path = Path(entry.path)
            try:
                header = self._scan_one(path)
            except BlockFileError as exc:
                self.skipped.append((path, str(exc)))
                if "fingerprint" not in str(exc):
                    self._unlink(path)
                continue
            found.append(StoredBlock(header, entry.stat().st_mtime_ns))
        found.sort(key=lambda s: s.mtime_ns, reverse=True)
        return found

    def _probe_o_direct(self) -> bool:
        if not hasattr(os, "O_DIRECT"):
            return False
        probe = self.directory / f".probe-{uuid.uuid4().hex}{_TMP_SUFFIX}"
        buf = mmap.mmap(-1, _ALIGN)
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        except OSError:
            return False
        try:
            os.pwritev(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            self._unlink(probe)
            buf.close()

    def _scan_one(self, path: Path) -> BlockHeader:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
        header = BlockHeader.unpack(head)
        if header.fingerprint != self.fingerprint:
            raise BlockFileError(
                f"fingerprint {header.fingerprint:016x}, this tier is {self.fingerprint:016x}"
            )
        if path.name != self._name(header.sequence_hash):
            raise BlockFileError(f"file name does not match sequence hash in {path}")
        self._check_geometry(header, size)
        return header

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
        return f"{sequence_hash:016x}{_SUFFIX}"

    def path(self, sequence_hash: int) -> Path:
        """Where the block of ``sequence_hash`` lives."""
        return self.directory / self._name(sequence_hash)

    def contains_file(self, sequence_hash: int) -> bool:
        return self.path(sequence_hash).exists()

    def _bounce(self, nbytes: int) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, nbytes)
            self._local.buf = buf
        return buf

    def write(
        self,
        sequence_hash: int,
        row: torch.Tensor,
        *,
        parent_hash: int | None = None,
        priority: int = 0,
    ) -> None:
        """Store one block (a 1-D uint8 CPU tensor of ``block_bytes``) under ``sequence_hash``.

        Atomic: the file appears under its final name only when complete. Raises
        ``DiskBlockError`` (with the OS reason: no space, read-only, ...) and leaves nothing behind.
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
        final = self.path(sequence_hash)
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        total = file_size(self.block_bytes)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
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
        try:
            fd = os.open(tmp, flags, 0o644)
        except OSError as exc:
            raise DiskBlockError(sequence_hash, f"cannot create {tmp}: {exc.strerror}") from exc
        try:
            _write_all(fd, bufs)
            if not direct:
                pad = total - HEADER_SIZE - self.block_bytes
                if pad:
                    os.ftruncate(fd, total)
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, final)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self._unlink(tmp)
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EFBIG:
                reason = "file size limit exceeded (RLIMIT_FSIZE)"
            raise DiskBlockError(sequence_hash, f"write failed: {reason}") from exc

    def read(self, sequence_hash: int, row: torch.Tensor) -> BlockHeader:
        """Read and verify one block into ``row``; raise ``DiskBlockError`` on any problem.

        ``corrupt=True`` on the error means the file is bad (checksum, header, size) and was
        removed; otherwise it is missing or unreadable. ``row`` may be partly overwritten on error.
        """
        if row.numel() != self.block_bytes or row.dtype != torch.uint8:
            raise ValueError(f"row must be {self.block_bytes} uint8 bytes")
        path = self.path(sequence_hash)
        total = file_size(self.block_bytes)
        flags = os.O_RDONLY
        direct = self.o_direct
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EINVAL and direct:
                fd, direct = os.open(path, os.O_RDONLY), False
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
            self._unlink(path)
            raise DiskBlockError(sequence_hash, f"{exc}; file removed", corrupt=True) from exc
        return header

    def remove(self, sequence_hash: int) -> None:
        """Delete a block file (missing is fine; a read-only directory keeps it)."""
        self._unlink(self.path(sequence_hash))

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is not None:
            buf.close()
            self._local.buf = None


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
