"""The G3 block file format: a 4096-byte header, then the block's canonical bytes, padded to 4096.

Why this exists: a disk block must be verifiable on its own, by any process, after a crash or a
restart: the header says what the bytes are (fingerprint, sequence hash, parent hash, priority),
how many there are, and their xxh3_64 checksum; the header checksums itself. Fixed-width
little-endian fields packed with ``struct``: no pickle, nothing executable, nothing to trust.

Header fields, in order (``<8sIIQQQIiQQQ``): magic ``KVTIERBK``, format version, header size,
layout fingerprint, sequence hash, parent sequence hash, flags (bit 0: has parent), priority,
payload length, payload xxh3_64, then the xxh3_64 of all preceding header bytes. Zero padding to
``HEADER_SIZE`` so that the payload starts 4096-aligned (O_DIRECT).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import xxhash

__all__ = [
    "BLOCK_SUFFIX",
    "HEADER_SIZE",
    "MAGIC",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "VERSION",
    "BlockFileError",
    "BlockHeader",
    "acyclic_parents",
    "block_file_name",
    "file_size",
    "padded",
    "payload_checksum",
]

MAGIC = b"KVTIERBK"
VERSION = 1
HEADER_SIZE = 4096
_PAGE = 4096
_FIELDS = struct.Struct("<8sIIQQQIiQQ")
_CHECK = struct.Struct("<Q")
_FLAG_PARENT = 1

BLOCK_SUFFIX = ".kvb"
"""Block files are named ``<sequence hash as 16 lowercase hex digits>.kvb``."""

PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
"""Priorities a block file can hold (a signed 32-bit header field)."""


class BlockFileError(ValueError):
    """A block file is not a valid block of the expected kind; the message says why."""


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a whole number of 4096-byte pages."""
    return -(-nbytes // _PAGE) * _PAGE


def file_size(payload_len: int) -> int:
    """Exact size of a block file holding ``payload_len`` bytes."""
    return HEADER_SIZE + padded(payload_len)


def block_file_name(sequence_hash: int) -> str:
    """The file name of a block: the key of the index every process shares."""
    return f"{sequence_hash:016x}{BLOCK_SUFFIX}"


def payload_checksum(data: memoryview | bytes) -> int:
    """xxh3_64 of a block's bytes."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class BlockHeader:
    """What a block file says about itself."""

    fingerprint: int
    sequence_hash: int
    parent_hash: int | None
    priority: int
    payload_len: int
    checksum: int

    def __post_init__(self) -> None:
        if not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise ValueError(f"priority must fit in 32 bits in a block file, got {self.priority}")

    def pack(self) -> bytes:
        """The ``HEADER_SIZE`` bytes of this header (self-checksummed, zero padded)."""
        flags = _FLAG_PARENT if self.parent_hash is not None else 0
        body = _FIELDS.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            self.fingerprint,
            self.sequence_hash,
            self.parent_hash or 0,
            flags,
            self.priority,
            self.payload_len,
            self.checksum,
        )
        check = _CHECK.pack(xxhash.xxh3_64_intdigest(body))
        return (body + check).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> BlockHeader:
        """Parse and verify a header; raise ``BlockFileError`` naming what is wrong."""
        need = _FIELDS.size + _CHECK.size
        if len(data) < need:
            raise BlockFileError(f"header is {len(data)} bytes, needs at least {need}")
        body = bytes(data[: _FIELDS.size])
        (magic, version, hsize, fp, seq, parent, flags, prio, plen, csum) = _FIELDS.unpack(body)
        if magic != MAGIC:
            raise BlockFileError(f"bad magic {magic!r} (not a kvtier block file)")
        if version != VERSION:
            raise BlockFileError(f"format version {version}, this kvtier reads {VERSION}")
        if hsize != HEADER_SIZE:
            raise BlockFileError(f"header size {hsize}, expected {HEADER_SIZE}")
        (stored,) = _CHECK.unpack(bytes(data[_FIELDS.size : need]))
        if stored != xxhash.xxh3_64_intdigest(body):
            raise BlockFileError("header checksum mismatch (corrupted header)")
        return cls(
            fingerprint=fp,
            sequence_hash=seq,
            parent_hash=parent if flags & _FLAG_PARENT else None,
            priority=prio,
            payload_len=plen,
            checksum=csum,
        )


def acyclic_parents(
    order: Iterable[int], parents: Mapping[int, int | None]
) -> dict[int, int | None]:
    """The parent links of blocks restored in ``order`` that cannot pin anything forever.

    A header may name any parent: itself, or a chain that loops back (a corrupt or hostile
    file). A pool counts a block's children to keep parents alive, so such a link would make
    blocks that are never evicted. A link to a parent among the restored blocks is kept only if
    that parent comes *earlier* in ``order`` (give parents first); a self link and every cycle
    become None. A link to a block not restored at all is kept (it cannot close a cycle).
    """
    blocks = list(order)
    members = set(blocks)
    seen: set[int] = set()
    out: dict[int, int | None] = {}
    for h in blocks:
        p = parents.get(h)
        keep = p is not None and p != h and (p in seen or p not in members)
        out[h] = p if keep else None
        seen.add(h)
    return out
