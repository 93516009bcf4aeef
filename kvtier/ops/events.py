"""KV events for cache-aware routers, in vLLM's KV-event wire format.

A router (Dynamo's, llm-d's, vLLM's own) keeps an index of which engine holds which prefix. vLLM
publishes what its G1 pool stores and evicts; kvtier publishes what G2 (medium ``"CPU"``) and G3
(medium ``"DISK"``) store and evict, on the same wire so the same subscriber code reads both:

- a ZMQ PUB socket sends three frames per batch: ``topic``, an 8-byte big-endian sequence number,
  and the msgpack payload (so a subscriber detects gaps: sequence numbers are consecutive);
- the payload is an array ``[timestamp, [event, ...], data_parallel_rank]``;
- each event is a map tagged as msgspec tags vLLM's structs: ``{"type": "BlockStored", ...}``,
  ``{"type": "BlockRemoved", ...}``, ``{"type": "AllBlocksCleared"}``;
- an optional ROUTER replay socket answers ``[b"", start_seq(8 bytes)]`` with every buffered batch
  from that number on, then an end marker whose sequence number is -1 (as vLLM 0.32 does).

This module imports no torch and no vLLM (the payload is built with ``msgpack``; a test decodes it
with vLLM's own msgspec classes). Constructors do nothing; :meth:`KvEventPublisher.start` binds.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from kvtier.core.registry import RemoveEvent, StoreEvent, TierEvent
from kvtier.lifecycle import Lifecycle

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


def _event_from_wire(obj: Any) -> KvEvent:
    if not isinstance(obj, dict) or "type" not in obj:
        raise ValueError(f"KV event is not a tagged map: {obj!r}")
    kind = obj["type"]
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
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"KV event batch is not valid msgpack: {exc}") from exc
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise ValueError(f"KV event batch is not [ts, events, dp_rank]: {obj!r}")
    rank = obj[2] if len(obj) == 3 and obj[2] is not None else 0
    return EventBatch(
        ts=float(obj[0]), events=tuple(_event_from_wire(e) for e in obj[1]), data_parallel_rank=rank
    )


def events_from_tier_events(
    tier_events: Iterable[TierEvent],
    block_size: int,
    tokens_of: Callable[[int], Sequence[int] | None] | None = None,
    tiers: Collection[str] = ("G2", "G3"),
) -> list[KvEvent]:
    """Map the registry's Store/Remove events to wire events, order kept.

    Consecutive stores in one tier that form a chain (each one's parent is the previous one's
    hash) become one ``BlockStored`` whose ``parent_block_hash`` is the first one's parent, as
    vLLM batches a request's blocks; consecutive removes in one tier become one
    ``BlockRemoved``. ``tokens_of(sequence_hash)`` gives a block's tokens when known; the batch
    carries token ids only when every block's are known. Tiers not in ``tiers`` are left out
    (G1 by default: vLLM publishes its own).
    """
    out: list[KvEvent] = []
    run: list[TierEvent] = []

    def flush() -> None:
        if not run:
            return
        first = run[0]
        medium = TIER_MEDIUM.get(first.tier, first.tier)
        hashes = tuple(e.sequence_hash for e in run)
        if isinstance(first, RemoveEvent):
            out.append(BlockRemoved(hashes, medium))
        else:
            tokens: list[int] = []
            for h in hashes:
                got = tokens_of(h) if tokens_of is not None else None
                if got is None or len(got) != block_size:
                    tokens = []
                    break
                tokens.extend(got)
            out.append(
                BlockStored(hashes, first.parent_sequence_hash, tuple(tokens), block_size, medium)
            )
        run.clear()

    for ev in tier_events:
        if ev.tier not in tiers:
            continue
        if run:
            last = run[-1]
            same_kind = type(last) is type(ev) and last.tier == ev.tier
            chained = (
                not isinstance(ev, StoreEvent) or ev.parent_sequence_hash == last.sequence_hash
            )
            if not (same_kind and chained):
                flush()
        run.append(ev)
    flush()
    return out


@dataclass(frozen=True)
class EventsConfig:
    """Where and how KV events are published.

    ``endpoint`` is bound (``tcp://127.0.0.1:0`` picks a free port; see
    :attr:`KvEventPublisher.endpoint`). The default binds localhost only: opening the stream to
    other hosts is a deliberate choice (``tcp://*:5557``).
    """

    endpoint: str = "tcp://127.0.0.1:5557"
    replay_endpoint: str | None = None
    topic: str = ""
    data_parallel_rank: int = 0
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"EventsConfig.{name} {value!r} is not a tcp://, ipc:// or inproc:// URL"
                )
        if self.data_parallel_rank < 0:
            raise ValueError(
                f"EventsConfig.data_parallel_rank must be >= 0, got {self.data_parallel_rank}"
            )
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EventsConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass
class _PublisherState:
    ctx: zmq.Context[Any]
    pub: zmq.Socket[Any]
    replay: zmq.Socket[Any] | None
    thread: threading.Thread
    queue: queue.Queue[EventBatch | None]
    buffer: deque[tuple[int, bytes]] = field(default_factory=deque)


class KvEventPublisher(Lifecycle):
    """Publishes batches of KV events on a ZMQ PUB socket, with consecutive sequence numbers.

    ``publish`` only enqueues (it never blocks the engine on the network); one thread owns the
    sockets, numbers and sends each batch, keeps the last ``buffer_steps`` for replay and answers
    replay requests. ``close`` sends what is queued, then stops.
    """

    def __init__(self, config: EventsConfig) -> None:
        self._config = config
        self._state: _PublisherState | None = None
        self._endpoint: str | None = None
        self._replay_endpoint: str | None = None
        self._published = 0

    @property
    def endpoint(self) -> str:
        """The bound PUB address (with the real port when the configured one was 0)."""
        if self._endpoint is None:
            raise RuntimeError("KvEventPublisher is not started")
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The bound replay (ROUTER) address, or None when replay is off."""
        return self._replay_endpoint

    @property
    def published(self) -> int:
        """How many batches were sent so far (the next batch's sequence number)."""
        return self._published

    def start(self) -> KvEventPublisher:
        """Bind the sockets and start the sending thread."""
        if self._state is not None:
            raise RuntimeError("KvEventPublisher is already started")
        cfg = self._config
        ctx: zmq.Context[Any] = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        replay: zmq.Socket[Any] | None = None
        try:
            pub.set_hwm(cfg.hwm)
            pub.setsockopt(zmq.LINGER, 1000)
            pub.bind(cfg.endpoint)
            self._endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            if cfg.replay_endpoint is not None:
                replay = ctx.socket(zmq.ROUTER)
                replay.setsockopt(zmq.LINGER, 0)
                replay.bind(cfg.replay_endpoint)
                self._replay_endpoint = replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            pub.close(linger=0)
            if replay is not None:
                replay.close(linger=0)
            ctx.term()
            raise OSError(f"cannot bind KV event sockets ({cfg.endpoint}): {exc}") from exc
        state = _PublisherState(
            ctx=ctx,
            pub=pub,
            replay=replay,
            thread=threading.Thread(target=self._run, name="kvtier-events", daemon=True),
            queue=queue.Queue(maxsize=cfg.max_queue_size),
            buffer=deque(maxlen=cfg.buffer_steps),
        )
        self._state = state
        state.thread.start()
        return self

    def publish(self, events: Iterable[KvEvent], ts: float | None = None) -> None:
        """Queue one batch (skipped when ``events`` is empty)."""
        state = self._state
        if state is None:
            raise RuntimeError("KvEventPublisher is not started")
        batch = tuple(events)
        if not batch:
            return
        stamp = time.time() if ts is None else ts
        state.queue.put(EventBatch(stamp, batch, self._config.data_parallel_rank))

    def close(self) -> None:
        """Send what is queued, stop the thread and close the sockets. Safe to call twice."""
        state = self._state
        if state is None:
            return
        self._state = None
        state.queue.put(None)
        state.thread.join()
        state.pub.close()
        if state.replay is not None:
            state.replay.close(linger=0)
        state.ctx.term()

    def _run(self) -> None:
        state = self._state
        assert state is not None
        topic = self._config.topic.encode()
        while True:
            if state.replay is not None and state.replay.poll(0):
                self._serve_replay(state, topic)
            try:
                batch = state.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if batch is None:
                return
            payload = encode_batch(batch)
            seq = self._published
            state.pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
            state.buffer.append((seq, payload))
            self._published = seq + 1

    @staticmethod
    def _serve_replay(state: _PublisherState, topic: bytes) -> None:
        assert state.replay is not None
        frames = state.replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            return  # not a replay request; nothing to answer
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(state.buffer):
            if seq >= first:
                state.replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))
        state.replay.send_multipart(
            (client, b"", b"", END_SEQ.to_bytes(8, "big", signed=True), b"")
        )


