"""``RemoteStore`` and the G4 value format against real redis-server processes: round trips on
one node and a 3-node cluster (keys of one batch over several shards), MOVED and ASK during a slot
migration, the circuit breaker around a killed server, a sleeping server, password, TTL,
eviction under maxmemory, corrupt values, and the bounded write-behind queue."""

from __future__ import annotations

import os
import time

import pytest

from kvtier.ops.redislocal import LocalRedis, LocalRedisCluster, redis_available
from kvtier.storage.block_file import BlockFileError
from kvtier.storage.breaker import BreakerState, CircuitBreaker
from kvtier.storage.remote import (
    RemoteConfig,
    RemoteError,
    RemoteStore,
    RemoteUnavailable,
    parse_remote_url,
)
from kvtier.storage.remote_block import decode_block, encode_block, remote_key, remote_namespace
from kvtier.storage.write_behind import WriteBehindQueue

MB2 = 2 << 20
FP = 0x1234_5678_9ABC_DEF0
NS = remote_namespace(0xABCD, FP, 0, 1)


def _blocks(n: int, size: int = MB2) -> list[tuple[int, bytes]]:
    return [(1000 + i, os.urandom(size)) for i in range(n)]


def _put(store: RemoteStore, blocks: list[tuple[int, bytes]]) -> None:
    store.put([(remote_key(NS, h), encode_block(FP, h, None, v)) for h, v in blocks])


def _check(store: RemoteStore, blocks: list[tuple[int, bytes]]) -> None:
    values = store.get([remote_key(NS, h) for h, _ in blocks])
    for (h, want), value in zip(blocks, values, strict=True):
        assert value is not None, f"block {h} missing"
        _, payload = decode_block(value, FP, h, len(want))
        assert bytes(payload) == want


def _slot(node: LocalRedis, key: bytes) -> int:
    return int(node.cli("CLUSTER", "KEYSLOT", key.decode()))


def test_url_parsing_and_bad_urls() -> None:
    u = parse_remote_url("rediss://:pw@example.org:6390/3")
    assert (u.host, u.port, u.db, u.tls, u.cluster, u.password) == (
        "example.org", 6390, 3, True, False, "pw",
    )  # fmt: skip
    assert parse_remote_url("redis+cluster://10.0.0.1:7000").cluster
    for bad in (
        "http://h:1",
        "redis://",
        "redis+cluster://h:1/2",
        "redis://h:1/x",
        "redis://h:99999",
    ):
        with pytest.raises(ValueError, match="remote_url"):
            parse_remote_url(bad)


def test_single_node_round_trip(redis_node: LocalRedis) -> None:
    blocks = _blocks(6)
    with RemoteStore(RemoteConfig(redis_node.url, timeout_ms=2000)) as store:
        _put(store, blocks)
        _check(store, blocks)
        keys = [remote_key(NS, h) for h, _ in blocks]
        assert store.exists([*keys, b"kvtier:none"]) == [True] * 6 + [False]
        assert store.get([b"kvtier:none"]) == [None]
        assert store.delete(keys) == 6


def test_cluster_batch_spreads_over_shards_and_round_trips(
    redis_cluster: LocalRedisCluster,
) -> None:
    blocks = _blocks(12, 256 << 10)
    with RemoteStore(RemoteConfig(redis_cluster.url, timeout_ms=2000)) as store:
        _put(store, blocks)
        _check(store, blocks)
        assert all(store.exists([remote_key(NS, h) for h, _ in blocks]))
    owners = [int(n.cli("DBSIZE")) for n in redis_cluster.nodes]
    assert sum(1 for c in owners if c) >= 2, f"one request's keys all on one shard: {owners}"


def _owns(node: LocalRedis, slot: int) -> bool:
    for line in node.cli("CLUSTER", "NODES").splitlines():
        if "myself" not in line:
            continue
        for rng in line.split()[8:]:
            lo, _, hi = rng.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return True
    return False


