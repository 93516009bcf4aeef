"""The KV-event wire format of vLLM: the events, a batch, and its msgpack encoding.

Why apart: the publisher, the subscriber and the mapping from registry events all speak it
(``kvtier.ops.events`` describes the stream). A test decodes it with vLLM's msgspec classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

MEDIUM_HOST = "CPU"
"""Medium of G2 (pinned host memory) in events, as vLLM names its CPU offload tier."""
MEDIUM_DISK = "DISK"
"""Medium of G3 (the disk tier) in events, as Dynamo's KVBM names it."""
MEDIUM_REMOTE = "REMOTE"
"""Medium of G4 (the remote tier shared by a fleet of engines through Redis / Valkey)."""
MEDIUM_DEVICE = "GPU"
"""Medium of G1 (vLLM publishes its own G1 events; kvtier's are off by default)."""
TIER_MEDIUM: dict[str, str] = {
    "G1": MEDIUM_DEVICE,
    "G2": MEDIUM_HOST,
    "G3": MEDIUM_DISK,
    "G4": MEDIUM_REMOTE,
}
"""Medium of each registry tier name."""
END_SEQ = -1
"""Sequence number of the replay socket's end-of-replay marker."""

_U64_MAX = (1 << 64) - 1


def _check_hashes(name: str, hashes: Sequence[int]) -> None:
    if not hashes:
        raise ValueError(f"{name}: block_hashes must not be empty")
    for h in hashes:
        if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h <= _U64_MAX:
            raise ValueError(f"{name}: block hash {h!r} is not an unsigned 64-bit integer")


@dataclass(frozen=True)
class BlockStored:
    """Blocks now held by ``medium``; ``token_ids`` are all their tokens, block after block.

    ``token_ids`` is empty when the publisher does not know the tokens (kvtier's tiers store
    blocks by sequence hash; the connector fills the tokens in when it has them).
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str
    lora_name: str | None = None

    def __post_init__(self) -> None:
        _check_hashes("BlockStored", self.block_hashes)
        if self.block_size <= 0:
            raise ValueError(f"BlockStored: block_size must be positive, got {self.block_size}")
        if self.token_ids and len(self.token_ids) != len(self.block_hashes) * self.block_size:
            raise ValueError(
                f"BlockStored: {len(self.token_ids)} token ids for {len(self.block_hashes)} "
                f"blocks of {self.block_size} tokens"
            )
        if self.parent_block_hash is not None:
            _check_hashes("BlockStored parent", (self.parent_block_hash,))

    def to_wire(self) -> dict[str, Any]:
        """The map msgspec writes for vLLM's ``BlockStored`` (defaulted fields omitted)."""
        return {
            "type": "BlockStored",
            "block_hashes": list(self.block_hashes),
            "parent_block_hash": self.parent_block_hash,
            "token_ids": list(self.token_ids),
            "block_size": self.block_size,
            "lora_id": None,
            "medium": self.medium,
            "lora_name": self.lora_name,
        }


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks no longer held by ``medium``."""

    block_hashes: tuple[int, ...]
    medium: str

    def __post_init__(self) -> None:
        _check_hashes("BlockRemoved", self.block_hashes)

    def to_wire(self) -> dict[str, Any]:
        """The map msgspec writes for vLLM's ``BlockRemoved``."""
        return {
            "type": "BlockRemoved",
            "block_hashes": list(self.block_hashes),
            "medium": self.medium,
        }


@dataclass(frozen=True)
class AllBlocksCleared:
    """Everything the publisher held is gone (a tier was cleared)."""

    def to_wire(self) -> dict[str, Any]:
        """The map msgspec writes for vLLM's ``AllBlocksCleared``."""
        return {"type": "AllBlocksCleared"}


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class EventBatch:
    """One published batch: when, what, and which data-parallel rank sent it."""

    ts: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int = 0


def encode_batch(batch: EventBatch) -> bytes:
    """The msgpack payload of ``batch``, byte-identical to vLLM's ``KVEventBatch`` encoding."""
    packed: bytes = msgpack.packb(
        [batch.ts, [e.to_wire() for e in batch.events], batch.data_parallel_rank],
        use_bin_type=True,
    )
    return packed


_WIRE_TYPES: dict[str, tuple[type, ...]] = {
    "block_hashes": (list,),
    "parent_block_hash": (int, type(None)),
    "token_ids": (list,),
    "block_size": (int,),
    "medium": (str, type(None)),
    "lora_name": (str, type(None)),
}
"""Wire types of the event fields decoded here (msgpack arrays come back as lists)."""


def _event_from_wire(obj: Any) -> KvEvent:
    if not isinstance(obj, dict) or "type" not in obj:
        raise ValueError(f"KV event is not a tagged map: {obj!r}")
    kind = obj["type"]
    for key, types in _WIRE_TYPES.items():
        value = obj.get(key)
        if key in obj and (isinstance(value, bool) or not isinstance(value, types)):
            raise ValueError(f"KV event {kind!r}: field {key!r} has the wrong type: {value!r}")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in obj.get("token_ids", ())):
        raise ValueError(f"KV event {kind!r}: token_ids must be integers")
    if kind == "BlockStored":
        return BlockStored(
            block_hashes=tuple(obj["block_hashes"]),
            parent_block_hash=obj["parent_block_hash"],
            token_ids=tuple(obj["token_ids"]),
            block_size=obj["block_size"],
            medium=obj["medium"],
            lora_name=obj.get("lora_name"),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(block_hashes=tuple(obj["block_hashes"]), medium=obj["medium"])
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {kind!r}")


def decode_batch(payload: bytes) -> EventBatch:
    """Parse a payload from :func:`encode_batch` or from vLLM; ValueError when malformed."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ValueError(f"KV event batch is not valid msgpack: {exc}") from exc
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise ValueError(f"KV event batch is not [ts, events, dp_rank]: {obj!r}")
    rank = obj[2] if len(obj) == 3 and obj[2] is not None else 0
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"KV event batch's data-parallel rank is not an int >= 0: {rank!r}")
    if isinstance(obj[0], bool) or not isinstance(obj[0], int | float):
        raise ValueError(f"KV event batch's timestamp is not a number: {obj[0]!r}")
    if not isinstance(obj[1], list):
        raise ValueError(f"KV event batch's events are not a list: {obj[1]!r}")
    try:
        return EventBatch(
            ts=float(obj[0]),
            events=tuple(_event_from_wire(e) for e in obj[1]),
            data_parallel_rank=rank,
        )
    except KeyError as exc:
        raise ValueError(f"KV event lacks the field {exc.args[0]!r}") from exc
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"KV event batch has a field of the wrong type: {exc}") from exc
