"""The G4 data path's memory reuse against real redis-server processes: ``RemoteStore.get_each``
hands every value on exactly once as it is read (one node and a 3-node cluster, several
connections, and a connection killed mid-stream), a sink that fails leaves no stale replies
behind, reused ``ValueBuffers`` never leak one block's bytes into another's value, and a
batch is split over at most ``PER_NODE`` connections a node."""

from __future__ import annotations

import os
import threading

import pytest

from kvtier.ops.redislocal import LocalRedis, LocalRedisCluster
from kvtier.storage.block_file import HEADER_SIZE
from kvtier.storage.remote import MIN_PART, PER_NODE, RemoteConfig, RemoteStore, split_parts
from kvtier.storage.remote_block import (
    ValueBuffers,
    decode_block,
    encode_block,
    remote_key,
    remote_namespace,
)
from kvtier.storage.write_behind import WriteBehindQueue

FP = 0x0BAD_CAFE_0000_0001
NS = remote_namespace(0x5EED, FP, 0, 1)
SIZE = 256 << 10


def _fill(store: RemoteStore, n: int) -> dict[int, bytes]:
    blocks = {2000 + i: os.urandom(SIZE) for i in range(n)}
    store.put([(remote_key(NS, h), encode_block(FP, h, None, v)) for h, v in blocks.items()])
    return blocks


@pytest.mark.parametrize("where", ["node", "cluster"])
def test_get_each_hands_every_value_on_once(
    where: str, redis_node: LocalRedis, redis_cluster: LocalRedisCluster
) -> None:
    url = redis_node.url if where == "node" else redis_cluster.url
    with RemoteStore(RemoteConfig(url, timeout_ms=5000, parallel=4)) as store:
        blocks = _fill(store, 40)
        hashes = [*blocks, 99]  # the last key is missing
        keys = [remote_key(NS, h) for h in hashes]
        seen: list[int] = []
        threads: set[str] = set()
        lock = threading.Lock()

        def sink(i: int, value: bytes | None) -> None:
            if hashes[i] == 99:
                assert value is None
            else:
                assert value is not None
                _, payload = decode_block(value, FP, hashes[i], SIZE)
                assert bytes(payload) == blocks[hashes[i]]
            with lock:
                seen.append(i)
                threads.add(threading.current_thread().name)

        store.get_each(keys, sink)
        assert sorted(seen) == list(range(len(keys)))
        assert len(threads) > 1, "a large get is spread over several connections"


def test_a_failing_sink_leaves_no_stale_replies(redis_node: LocalRedis) -> None:
    with RemoteStore(RemoteConfig(redis_node.url, timeout_ms=5000, parallel=1)) as store:
        blocks = _fill(store, 8)
        keys = [remote_key(NS, h) for h in blocks]

        def boom(i: int, value: bytes | None) -> None:
            raise RuntimeError("sink failed")

        with pytest.raises(RuntimeError, match="sink failed"):
            store.get_each(keys, boom)
        # The half-read connection was dropped, not pooled: the next call reads its own replies.
        for (h, want), value in zip(blocks.items(), store.get(keys[::-1])[::-1], strict=True):
            assert value is not None
            assert bytes(decode_block(value, FP, h, SIZE)[1]) == want


def test_a_connection_killed_mid_stream_is_resumed_without_repeats(
    redis_node: LocalRedis,
) -> None:
    with RemoteStore(RemoteConfig(redis_node.url, timeout_ms=5000, parallel=1)) as store:
        blocks = _fill(store, 12)
        hashes = list(blocks)
        seen: list[int] = []

        def sink(i: int, value: bytes | None) -> None:
            assert value is not None
            assert bytes(decode_block(value, FP, hashes[i], SIZE)[1]) == blocks[hashes[i]]
            if not seen:  # drop the streaming connection with GETs still in flight
                redis_node.cli("CLIENT", "KILL", "TYPE", "normal")
            seen.append(i)

        store.get_each([remote_key(NS, h) for h in hashes], sink)
        assert sorted(seen) == list(range(len(hashes))), "each value handed on exactly once"


def test_split_parts_bounds_connections_per_node_and_in_all() -> None:
    nodes = [list(range(k, 90, 3)) for k in range(3)]  # 3 nodes, 30 indices each
    for most in (1, 2, 3, 4, 6, 8, 16):
        parts = split_parts(nodes, most)
        assert sorted(i for p in parts for i in p) == list(range(90))
        assert len(parts) <= most
        for ids in nodes:
            assert sum(1 for p in parts if set(p) & set(ids)) <= max(PER_NODE, 1)
    assert len(split_parts(nodes, 8)) == 3 * PER_NODE
    assert len(split_parts([list(range(2 * MIN_PART - 1))], 8)) == 1  # too few for two parts


def test_value_buffers_are_reused_within_their_bound() -> None:
    buffers = ValueBuffers(keep_bytes=2 * (HEADER_SIZE + 8))
    a, b, c = (buffers.fill(bytes([n]) * 8) for n in (1, 2, 3))
    assert bytes(a[HEADER_SIZE:]) == b"\x01" * 8 and len(a) == HEADER_SIZE + 8
    buffers.give_back([a, b, c])  # room for two
    again = [buffers.fill(b"\x04" * 8) for _ in range(3)]
    assert sum(buf is a or buf is b for buf in again) == 2
    assert all(bytes(buf[HEADER_SIZE:]) == b"\x04" * 8 for buf in again)
    buffers.give_back(again[:1])
    other = buffers.fill(b"\x05" * 16)  # another size: a new buffer, the spare let go
    assert len(other) == HEADER_SIZE + 16 and all(other is not buf for buf in again)


def test_write_behind_reusing_buffers_stores_each_block_exactly(redis_node: LocalRedis) -> None:
    with RemoteStore(RemoteConfig(redis_node.url, timeout_ms=5000)) as store:
        blocks = {3000 + i: os.urandom(SIZE) for i in range(12)}
        with WriteBehindQueue(store, NS, FP, max_bytes=64 << 20) as q:
            for h, payload in blocks.items():  # one at a time: each reuses the last's buffer
                assert q.offer(h, h - 1, payload)
                assert q.flush(10)
            assert q.take_stats().written == list(blocks)
        values = store.get([remote_key(NS, h) for h in blocks])
    for (h, want), value in zip(blocks.items(), values, strict=True):
        assert value is not None
        header, got = decode_block(value, FP, h, SIZE)
        assert bytes(got) == want and header.parent_hash == h - 1
