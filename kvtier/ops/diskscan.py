"""``kvtier inspect`` and ``kvtier fsck``: read a G3 directory, also while engines use it.

Why this exists: an operator must be able to see what a disk tier holds (which models and layouts,
how many blocks, how old) and to verify it after a crash, a full disk or a copy between hosts,
without stopping the engines that share it. The file format is the disk tier's own: headers are
parsed and verified by :class:`kvtier.storage.block_file.BlockHeader`, payloads checked with its
checksum, name, fingerprint and sizes by ``disk_scan.check_header``; folders and files are opened as
the tier opens them (``kvtier.storage.tier_dir``: no symlink followed, only regular files, never
blocking on a FIFO). Nothing here writes a block or takes a lock an engine waits for; a block
deleted meanwhile (another process evicted it) is simply gone, and a temporary file a live writer
holds is in progress, not bad. ``fsck --repair`` only deletes files that failed verification and
temporary files no writer holds. A payload is hashed in 4 MiB pieces and its claimed length is
checked against the namespace's block size (from its identity file) before anything is read.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from kvtier.storage.block_file import (
    BLOCK_SUFFIX,
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
)
from kvtier.storage.disk import DiskStorage
from kvtier.storage.disk_scan import IDENTITY_FILE, TMP_SUFFIX, check_header, header_at
from kvtier.storage.tier_dir import (
    STATE_PREFIX,
    is_leftover_at,
    open_folder,
    open_regular_at,
)

__all__ = [
    "AGE_BUCKETS",
    "BadBlock",
    "FsckReport",
    "InspectReport",
    "NotATierError",
    "fsck_dir",
    "inspect_dir",
    "verify_block_file",
]

_FP_DIR = re.compile(r"^[0-9a-f]{16}$")
_CHUNK = 1 << 22
_IDENTITY_MAX = 1 << 16

AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 1 min", 60.0),
    ("< 10 min", 600.0),
    ("< 1 h", 3600.0),
    ("< 1 day", 86400.0),
    ("< 1 week", 7 * 86400.0),
    (">= 1 week", float("inf")),
)
"""Age histogram buckets of ``kvtier inspect`` (label, upper bound in seconds)."""

Progress = Callable[[int, int], None]


class NotATierError(ValueError):
    """The directory holds no kvtier disk tier (no namespace folder of block files)."""


@dataclass
class _Folder:
    """One namespace folder: its fingerprint, path, descriptor and stated identity."""

    fingerprint: int
    path: Path
    fd: int
    identity: dict[str, object] | None


def _read_identity(fd: int) -> dict[str, object] | None:
    try:
        f = open_regular_at(fd, IDENTITY_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        doc = json.loads(os.read(f, _IDENTITY_MAX))
    except (OSError, ValueError):
        return None
    finally:
        os.close(f)
    return doc if isinstance(doc, dict) else None


def _folders(root: Path) -> Iterator[_Folder]:
    """The namespace folders of a disk tier (``root`` itself when it is one, else its real
    child folders; a symlinked one is skipped, never followed); each fd is closed after use."""
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    if (
        _FP_DIR.match(root.name)
        and DiskStorage(root.parent, int(root.name, 16), 1).directory == root
    ):
        names = [(int(root.name, 16), root)]
    else:
        names = sorted(
            (int(e.name, 16), Path(e.path))
            for e in os.scandir(root)
            if _FP_DIR.match(e.name) and e.is_dir(follow_symlinks=False)
        )
    for fp, path in names:
        try:
            fd = open_folder(path)
        except OSError:
            continue
        try:
            yield _Folder(fp, path, fd, _read_identity(fd))
        finally:
            os.close(fd)


@dataclass
class _Listing:
    blocks: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    in_progress: int = 0
    other: int = 0


def _list(folder: _Folder) -> _Listing:
    """Block files, leftover temp files (no live writer), in-progress temps, other entries."""
    out = _Listing()
    for entry in sorted(os.scandir(folder.fd), key=lambda e: e.name):
        name = entry.name
        if name.startswith(STATE_PREFIX) and not name.endswith(TMP_SUFFIX):
            continue  # the tier's own bookkeeping (block count, identity)
        if not entry.is_file(follow_symlinks=False):
            out.other += 1
        elif name.endswith(TMP_SUFFIX):
            if is_leftover_at(folder.fd, name):
                out.leftovers.append(name)
            else:
                out.in_progress += 1
        elif name.endswith(BLOCK_SUFFIX):
            out.blocks.append(name)
        else:
            out.other += 1
    return out


def _limit(identity: dict[str, object] | None) -> int | None:
    value = identity.get("block_bytes") if identity else None
    return value if isinstance(value, int) and value > 0 else None


def verify_block_file(
    path: Path,
    folder_fingerprint: int,
    *,
    dir_fd: int | None = None,
    block_bytes: int | None = None,
) -> BlockHeader:
    """Check one block file completely; raise ``BlockFileError`` saying what is wrong.

    Verified: header magic, version and self-checksum; the fingerprint against the folder; the file
    name against the sequence hash; the payload length against the folder's block size (or at
    most 1 GiB when unknown) and the size against it, before any payload byte is read; the payload
    checksum, hashed piece by piece (bounded memory whatever the header claims).
    """
    own = dir_fd is None
    dfd = open_folder(path.parent) if dir_fd is None else dir_fd
    try:
        fd = open_regular_at(dfd, path.name, os.O_RDONLY)
    finally:
        if own:
            os.close(dfd)
    try:
        size = os.fstat(fd).st_size
        header = BlockHeader.unpack(os.pread(fd, HEADER_SIZE, 0))
        check_header(header, path.name, folder_fingerprint, size, block_bytes)
        digest = xxhash.xxh3_64()
        offset, left = HEADER_SIZE, header.payload_len
        while left:
            chunk = os.pread(fd, min(_CHUNK, left), offset)
            if not chunk:
                raise BlockFileError(f"short read: {offset - HEADER_SIZE} of {header.payload_len}")
            digest.update(chunk)
            offset += len(chunk)
            left -= len(chunk)
        if digest.intdigest() != header.checksum:
            raise BlockFileError("payload checksum mismatch (corrupted data)")
        return header
    finally:
        os.close(fd)


@dataclass
class InspectReport:
    """What ``kvtier inspect`` found (``identities``: each namespace's model identity)."""

    directory: str
    blocks: int = 0
    file_bytes: int = 0
    payload_bytes: int = 0
    fingerprints: dict[int, int] = field(default_factory=dict)
    identities: dict[int, dict[str, object]] = field(default_factory=dict)
    unreadable: int = 0
    other_files: int = 0
    writes_in_progress: int = 0
    age_histogram: list[tuple[str, int]] = field(default_factory=list)
    oldest_s: float | None = None
    newest_s: float | None = None

    def to_json(self) -> str:
        """The report as JSON (fingerprints as 16-digit hex strings)."""
        doc = asdict(self)
        doc["fingerprints"] = {f"{fp:016x}": n for fp, n in self.fingerprints.items()}
        doc["identities"] = {f"{fp:016x}": d for fp, d in self.identities.items()}
        return json.dumps(doc, indent=2)


def _not_a_tier(root: Path, folders: int) -> NotATierError:
    what = "no namespace folder" if not folders else "namespace folders without block files"
    return NotATierError(f"{root} is not a kvtier disk tier ({what})")


def inspect_dir(
    root: Path, on_file: Progress = lambda done, total: None, now: float | None = None
) -> InspectReport:
    """Headers, sizes and ages of every block file under ``root`` (payloads are not read).

    Raises ``NotATierError`` when ``root`` holds no namespace folder at all.
    """
    report = InspectReport(str(root))
    stamp = time.time() if now is None else now
    counts = [0] * len(AGE_BUCKETS)
    ages: list[float] = []
    folders = 0
    for folder in _folders(root):
        folders += 1
        if folder.identity is not None:
            report.identities[folder.fingerprint] = folder.identity
        listing = _list(folder)
        report.other_files += listing.other + len(listing.leftovers)
        report.writes_in_progress += listing.in_progress
        for i, name in enumerate(listing.blocks):
            on_file(i + 1, len(listing.blocks))
            try:
                header, st = header_at(folder.fd, name)
            except FileNotFoundError:
                continue  # evicted by an engine meanwhile
            except (BlockFileError, OSError):
                report.unreadable += 1
                continue
            report.blocks += 1
            report.file_bytes += st.st_size
            report.payload_bytes += header.payload_len
            fp = folder.fingerprint
            report.fingerprints[fp] = report.fingerprints.get(fp, 0) + 1
            age = max(0.0, stamp - st.st_mtime)
            ages.append(age)
            counts[next(j for j, (_, bound) in enumerate(AGE_BUCKETS) if age < bound)] += 1
    if not folders:
        raise _not_a_tier(root, folders)
    report.age_histogram = [(label, n) for (label, _), n in zip(AGE_BUCKETS, counts, strict=True)]
    if ages:
        report.oldest_s, report.newest_s = max(ages), min(ages)
    return report


@dataclass(frozen=True)
class BadBlock:
    """One file that failed verification, why, and whether ``--repair`` removed it."""

    path: str
    reason: str
    removed: bool


@dataclass
class FsckReport:
    """What ``kvtier fsck`` found (and removed, with ``--repair``)."""

    checked: int = 0
    good: int = 0
    bad: list[BadBlock] = field(default_factory=list)
    vanished: int = 0
    writes_in_progress: int = 0


def fsck_dir(
    root: Path, repair: bool = False, on_file: Progress = lambda done, total: None
) -> FsckReport:
    """Verify every block file under ``root``; with ``repair``, delete the ones that fail.

    Safe beside running engines: blocks they delete meanwhile count as ``vanished``, their
    temporary files in progress as ``writes_in_progress`` (neither is bad). Raises
    ``NotATierError`` when ``root`` holds no namespace folder.
    """
    report = FsckReport()
    folders = 0
    for folder in _folders(root):
        folders += 1
        listing = _list(folder)
        report.writes_in_progress += listing.in_progress
        limit = _limit(folder.identity)
        total = len(listing.blocks) + len(listing.leftovers)
        problems: list[tuple[str, str]] = []
        for i, name in enumerate(listing.blocks):
            report.checked += 1
            try:
                verify_block_file(
                    folder.path / name, folder.fingerprint, dir_fd=folder.fd, block_bytes=limit
                )
                report.good += 1
            except FileNotFoundError:
                report.checked -= 1
                report.vanished += 1
            except BlockFileError as exc:
                problems.append((name, str(exc)))
            except OSError as exc:
                problems.append((name, f"unreadable: {exc.strerror or exc}"))
            on_file(i + 1, total)
        for name in listing.leftovers:
            problems.append((name, "leftover temporary file of an interrupted write"))
        for name, problem in problems:
            removed = False
            if repair:
                try:
                    os.unlink(name, dir_fd=folder.fd)
                    removed = True
                except FileNotFoundError:
                    removed = True
                except OSError as exc:
                    problem = f"{problem}; cannot remove: {exc.strerror or exc}"
            report.bad.append(BadBlock(str(folder.path / name), problem, removed))
    if not folders:
        raise _not_a_tier(root, folders)
    return report
