"""What ``DiskStorage.open`` reads of a G3 folder: block names, headers, O_DIRECT, identity.

Start-up is bounded: up to ``scan_headers_up_to`` files every header is read (bad files removed,
parents, priorities and ages restored into the caller's index); beyond that only names are read
(a few seconds per million files, ``names_only``), the caller indexes nothing at start, and each
block joins its index when first looked up, header verified when it is read. Functions of a
``TierDir``, no state; ``DiskStorage`` keeps to reading and writing blocks.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from kvtier.storage.block_file import (
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
    block_file_name,
    file_size,
)
from kvtier.storage.tier_dir import STATE_PREFIX, TierDir, open_regular_at
from kvtier.storage.vectored_io import ALIGN

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
IDENTITY_FILE = STATE_PREFIX + "identity.json"
"""The model identity of a namespace folder (JSON, written once; shown by ``kvtier inspect``)."""
_BLOCK_NAME = re.compile(r"[0-9a-f]{16}\.kvb")


@dataclass(frozen=True)
class StoredBlock:
    """A block found on ``open()`` (with ``parent_hash``/``priority``/age from its header when
    the scan read headers; None / 0 / 0 when it read names only)."""

    sequence_hash: int
    parent_hash: int | None
    priority: int
    mtime_ns: int


def scan_names(d: TierDir, writable: bool) -> list[int]:
    """Sequence hashes of the block files there; leftover temporary files (a crash mid-write, no
    live writer) are removed when ``writable``; other names, symlinks, FIFOs, folders ignored."""
    hashes: list[int] = []
    is_block = _BLOCK_NAME.fullmatch
    for entry in d.scan():
        name = entry.name
        if is_block(name):
            if entry.is_file(follow_symlinks=False):
                hashes.append(int(name[:16], 16))
        elif name.endswith(TMP_SUFFIX) and writable and d.is_leftover(name):
            d.unlink(name)
    return hashes


MAX_PAYLOAD = 1 << 30
"""Largest payload accepted where a namespace does not state its block size (1 GiB)."""


def check_geometry(header: BlockHeader, size: int, block_bytes: int | None) -> None:
    """The payload is ``block_bytes`` long (None: at most ``MAX_PAYLOAD``) and the file exactly
    holds it; checked before any payload byte is read."""
    plen = header.payload_len
    if plen > MAX_PAYLOAD if block_bytes is None else plen != block_bytes:
        want = f"at most {MAX_PAYLOAD}" if block_bytes is None else str(block_bytes)
        raise BlockFileError(f"header claims a {plen}-byte payload; blocks here are {want} bytes")
    if size != file_size(plen):
        raise BlockFileError(f"file is {size} bytes, expected {file_size(plen)} (truncated?)")


def check_header(
    header: BlockHeader, name: str, fingerprint: int, size: int, block_bytes: int | None
) -> None:
    """The header belongs in file ``name`` of folder ``fingerprint`` and fits its size (the
    wording ``kvtier fsck`` reports); raises BlockFileError."""
    if header.fingerprint != fingerprint:
        raise BlockFileError(
            f"fingerprint {header.fingerprint:016x} in a folder of {fingerprint:016x}"
        )
    if name != block_file_name(header.sequence_hash):
        raise BlockFileError(f"holds sequence hash {header.sequence_hash:016x}, named {name}")
    check_geometry(header, size, block_bytes)


def header_at(dir_fd: int, name: str) -> tuple[BlockHeader, os.stat_result]:
    """The header (parsed, not yet checked against its folder) and stat of block file ``name``."""
    fd = open_regular_at(dir_fd, name, os.O_RDONLY)
    try:
        return BlockHeader.unpack(os.pread(fd, HEADER_SIZE, 0)), os.fstat(fd)
    finally:
        os.close(fd)


def read_header(d: TierDir, name: str, fingerprint: int, h: int, block_bytes: int) -> StoredBlock:
    """The verified header of block file ``name`` of hash ``h``; raises BlockFileError when bad."""
    header, st = header_at(d.fd, name)
    check_header(header, name, fingerprint, st.st_size, block_bytes)
    return StoredBlock(h, header.parent_hash, header.priority, st.st_mtime_ns)


def probe_o_direct(d: TierDir) -> bool:
    """Whether the folder's filesystem takes O_DIRECT writes (tmpfs refuses them)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = f".probe-{uuid.uuid4().hex}{TMP_SUFFIX}"
    buf = mmap.mmap(-1, ALIGN)
    try:
        fd = d.create(probe, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.pwritev(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        d.unlink(probe)
        buf.close()


def write_identity(d: TierDir, doc: Mapping[str, object], where: os.PathLike[str]) -> None:
    """Write ``doc`` as the folder's ``IDENTITY_FILE`` unless one is there (a failure is logged)."""
    if d.is_regular(IDENTITY_FILE):
        return
    tmp = f"{IDENTITY_FILE}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    try:
        fd = d.create(tmp, os.O_WRONLY)
        try:
            os.write(fd, json.dumps(doc, indent=2, sort_keys=True).encode())
        finally:
            os.close(fd)
        d.publish(tmp, IDENTITY_FILE)
    except OSError as exc:
        logger.warning("kvtier: cannot write %s: %s", where, exc)
