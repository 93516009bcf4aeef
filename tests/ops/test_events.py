"""The KV event stream: vLLM's wire format, sequence numbers, gaps, replay, bad input."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from kvtier.ops.event_stream import EventsConfig, KvEventPublisher, KvEventSubscriber
from kvtier.ops.event_wire import (
    MEDIUM_DISK,
    MEDIUM_HOST,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    encode_batch,
)

STORED = BlockStored(
    block_hashes=(2**64 - 1, 7),
    parent_block_hash=12345,
    token_ids=tuple(range(8)),
    block_size=4,
    medium=MEDIUM_HOST,
)
REMOVED = BlockRemoved(block_hashes=(7,), medium=MEDIUM_DISK)
BATCH = EventBatch(
    ts=1700000000.25, events=(STORED, REMOVED, AllBlocksCleared()), data_parallel_rank=3
)


def test_payload_is_byte_identical_to_vllm_encoding() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    msgspec = pytest.importorskip("msgspec")
    theirs = kv_events.KVEventBatch(
        ts=1700000000.25,
        events=[
            kv_events.BlockStored(
                block_hashes=[2**64 - 1, 7],
                parent_block_hash=12345,
                token_ids=list(range(8)),
                block_size=4,
                lora_id=None,
                medium="CPU",
                lora_name=None,
            ),
            kv_events.BlockRemoved(block_hashes=[7], medium="DISK"),
            kv_events.AllBlocksCleared(),
        ],
        data_parallel_rank=3,
    )
    ours = encode_batch(BATCH)
    assert ours == msgspec.msgpack.encode(theirs)
    decoded = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch).decode(ours)
    assert decoded == theirs
    assert decode_batch(ours) == BATCH


def test_decode_rejects_malformed_payloads() -> None:
    with pytest.raises(ValueError, match="not valid msgpack"):
        decode_batch(b"\xc1")
    with pytest.raises(ValueError, match=r"not \[ts, events, dp_rank\]"):
        decode_batch(msgpack.packb({"ts": 1}))
    with pytest.raises(ValueError, match="unknown KV event type 'Nope'"):
        decode_batch(msgpack.packb([1.0, [{"type": "Nope"}], 0]))


def test_events_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        BlockRemoved(block_hashes=(), medium=MEDIUM_HOST)
    with pytest.raises(ValueError, match="not an unsigned 64-bit integer"):
        BlockRemoved(block_hashes=(2**64,), medium=MEDIUM_HOST)
    with pytest.raises(ValueError, match="3 token ids for 1 blocks of 4 tokens"):
        BlockStored((1,), None, (1, 2, 3), 4, MEDIUM_HOST)
    with pytest.raises(ValueError, match="not a tcp://"):
        EventsConfig(endpoint="localhost:5557")
    with pytest.raises(ValueError, match="hwm must be positive"):
        EventsConfig(hwm=0)


def _collect(sub: KvEventSubscriber, n: int) -> list[int]:
    seqs: list[int] = []
    deadline = time.monotonic() + 10
    while len(seqs) < n and time.monotonic() < deadline:
        got = sub.receive(0.5)
        if got is not None:
            seqs.append(got.seq)
            assert got.batch.events == (STORED,)
            assert got.batch.data_parallel_rank == 2
    return seqs


def test_publisher_and_subscriber_over_tcp_with_consecutive_sequence_numbers() -> None:
    cfg = EventsConfig(endpoint="tcp://127.0.0.1:0", data_parallel_rank=2)
    pub = KvEventPublisher(cfg)
    with pytest.raises(RuntimeError, match="not started"):
        pub.publish([STORED])
    with pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        with KvEventSubscriber(pub.endpoint) as sub:
            # PUB/SUB drops messages until the subscription has propagated: probe until one lands.
            first = None
            for _ in range(100):
                pub.publish([STORED])
                first = sub.receive(0.05)
                if first is not None:
                    break
            assert first is not None
            while sub.receive(0.2) is not None:
                pass
            base = pub.published
            pub.publish([])  # empty: not sent, no sequence number used
            for _ in range(5):
                pub.publish([STORED])
            assert _collect(sub, 5) == [base, base + 1, base + 2, base + 3, base + 4]
            assert sub.gaps == []
    pub.close()  # second close is harmless


def test_subscriber_reports_gaps() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    payload = encode_batch(EventBatch(1.0, (STORED,), 2))
    try:
        with KvEventSubscriber(f"tcp://127.0.0.1:{port}") as sub:
            probe = 0
            for probe in range(200):  # until the subscription has propagated
                pub.send_multipart((b"", probe.to_bytes(8, "big"), payload))
                if sub.receive(0.02) is not None:
                    break
            for seq in (300, 301, 305):
                pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))
            got = [sub.receive(2.0) for _ in range(3)]
            assert [g.seq for g in got if g is not None] == [300, 301, 305]
            assert sub.gaps == [(probe + 1, 300), (302, 305)]
    finally:
        pub.close(linger=0)
        ctx.term()


def test_replay_returns_buffered_batches_then_end_marker() -> None:
    cfg = EventsConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
    with KvEventPublisher(cfg) as pub:
        for _ in range(4):
            pub.publish([STORED])
        deadline = time.monotonic() + 5
        while pub.published < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.replay_endpoint is not None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(pub.replay_endpoint)
        try:
            dealer.send_multipart((b"", (2).to_bytes(8, "big")))
            seqs = []
            while True:
                assert dealer.poll(5000)
                empty, topic, seq, payload = dealer.recv_multipart()
                assert (empty, topic) == (b"", b"")
                if int.from_bytes(seq, "big", signed=True) == -1:
                    assert payload == b""
                    break
                seqs.append(int.from_bytes(seq, "big"))
                assert decode_batch(payload).events == (STORED,)
            assert seqs == [2, 3]
        finally:
            dealer.close(linger=0)
            ctx.term()
        with KvEventSubscriber(pub.endpoint) as sub:
            assert [b.seq for b in sub.replay(pub.replay_endpoint, 1)] == [1, 2, 3]
            with pytest.raises(TimeoutError, match="no replay answer"):
                sub.replay("tcp://127.0.0.1:1", 0, timeout_s=0.2)


def test_bind_failure_is_a_clear_error() -> None:
    with KvEventPublisher(EventsConfig(endpoint="tcp://127.0.0.1:0")) as first:
        taken = first.endpoint
        with pytest.raises(OSError, match="cannot bind KV event sockets"):
            KvEventPublisher(EventsConfig(endpoint=taken)).start()


def test_registry_events_map_to_wire_events_in_order() -> None:
    from kvtier.core.registry import TierRegistry
    from kvtier.ops.events import events_from_tier_events

    reg = TierRegistry()
    reg.record_store("G1", 10, None)  # G1: vLLM publishes its own, left out
    reg.record_store("G2", 10, None)
    reg.record_store("G2", 11, 10)
    reg.record_store("G2", 12, 11)
    reg.record_store("G2", 20, None)  # a new chain: a new batch
    reg.record_store("G3", 10, None)
    reg.record_remove("G2", 12)
    reg.record_remove("G2", 20)
    reg.record_remove("G3", 10)
    tokens = {10: [1, 2], 11: [3, 4], 12: [5, 6]}
    got = events_from_tier_events(reg.drain_events(), block_size=2, tokens_of=tokens.get)
    assert got == [
        BlockStored((10, 11, 12), None, (1, 2, 3, 4, 5, 6), 2, MEDIUM_HOST),
        BlockStored((20,), None, (), 2, MEDIUM_HOST),  # tokens unknown: none sent
        BlockStored((10,), None, (1, 2), 2, MEDIUM_DISK),
        BlockRemoved((12, 20), MEDIUM_HOST),
        BlockRemoved((10,), MEDIUM_DISK),
    ]


def test_events_of_a_real_registry_reach_a_subscriber() -> None:
    from kvtier.core.pool import BlockPool
    from kvtier.core.registry import TierRegistry
    from kvtier.ops.events import events_from_tier_events

    reg = TierRegistry()
    pool = BlockPool(2, block_size=4, tier="G2", registry=reg)
    (blk,) = pool.allocate(1) or []
    blk.append_tokens([1, 2, 3, 4])
    cfg = EventsConfig(endpoint="tcp://127.0.0.1:0")
    with KvEventPublisher(cfg) as pub, KvEventSubscriber(pub.endpoint) as sub:
        for _ in range(100):  # until the subscription has propagated
            pub.publish([AllBlocksCleared()])
            if sub.receive(0.05) is not None:
                break
        while sub.receive(0.2) is not None:
            pass
        imm = pool.register(blk, 0xABC)
        pool.release(imm)
        assert pool.remove(0xABC)
        for ev in events_from_tier_events(reg.drain_events(), block_size=4):
            pub.publish([ev])
        first, second = sub.receive(5.0), sub.receive(5.0)
        assert first is not None and second is not None
        assert first.batch.events == (BlockStored((0xABC,), None, (), 4, MEDIUM_HOST),)
        assert second.batch.events == (BlockRemoved((0xABC,), MEDIUM_HOST),)
        assert second.seq == first.seq + 1 and sub.gaps == []


@pytest.mark.parametrize(
    "obj",
    [
        [],
        [1.0],
        ["now", [], 0],
        [None, [], 0],
        [1.0, None, 0],
        [1.0, 7, 0],
        [1.0, [], "rank"],
        [1.0, [], -1],
        [1.0, [7], 0],
        [1.0, [{"block_hashes": [1]}], 0],
        [1.0, [{"type": "BlockStored"}], 0],
        [1.0, [{"type": "BlockStored", "block_hashes": [1], "medium": "CPU"}], 0],
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": None,
                    "parent_block_hash": None,
                    "token_ids": [],
                    "block_size": 16,
                    "medium": "CPU",
                }
            ],
            0,
        ],
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": "p",
                    "token_ids": [],
                    "block_size": 16,
                    "medium": "CPU",
                }
            ],
            0,
        ],
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "token_ids": ["a"] * 16,
                    "block_size": 16,
                    "medium": "CPU",
                }
            ],
            0,
        ],
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "token_ids": [],
                    "block_size": "16",
                    "medium": "CPU",
                }
            ],
            0,
        ],
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "token_ids": [],
                    "block_size": 16,
                    "medium": 5,
                }
            ],
            0,
        ],
        [1.0, [{"type": "BlockRemoved", "block_hashes": [-1], "medium": "CPU"}], 0],
        [1.0, [{"type": "BlockRemoved", "block_hashes": {"a": 1}, "medium": "CPU"}], 0],
        [1.0, [{"type": ["BlockRemoved"]}], 0],
    ],
)
def test_decode_batch_raises_value_error_on_junk(obj: object) -> None:
    """The docstring's promise: ValueError (never KeyError/TypeError) on any malformed batch."""
    with pytest.raises(ValueError):
        decode_batch(msgpack.packb(obj))


def test_decode_batch_raises_value_error_on_random_bytes() -> None:
    import contextlib
    import random

    rng = random.Random(14)
    for _ in range(2000):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        with contextlib.suppress(ValueError):
            decode_batch(payload)