@dataclass(frozen=True)
class ReceivedBatch:
    """A batch as a subscriber saw it: its sequence number and the decoded events."""

    seq: int
    batch: EventBatch


class KvEventSubscriber(Lifecycle):
    """Reads a KV event stream and notices gaps (for tests, the CLI and simple routers)."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        self._endpoint = endpoint
        self._topic = topic
        self._ctx: zmq.Context[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._next_seq: int | None = None
        self.gaps: list[tuple[int, int]] = []
        """Each missed range as (first missing, first received after it)."""

    def start(self) -> KvEventSubscriber:
        """Connect and subscribe to the topic."""
        if self._sub is not None:
            raise RuntimeError("KvEventSubscriber is already started")
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic.encode())
        self._sub.connect(self._endpoint)
        return self

    def receive(self, timeout_s: float) -> ReceivedBatch | None:
        """The next batch, or None when nothing arrives within ``timeout_s``."""
        sub = self._sub
        if sub is None:
            raise RuntimeError("KvEventSubscriber is not started")
        if not sub.poll(int(timeout_s * 1000)):
            return None
        frames = sub.recv_multipart()
        if len(frames) != 3 or len(frames[1]) != 8:
            raise ValueError(
                f"KV event message has {len(frames)} frames, expected topic, seq, payload"
            )
        seq = int.from_bytes(frames[1], "big")
        if self._next_seq is not None and seq != self._next_seq:
            self.gaps.append((self._next_seq, seq))
        self._next_seq = seq + 1
        return ReceivedBatch(seq, decode_batch(frames[2]))

    def replay(
        self, replay_endpoint: str, start_seq: int, timeout_s: float = 5.0
    ) -> list[ReceivedBatch]:
        """Ask the publisher's replay socket for every buffered batch from ``start_seq`` on.

        This is how a subscriber fills a gap (or the batches sent before it connected). Raises
        TimeoutError when the publisher does not answer within ``timeout_s``.
        """
        if self._ctx is None:
            raise RuntimeError("KvEventSubscriber is not started")
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay_endpoint)
        out: list[ReceivedBatch] = []
        try:
            dealer.send_multipart((b"", start_seq.to_bytes(8, "big")))
            while True:
                if not dealer.poll(int(timeout_s * 1000)):
                    raise TimeoutError(f"no replay answer from {replay_endpoint} in {timeout_s} s")
                frames = dealer.recv_multipart()
                if len(frames) != 4:
                    raise ValueError(f"replay message has {len(frames)} frames, expected 4")
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    return out
                out.append(ReceivedBatch(seq, decode_batch(frames[3])))
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        """Disconnect. Safe to call twice."""
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
