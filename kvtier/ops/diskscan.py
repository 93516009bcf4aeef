"""``kvtier inspect`` and ``kvtier fsck``: read a G3 directory without the engine running.

Why this exists: an operator must be able to see what a disk tier holds (which model layouts,
how many blocks, how old) and to verify it after a crash, a full disk or a copy between hosts,
without starting an engine. The file format is the disk tier's own: headers are parsed and
verified by :class:`kvtier.storage.block_file.BlockHeader`, payloads checked with its
``payload_checksum``, sizes with ``file_size``, and names and folders come from
:class:`kvtier.storage.disk.DiskStorage`. Nothing here writes a block; ``fsck --repair`` only
deletes files that failed verification (and leftover temporary files of interrupted writes).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvtier.storage.block_file import (
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
    file_size,
    payload_checksum,
)
from kvtier.storage.disk import DiskStorage

_FP_DIR = re.compile(r"^[0-9a-f]{16}$")
_TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 22

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


def _block_suffix() -> str:
    return DiskStorage(".", 0, 1).path(0).suffix


def _fingerprint_dirs(root: Path) -> list[tuple[int, Path]]:
    """The fingerprint folders of a disk tier: ``root`` itself when it is one, else its children."""
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    if _FP_DIR.match(root.name):
        fp = int(root.name, 16)
        if DiskStorage(root.parent, fp, 1).directory == root:
            return [(fp, root)]
    return sorted(
        (int(p.name, 16), p) for p in root.iterdir() if p.is_dir() and _FP_DIR.match(p.name)
    )


def _files(root: Path) -> tuple[list[tuple[int, Path]], list[Path], int]:
    """(fingerprint folder, block file) pairs, leftover temp files, and the count of other files."""
    suffix = _block_suffix()
    blocks: list[tuple[int, Path]] = []
    temps: list[Path] = []
    other = 0
    for fp, folder in _fingerprint_dirs(root):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if not entry.is_file(follow_symlinks=False):
                other += 1
            elif entry.name.endswith(_TMP_SUFFIX):
                temps.append(path)
            elif path.suffix == suffix:
                blocks.append((fp, path))
            else:
                other += 1
    return blocks, temps, other


def _read_header(path: Path) -> tuple[BlockHeader, int]:
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        size = os.fstat(f.fileno()).st_size
    return BlockHeader.unpack(head), size


def verify_block_file(path: Path, folder_fingerprint: int) -> BlockHeader:
    """Check one block file completely; raise ``BlockFileError`` saying what is wrong.

    Verified: header magic, version and self-checksum; the fingerprint against the folder; the file
    name against the sequence hash; the size against the payload length; the payload checksum.
    """
    header, size = _read_header(path)
    if header.fingerprint != folder_fingerprint:
        raise BlockFileError(
            f"fingerprint {header.fingerprint:016x} in a folder of {folder_fingerprint:016x}"
        )
    expected = DiskStorage(path.parent.parent, header.fingerprint, 1).path(header.sequence_hash)
    if path.name != expected.name:
        raise BlockFileError(f"holds sequence hash {header.sequence_hash:016x}, named {path.name}")
    if size != file_size(header.payload_len):
        raise BlockFileError(
            f"file is {size} bytes, expected {file_size(header.payload_len)} (truncated?)"
        )
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        payload = bytearray()
        while len(payload) < header.payload_len:
            chunk = f.read(min(_CHUNK, header.payload_len - len(payload)))
            if not chunk:
                raise BlockFileError(f"short read: {len(payload)} of {header.payload_len} bytes")
            payload += chunk
    if payload_checksum(bytes(payload)) != header.checksum:
        raise BlockFileError("payload checksum mismatch (corrupted data)")
    return header


@dataclass
class InspectReport:
    """What ``kvtier inspect`` found."""

    directory: str
    blocks: int = 0
    file_bytes: int = 0
    payload_bytes: int = 0
    fingerprints: dict[int, int] = field(default_factory=dict)
    unreadable: int = 0
    other_files: int = 0
    age_histogram: list[tuple[str, int]] = field(default_factory=list)
    oldest_s: float | None = None
    newest_s: float | None = None

    def to_json(self) -> str:
        """The report as JSON (fingerprints as 16-digit hex strings)."""
        doc = asdict(self)
        doc["fingerprints"] = {f"{fp:016x}": n for fp, n in self.fingerprints.items()}
        return json.dumps(doc, indent=2)


def inspect_dir(
    root: Path, on_file: Progress = lambda done, total: None, now: float | None = None
) -> InspectReport:
    """Headers, sizes and ages of every block file under ``root`` (payloads are not read)."""
    blocks, temps, other = _files(root)
    report = InspectReport(str(root), other_files=other + len(temps))
    stamp = time.time() if now is None else now
    counts = [0] * len(AGE_BUCKETS)
    ages: list[float] = []
    for i, (fp, path) in enumerate(blocks):
        try:
            header, size = _read_header(path)
            st = path.stat()
        except (BlockFileError, OSError):
            report.unreadable += 1
            on_file(i + 1, len(blocks))
            continue
        report.blocks += 1
        report.file_bytes += size
        report.payload_bytes += header.payload_len
        report.fingerprints[fp] = report.fingerprints.get(fp, 0) + 1
        age = max(0.0, stamp - st.st_mtime)
        ages.append(age)
        counts[next(j for j, (_, bound) in enumerate(AGE_BUCKETS) if age < bound)] += 1
        on_file(i + 1, len(blocks))
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


def _problems(root: Path, on_file: Progress) -> Iterator[tuple[Path, str | None]]:
    blocks, temps, _ = _files(root)
    total = len(blocks) + len(temps)
    for i, (fp, path) in enumerate(blocks):
        try:
            verify_block_file(path, fp)
            yield path, None
        except BlockFileError as exc:
            yield path, str(exc)
        except OSError as exc:
            yield path, f"unreadable: {exc.strerror or exc}"
        on_file(i + 1, total)
    for j, path in enumerate(temps):
        yield path, "leftover temporary file of an interrupted write"
        on_file(len(blocks) + j + 1, total)


def fsck_dir(
    root: Path, repair: bool = False, on_file: Progress = lambda done, total: None
) -> FsckReport:
    """Verify every block file under ``root``; with ``repair``, delete the ones that fail."""
    report = FsckReport()
    for path, problem in _problems(root, on_file):
        if not path.name.endswith(_TMP_SUFFIX):
            report.checked += 1
        if problem is None:
            report.good += 1
            continue
        removed = False
        if repair:
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                removed = True
            except OSError as exc:
                problem = f"{problem}; cannot remove: {exc.strerror or exc}"
        report.bad.append(BadBlock(str(path), problem, removed))
    return report
