"""The KV-event stream over ZMQ: ``KvEventPublisher`` (PUB, optional ROUTER replay) and
``KvEventSubscriber`` (tests, the CLI, simple routers); ``kvtier.ops.events`` describes the
stream. Constructors do nothing; ``start()`` binds or connects.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvtier.lifecycle import Lifecycle
from kvtier.ops.event_wire import END_SEQ, EventBatch, KvEvent, decode_batch, encode_batch


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