def test_moved_and_ask_during_slot_migration(redis_cluster: LocalRedisCluster) -> None:
    moved, asked = _blocks(2, 64 << 10)
    with RemoteStore(RemoteConfig(redis_cluster.url, timeout_ms=2000)) as store:
        _put(store, [moved, asked])
        _check(store, [moved, asked])  # the client has the slot map now
        for (h, _), finish in ((moved, True), (asked, False)):
            key = remote_key(NS, h)
            slot = _slot(redis_cluster.nodes[0], key)
            src = next(n for n in redis_cluster.nodes if _owns(n, slot))
            dst = next(n for n in redis_cluster.nodes if n is not src)
            src_id, dst_id = src.cli("CLUSTER", "MYID"), dst.cli("CLUSTER", "MYID")
            dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
            src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
            out = src.cli(
                "MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", key.decode()
            )
            assert out == "OK", out
            if finish:  # the slot now belongs to dst: src answers MOVED
                for n in redis_cluster.nodes:
                    n.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
                assert src.cli("GET", key.decode()).startswith("MOVED")
            else:  # mid-migration: src answers ASK for the moved key
                assert src.cli("GET", key.decode()).startswith("ASK"), src.cli("GET", key.decode())
            _check(store, [(h, v) for hh, v in (moved, asked) if hh == h])
            assert store.exists([key]) == [True]
            if not finish:
                for n in redis_cluster.nodes:
                    n.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)


def test_breaker_opens_on_a_dead_server_and_closes_after_restart() -> None:
    if redis_available() is not None:
        pytest.skip(str(redis_available()))
    with LocalRedis() as node:
        cfg = RemoteConfig(node.url, timeout_ms=200, breaker_failures=2, breaker_cooldown_s=0.3)
        with RemoteStore(cfg) as store:
            blocks = _blocks(1, 1024)
            _put(store, blocks)
            node.kill()
            for _ in range(2):
                with pytest.raises(RemoteError):
                    store.get([remote_key(NS, blocks[0][0])])
            assert store.breaker.state == BreakerState.OPEN
            t0 = time.perf_counter()
            with pytest.raises(RemoteUnavailable):
                store.get([remote_key(NS, blocks[0][0])])
            assert time.perf_counter() - t0 < 0.01, "an open breaker must not do I/O"
            node.start()  # same port, empty
            time.sleep(0.35)
            assert store.get([remote_key(NS, blocks[0][0])]) == [None]  # the probe reconnects
            assert store.breaker.state == BreakerState.CLOSED
            _put(store, blocks)
            _check(store, blocks)


def test_a_sleeping_server_costs_one_timeout(redis_node: LocalRedis) -> None:
    with RemoteStore(RemoteConfig(redis_node.url, timeout_ms=100)) as store:
        store.ping()
        sleeper = redis_node.sleep(1.5)
        t0 = time.perf_counter()
        with pytest.raises(RemoteError):
            store.exists([b"kvtier:x"])
        assert time.perf_counter() - t0 < 0.5
        sleeper.join()
        time.sleep(0.1)
        assert store.exists([b"kvtier:x"]) == [False]  # recovered (one failure < 3: still closed)


def test_password_and_ttl() -> None:
    if redis_available() is not None:
        pytest.skip(str(redis_available()))
    with LocalRedis(password="s3cret") as node:
        with RemoteStore(RemoteConfig(node.url)) as store, pytest.raises(RemoteError):
            store.exists([b"k"])
        cfg = RemoteConfig(node.url, password="s3cret", ttl_s=1)
        with RemoteStore(cfg) as store:
            blocks = _blocks(1, 4096)
            _put(store, blocks)
            key = remote_key(NS, blocks[0][0]).decode()
            assert 0 < int(node.cli("TTL", key)) <= 1
            time.sleep(1.3)
            assert store.get([key.encode()]) == [None]


