"""How a block lives in G4: its key and its value (the G3 block file header, then the bytes).

Why this exists: a remote value is read by other engines on other hosts, so it must be verifiable
on its own, exactly like a G3 file: the value is the 4096-byte ``BlockHeader`` of
``kvtier.storage.block_file`` (fingerprint, sequence hash, parent, payload length, xxh3_64 of the
payload, self-checksummed) followed by the payload. No pickle, nothing executable. The key names
the namespace (model identity, layout fingerprint, TP rank) and the sequence hash (which already
carries the cache salt and LoRA name), so bytes stored for one model, layout or rank are never
served to another: a value is accepted only if its header matches what the key promised.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from kvtier.storage.block_file import HEADER_SIZE, BlockFileError, BlockHeader, payload_checksum

__all__ = [
    "KEY_PREFIX",
    "ValueBuffers",
    "decode_block",
    "encode_block",
    "encode_in_place",
    "remote_key",
    "remote_namespace",
]

KEY_PREFIX = "kvtier:v1"


def remote_namespace(model_identity: int, fingerprint: int, rank: int, world: int) -> str:
    """The key namespace of one rank of one model with one KV layout."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return f"{KEY_PREFIX}:{model_identity:016x}:{fingerprint:016x}:{rank}of{world}"


def remote_key(namespace: str, seq_hash: int) -> bytes:
    """The key of one block. No hash tag: a request's blocks spread over a cluster's shards."""
    return f"{namespace}:{seq_hash:016x}".encode()


def encode_block(
    fingerprint: int, seq_hash: int, parent_hash: int | None, payload: bytes | memoryview
) -> bytes:
    """The value of one block: header (with the payload's checksum) + payload."""
    buf = bytearray(HEADER_SIZE) + payload
    return bytes(encode_in_place(fingerprint, seq_hash, parent_hash, buf))


class ValueBuffers:
    """Buffers for values (room for the header, then the payload) from a bounded stock of spare
    buffers, given back once sent: the one copy a write-behind makes (``encode_in_place`` fills
    the header later, off the engine's step).

    Why a stock: a fresh 2 MiB ``bytearray`` is mapped anew, zeroed and page-faulted in (512
    faults) before the payload is copied in, which costs more than the copy (copy + checksum into
    a spare buffer: about 3x the rate of a fresh one, measured). The copy is numpy's, which
    releases the GIL (a ``bytearray`` slice assignment holds it). Keeps at most ``keep_bytes``
    of spares. Thread-safe (the engine's thread fills, the writer's gives back)."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._spare: list[bytearray] = []
        self._spare_bytes = 0
        self._lock = threading.Lock()

    def fill(self, payload: bytes | memoryview) -> bytearray:
        """A buffer of ``HEADER_SIZE + len(payload)`` bytes with ``payload`` after the header."""
        size = HEADER_SIZE + len(payload)
        buf = None
        with self._lock:
            while self._spare and buf is None:
                spare = self._spare.pop()
                self._spare_bytes -= len(spare)
                if len(spare) == size:  # else another block size: let it go
                    buf = spare
        if buf is None:
            buf = bytearray(size)
        np.copyto(np.frombuffer(buf, np.uint8)[HEADER_SIZE:], np.frombuffer(payload, np.uint8))
        return buf

    def give_back(self, bufs: Iterable[bytearray]) -> None:
        """Keep ``bufs`` for later ``fill`` calls (as many as fit ``keep_bytes``); nothing may
        still read them."""
        with self._lock:
            for buf in bufs:
                if self._spare_bytes + len(buf) <= self.keep_bytes:
                    self._spare.append(buf)
                    self._spare_bytes += len(buf)


def encode_in_place(
    fingerprint: int, seq_hash: int, parent_hash: int | None, buf: bytearray
) -> memoryview:
    """Fill the header of a ``ValueBuffers.fill`` buffer (checksum of its payload) and return
    the value."""
    view = memoryview(buf)
    payload = view[HEADER_SIZE:]
    header = BlockHeader(
        fingerprint=fingerprint,
        sequence_hash=seq_hash,
        parent_hash=parent_hash,
        priority=0,
        payload_len=len(payload),
        checksum=payload_checksum(payload),
    )
    view[:HEADER_SIZE] = header.pack()
    return view


def decode_block(
    value: bytes, fingerprint: int, seq_hash: int, payload_len: int
) -> tuple[BlockHeader, memoryview]:
    """Verify a value read from G4 and return its header and payload (a view into ``value``).

    Raises ``BlockFileError`` naming what is wrong (truncated, another layout or block, bad
    checksum): the caller treats it as a miss and never serves the bytes."""
    if len(value) != HEADER_SIZE + payload_len:
        raise BlockFileError(
            f"remote value is {len(value)} bytes, expected {HEADER_SIZE + payload_len}"
        )
    view = memoryview(value)
    header = BlockHeader.unpack(view[:HEADER_SIZE])
    if header.fingerprint != fingerprint:
        raise BlockFileError(
            f"layout fingerprint {header.fingerprint:016x}, expected {fingerprint:016x}"
        )
    if header.sequence_hash != seq_hash:
        raise BlockFileError(f"holds block {header.sequence_hash:016x}, expected {seq_hash:016x}")
    if header.payload_len != payload_len:
        raise BlockFileError(f"payload {header.payload_len} bytes, expected {payload_len}")
    payload = view[HEADER_SIZE:]
    if payload_checksum(payload) != header.checksum:
        raise BlockFileError("payload checksum mismatch (corrupted value)")
    return header, payload
