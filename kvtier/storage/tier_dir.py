"""One G3 namespace directory, opened safely and shared by every process that uses it.

Why this exists: operators put one ``disk_dir`` under several engines (local NVMe, or a shared
mount), and the directory may hold anything another user or a crash left there. Every file
operation of the disk tier therefore goes through one object that

- opens the namespace folder once with ``O_NOFOLLOW | O_DIRECTORY`` and works relative to that
  descriptor, so no symlink under the tier is followed and a path swapped underneath cannot
  redirect a write or a delete; the folder must be a real directory owned by this user (or, with
  a shared group, carry that group);
- opens block files only with ``O_NOFOLLOW | O_NONBLOCK`` and uses them only if ``fstat`` says
  regular file (a FIFO, socket, device or directory named ``*.kvb`` is never read from);
- creates files and folders owner-only (0600 / 0700), or group read-write (0660 / 2770) with the
  ``disk_group`` knob;
- publishes a finished temporary file with ``link()`` (fails if the name exists, so concurrent
  writers of one block are harmless: one wins) and unlinks it;
- coordinates processes with ``flock``: each holds a shared lock on the folder while it uses the
  tier (one that gets it exclusively at start is alone and may recount the blocks); a writer
  holds an exclusive lock on its temporary file until it is published, so a scan (start-up,
  ``kvtier fsck``) removes only temporary files no live writer holds; ``.kvtier-count`` (only
  with a capacity) holds the number of block files, changed under its lock by the process that
  links or unlinks one, so the bound holds across processes. A crash between the two steps
  leaves the count high by one (never low); the next process to start alone recounts.

On NFS the lock on the folder cannot be taken, so no process counts as alone and the count is
never recounted automatically (stop the engines and delete ``.kvtier-count`` to recount).

Filesystem requirements: POSIX ``link``/``unlink``/``rename`` atomic in one directory, ``flock``
honoured between processes (local filesystems; NFSv4 and NFSv3 with NLM; Lustre with
``-o flock``; GPFS). Where locks are not honoured across hosts the count can drift by the writes
racing on it, never serving wrong bytes. On NFS an open file deleted by another host may read as
``ESTALE``: a miss. Files on disk exceed the bound only by the temporary files in flight (at most
``io_threads`` per process). Tests with real processes: ``tests/data/test_shared_dir.py``,
``test_disk_safety.py``, ``tests/vllm/test_e2e_shared_g3.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "COUNT_FILE",
    "STATE_PREFIX",
    "TierDir",
    "TierDirError",
    "is_leftover_at",
    "open_folder",
    "open_regular_at",
    "regular_file_exists",
]

STATE_PREFIX = ".kvtier-"
"""Names of the tier's own bookkeeping files in a namespace folder start with this."""
COUNT_FILE = STATE_PREFIX + "count"

_COUNT = struct.Struct("<q")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class TierDirError(OSError):
    """The tier directory cannot be used safely; the message says why."""


def open_folder(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """An fd of a real directory (a symlink is refused with ELOOP/ENOTDIR, never followed)."""
    return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)