def test_eviction_under_maxmemory_is_a_miss() -> None:
    if redis_available() is not None:
        pytest.skip(str(redis_available()))
    with (
        LocalRedis(maxmemory_mb=16, policy="allkeys-lru") as node,
        RemoteStore(RemoteConfig(node.url, timeout_ms=2000)) as store,
    ):
        blocks = _blocks(16)  # 32 MiB into 16 MiB
        for b in blocks:
            _put(store, [b])
        values = store.get([remote_key(NS, h) for h, _ in blocks])
        assert values[0] is None and values[-1] is not None
        assert int(node.cli("INFO", "stats").split("evicted_keys:")[1].split()[0]) > 0


def test_corrupt_or_foreign_values_are_rejected(redis_node: LocalRedis) -> None:
    ((h, payload),) = _blocks(1, 8192)
    good = encode_block(FP, h, 7, payload)
    bad_payload = bytearray(good)
    bad_payload[-1] ^= 0xFF
    bad_header = bytearray(good)
    bad_header[20] ^= 0xFF
    with RemoteStore(RemoteConfig(redis_node.url)) as store:
        store.put([(b"kvtier:t:good", good), (b"kvtier:t:p", bytes(bad_payload)),
                   (b"kvtier:t:h", bytes(bad_header)), (b"kvtier:t:short", good[:-1])])  # fmt: skip
        got = store.get([b"kvtier:t:good", b"kvtier:t:p", b"kvtier:t:h", b"kvtier:t:short"])
    assert got[0] is not None and got[1] is not None and got[2] is not None
    assert got[3] is not None
    header, view = decode_block(got[0], FP, h, len(payload))
    assert bytes(view) == payload and header.parent_hash == 7
    with pytest.raises(BlockFileError, match="checksum"):
        decode_block(got[1], FP, h, len(payload))
    with pytest.raises(BlockFileError):
        decode_block(got[2], FP, h, len(payload))
    with pytest.raises(BlockFileError, match="bytes"):
        decode_block(got[3], FP, h, len(payload))
    with pytest.raises(BlockFileError, match="fingerprint"):
        decode_block(got[0], FP + 1, h, len(payload))  # another layout / model
    with pytest.raises(BlockFileError, match="holds block"):
        decode_block(got[0], FP, h + 1, len(payload))  # another block (or salt)


def test_write_behind_bounds_drop_and_count(redis_node: LocalRedis) -> None:
    with RemoteStore(RemoteConfig(redis_node.url, timeout_ms=3000)) as store:
        room = 2 * (MB2 + 4096)  # two values (header + payload)
        with WriteBehindQueue(store, NS, FP, max_bytes=room, max_age_s=0.5) as q:
            blocks = _blocks(4)
            sleeper = redis_node.sleep(1.5)
            t0 = time.perf_counter()
            offered = [q.offer(blocks[0][0], None, blocks[0][1])]
            deadline = time.monotonic() + 5
            while q.queued_bytes and time.monotonic() < deadline:
                time.sleep(0.005)  # until the writer took it (it now waits for the server)
            offered += [q.offer(h, None, v) for h, v in blocks[1:]]
            assert time.perf_counter() - t0 < 0.2, "offer must never wait for the server"
            sleeper.join()
            assert q.flush(10)
            stats = q.take_stats()
        # Blocks 2 and 3 waited past their age budget behind the first; the fourth did not fit.
        assert offered == [True, True, True, False]
        assert stats.dropped_full == 1
        assert stats.dropped_old == 2
        assert stats.written == [blocks[0][0]]
        _check(store, blocks[:1])


def test_breaker_half_open_lets_one_probe_through() -> None:
    now = [0.0]
    b = CircuitBreaker(2, 1.0, clock=lambda: now[0])
    assert b.allow() and not b.failure() and b.failure()
    assert b.state == BreakerState.OPEN and not b.allow()
    now[0] = 1.5
    assert b.state == BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    assert b.failure()  # the probe failed: open again
    now[0] = 3.0
    assert b.allow()
    b.success()
    assert b.state == BreakerState.CLOSED and b.allow() and b.trips == 2