def open_regular_at(dir_fd: int, name: str, flags: int) -> int:
    """An fd of ``name`` in ``dir_fd`` if it is a regular file: never follows a symlink, never
    blocks (a FIFO opens with O_NONBLOCK and is then refused), never a directory."""
    fd = os.open(name, flags | _OPEN_FLAGS, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def regular_file_exists(path: str | os.PathLike[str]) -> bool:
    """``path`` is a regular file now (one ``lstat``; the last component is not followed).

    For a process that only needs to know whether a block is in the tier (the vLLM scheduler
    half); whoever reads the file opens it safely and verifies it."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_leftover_at(dir_fd: int, name: str) -> bool:
    """A temporary file no live writer holds (a crash leftover, safe to delete): writers hold
    an exclusive ``flock`` on their temporary file until it is published."""
    try:  # read-write: NFS maps flock to byte-range locks, and an exclusive one needs it
        fd = open_regular_at(dir_fd, name, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class TierDir:
    """``<root>/<name>`` as a descriptor-relative, multi-process directory (see module doc)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str,
        *,
        group: str | None = None,
        counted: bool = False,
    ) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"namespace folder name must be one path component, got {name!r}")
        self.root = Path(root)
        self.name = name
        self.path = self.root / name
        self.group = group
        self.counted = counted
        self.dir_mode = 0o2770 if group else 0o700
        self.file_mode = 0o660 if group else 0o600
        self.gid = -1
        self.fd = -1
        self.writable = False
        self.alone = False
        self.fresh_count = False
        self._count = -1
        self._lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create or open the folder, check it, join the members (exclusively if alone)."""
        if self.group is not None:
            try:
                self.gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise TierDirError(
                    errno.EINVAL, f"disk_group {self.group!r}: no such group"
                ) from None
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
        except OSError as exc:
            if not self.root.is_dir():
                raise TierDirError(
                    exc.errno, f"cannot create disk cache directory {self.root}: {exc}"
                ) from exc
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileExistsError, PermissionError, OSError):
                os.mkdir(self.name, self.dir_mode, dir_fd=root_fd)
            try:
                self.fd = open_folder(self.name, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TierDirError(
                        exc.errno, f"{self.path} is a symlink or not a directory: refused"
                    ) from exc
                raise TierDirError(
                    exc.errno, f"cannot create disk cache directory {self.path}: {exc}"
                ) from exc
        finally:
            os.close(root_fd)
        st = os.fstat(self.fd)
        mine = st.st_uid == os.geteuid() or (self.gid >= 0 and st.st_gid == self.gid)
        if not mine:
            self.close()
            raise TierDirError(
                errno.EPERM, f"{self.path} is owned by uid {st.st_uid}, not this user: refused"
            )
        if st.st_uid == os.geteuid():
            with contextlib.suppress(OSError):
                if self.gid >= 0 and st.st_gid != self.gid:
                    os.fchown(self.fd, -1, self.gid)
                if stat.S_IMODE(st.st_mode) != self.dir_mode:
                    os.fchmod(self.fd, self.dir_mode)
        self.writable = os.access(self.path, os.W_OK)
        self._join()

    def _join(self) -> None:
        if self.counted and self.writable:
            self._count = self._open_state(COUNT_FILE)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except OSError as exc:
            self.alone = False
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                fcntl.flock(self.fd, fcntl.LOCK_SH)  # waits while a lone starter recovers

    def shared(self) -> None:
        """After start-up recovery: let other processes in (exclusive -> shared membership)."""
        if self.alone:
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def _open_state(self, name: str) -> int:
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
                self.file_mode,
                dir_fd=self.fd,
            )
            self.fresh_count = True  # this process created it: its scan gives the first count
        except FileExistsError:
            try:
                fd = os.open(name, os.O_RDWR | _OPEN_FLAGS, dir_fd=self.fd)
            except OSError:
                return -1
        except OSError:
            return -1
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return -1
        return fd

    def close(self) -> None:
        for attr in ("_count", "fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)

    # -- block count --------------------------------------------------------------------------

    def count(self) -> int:
        """Block files in the tier as last counted (0 when the count is not kept here)."""
        if self._count < 0:
            return 0
        data = os.pread(self._count, _COUNT.size, 0)
        return max(0, _COUNT.unpack(data)[0]) if len(data) == _COUNT.size else 0

    def _update(self, delta: int, *, cap: int | None = None, absolute: bool = False) -> bool:
        if self._count < 0:
            return True
        with self._lock:
            fcntl.flock(self._count, fcntl.LOCK_EX)
            try:
                now = self.count()
                new = delta if absolute else now + delta
                if cap is not None and delta > 0 and new > cap:
                    return False
                os.pwrite(self._count, _COUNT.pack(max(0, new)), 0)
                return True
            finally:
                fcntl.flock(self._count, fcntl.LOCK_UN)

    def claim(self, cap: int | None) -> bool:
        """Count one more block file if the tier holds fewer than ``cap`` (None: no bound)."""
        return self._update(1, cap=cap)

    def unclaim(self) -> None:
        """Undo a claim whose file was not created (or count one deleted file)."""
        self._update(-1)

    def recount(self, n: int) -> None:
        """Set the count (a lone process after scanning the folder)."""
        self._update(n, absolute=True)

    # -- files --------------------------------------------------------------------------------

    def open_regular(self, name: str, flags: int) -> int:
        """An fd of ``name`` if it is a regular file (never follows a symlink, never blocks)."""
        return open_regular_at(self.fd, name, flags)

    def create(self, name: str, flags: int) -> int:
        """A new file (``O_EXCL``), owner-only or group read-write."""
        fd = os.open(
            name, flags | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, self.file_mode, dir_fd=self.fd
        )
        if self.gid >= 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, -1, self.gid)
                os.fchmod(fd, self.file_mode)
        return fd

    def publish(self, tmp: str, final: str) -> bool:
        """Give ``tmp`` the name ``final`` unless that exists; ``tmp`` is gone afterwards.

        Returns False (and discards ``tmp``) when another writer got there first.
        """
        try:
            os.link(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        except FileExistsError:
            self.unlink(tmp)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                self.unlink(tmp)
                raise
            if self.is_regular(final):  # no hard links here (some FUSE/SMB mounts): rename
                self.unlink(tmp)
                return False
            os.rename(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            return True
        self.unlink(tmp)
        return True

    def unlink(self, name: str) -> bool:
        """Delete ``name`` (never a directory); True if this call removed it."""
        try:
            os.unlink(name, dir_fd=self.fd)
            return True
        except OSError:
            return False

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None

    def is_regular(self, name: str, size: int | None = None) -> bool:
        st = self.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    def scan(self) -> Iterator[os.DirEntry[str]]:
        """Entries of the folder (names only: ``entry.name``; types from ``d_type``)."""
        return os.scandir(self.fd)

    def hold(self, fd: int) -> None:
        """Mark a temporary file as being written by a live process (until its fd closes)."""
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def is_leftover(self, name: str) -> bool:
        """A temporary file no live writer holds (see ``is_leftover_at``)."""
        return is_leftover_at(self.fd, name)
