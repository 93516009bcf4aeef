"""The redis-py side of G4: connection classes and client construction (``build_client``).

Why this is its own module: ``redis`` is imported only here, and this module is imported only when
a ``RemoteStore`` starts, so the vLLM connector and the rest of kvtier import on a machine without
redis-py (a GPU host that never configures G4). No protocol code of our own: redis-py with the
hiredis reply parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis._parsers import _HiredisParser
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

__all__ = [
    "ERRORS",
    "GET_WINDOW",
    "READ_SIZE",
    "build_client",
    "node_groups",
    "stream_gets",
    "stream_sets",
]

READ_SIZE = 1 << 20
"""Socket read size: a 2 MiB value arrives in a few reads, not 32 (redis-py: 64 KiB). Not more:
after each reply hiredis moves the rest of its buffer to the front, so a read much larger than a
value adds most of a copy (get + verify of 2 MiB values streamed: 1 MiB reads 2.0-2.2 GB/s of
CPU, 4 MiB 1.5-1.7, 256 KiB 1.8-2.1, measured)."""

ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)
"""What a failed call raises (connection, timeout, server error, a slot no node serves): the
caller counts a miss."""


class _Parser(_HiredisParser):
    """redis-py's hiredis parser, keeping hiredis' reply buffer between replies: by default the
    reader frees a buffer over 16 KiB whenever it empties, so every 2 MiB value regrows (and
    re-copies) it from nothing (``setmaxbuf(0)``: never free; one buffer per pooled connection,
    as large as the largest reply in flight)."""

    def on_connect(self, connection: Any, **kwargs: Any) -> None:
        super().on_connect(connection, **kwargs)  # type: ignore[no-untyped-call]
        self._reader.setmaxbuf(0)


class _Connection(redis.Connection):
    """redis-py's connection, packing commands in Python: hiredis' packer copies every 2 MiB
    value into a new buffer (a third of a put's time, measured); this one sends large values
    as they are. Replies are still parsed by hiredis."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return packer or PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


class _SSLConnection(redis.SSLConnection):
    """``_Connection`` over TLS."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return packer or PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


def build_client(
    *, host: str, port: int, db: int, tls: bool, cluster: bool, password: str | None,
    timeout_s: float,
) -> Any:  # fmt: skip
    """A ``redis.Redis`` (one node) or ``RedisCluster`` with pooled connections."""
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "password": password,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        # TLS through the connection class (``ssl=True`` would replace it).
        "connection_class": _SSLConnection if tls else _Connection,
        "socket_read_size": READ_SIZE,
        # Without hiredis: redis-py's own (slower) parser; the tier still works.
        "parser_class": _Parser if HIREDIS_AVAILABLE else redis.connection.DefaultParser,
        # One quick retry on a dropped connection (a restarted server), none on timeouts.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    }
    if cluster:
        # from_url: the one way RedisCluster builds its node pools with our connection class.
        seed = f"redis://{host}:{port}"
        return RedisCluster.from_url(seed, require_full_coverage=False, **common)
    pool = redis.ConnectionPool(db=db, **common)
    return redis.Redis(connection_pool=pool, retry=common["retry"])


def _is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def node_groups(client: Any, keys: Sequence[bytes], indices: Iterable[int]) -> list[list[int]]:
    """``indices`` of ``keys`` grouped by the node serving them (a cluster client's slot map;
    one group on a single node), in first-seen order."""
    if not _is_cluster(client):
        return [list(indices)]
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(client.get_node_from_key(keys[i]).name, []).append(i)
    return list(groups.values())


GET_WINDOW = 2
"""GETs in flight on one connection (``stream_gets``): the next is sent as soon as one reply is
read, so the server prepares a value while this side verifies the last. Not a whole pipeline:
redis-server copies every reply of a pipeline into its output buffers before the socket drains
them (tens of MiB a connection at 2 MiB a value), and that made the server, not the client, the
bottleneck of a one-node get (benchmarks/RESULTS.md)."""


def _pool_of(client: Any, key: bytes) -> Any:
    """The connection pool of the node serving ``key``."""
    if _is_cluster(client):
        return client.get_redis_connection(client.get_node_from_key(key)).connection_pool
    return client.connection_pool


class _Stream:
    """One pooled connection of one node and the indices it carries (``sent`` sent so far,
    ``read`` answered so far)."""

    def __init__(self, pool: Any, ids: list[int]) -> None:
        self.pool = pool
        self.ids = ids
        self.conn: Any = pool.get_connection()
        self.sent = 0
        self.read = 0


def _open_streams(client: Any, keys: Sequence[bytes], part: Sequence[int]) -> list[_Stream]:
    streams: list[_Stream] = []
    try:
        for ids in node_groups(client, keys, part):
            streams.append(_Stream(_pool_of(client, keys[ids[0]]), ids))
    except BaseException:
        _close_streams(streams, failed=True)
        raise
    return streams


def _close_streams(streams: list[_Stream], *, failed: bool) -> None:
    """Hand the connections back; after a failure, replies may be left unread: disconnect them
    first, never hand one back dirty."""
    for s in streams:
        if failed:
            s.conn.disconnect()
        s.pool.release(s.conn)


def _twice(attempt: Callable[[list[int]], None], indices: Sequence[int], done: set[int]) -> None:
    """``attempt(indices)``, and once more for the indices not ``done`` when a connection
    dropped (a restarted server: the retry gets new connections)."""
    try:
        attempt(list(indices))
    except redis.ConnectionError:
        attempt([i for i in indices if i not in done])


def stream_gets(
    client: Any,
    keys: Sequence[bytes],
    indices: Sequence[int],
    sink: Callable[[int, bytes | None], None],
    *,
    window: int = GET_WINDOW,
) -> None:
    """GET ``keys[i]`` for every ``i`` in ``indices``, handing each value to ``sink(i, value)``
    as soon as it is read, exactly once.

    Why not a pipeline's ``execute()``: it keeps every reply until the last one arrives, so each
    2 MiB value lands in fresh pages (all are freed together and handed back to the system: 513
    page faults a value, measured) and is cold again when verified; here a value is dropped
    before the next one is read and the allocator hands the same warm memory back (16-56 faults
    a value; a get + verify of 64 x 2 MiB costs 2-2.5x less CPU). One connection per node, each
    with ``window`` GETs in flight (``GET_WINDOW``), the nodes read in turn. redis-py packs the
    commands and hiredis parses every reply: no protocol code here. A key a node answers with an
    error (MOVED or ASK while a slot migrates) is fetched again through a cluster pipeline, which
    follows the redirection and refreshes the slot map. A dropped connection is retried once for
    the keys not yet handed on (a restarted server)."""
    done: set[int] = set()
    redirected: list[int] = []

    def attempt(part: list[int]) -> None:
        if part:
            _get_streams(client, keys, part, sink, window, done, redirected)

    _twice(attempt, indices, done)
    if redirected:
        pipe = client.pipeline(transaction=False)
        for i in redirected:
            pipe.get(keys[i])
        for i, value in zip(redirected, pipe.execute(), strict=True):
            sink(i, value)


def _get_streams(
    client: Any,
    keys: Sequence[bytes],
    part: Sequence[int],
    sink: Callable[[int, bytes | None], None],
    window: int,
    done: set[int],
    redirected: list[int],
) -> None:
    streams = _open_streams(client, keys, part)
    failed = True
    try:
        for s in streams:
            s.sent = min(window, len(s.ids))
            s.conn.send_packed_command(
                s.conn.pack_commands([("GET", keys[i]) for i in s.ids[: s.sent]])
            )
        active = streams
        while active:
            for s in active:
                i = s.ids[s.read]
                try:
                    value = s.conn.read_response()
                except redis.ResponseError:
                    value = _REDIRECTED
                s.read += 1
                if s.sent < len(s.ids):  # keep the window full before this side's work
                    s.conn.send_packed_command(s.conn.pack_command("GET", keys[s.ids[s.sent]]))
                    s.sent += 1
                if value is _REDIRECTED:
                    redirected.append(i)
                else:
                    sink(i, value)
                done.add(i)
            active = [s for s in active if s.read < len(s.ids)]
        failed = False
    finally:
        _close_streams(streams, failed=failed)


def stream_sets(
    client: Any,
    keys: Sequence[bytes],
    indices: Sequence[int],
    value_of: Callable[[int], bytes | bytearray | memoryview],
    *,
    ttl_s: int | None,
    max_inflight: int,
) -> None:
    """SET ``keys[i]`` to ``value_of(i)`` for every ``i`` in ``indices`` (expiring after
    ``ttl_s`` if given), one connection per node.

    Why not a pipeline: ``value_of`` runs here, on the connection's thread, just before its value
    is sent, so building a value (header and checksum) on one connection overlaps the sends of
    the others, and nothing waits for a whole batch to be built first. Values go to the socket as
    they are (redis-py sends a large argument or a memoryview without copying it). At most
    ``max_inflight`` bytes are sent on a connection before its replies are read. A key a node
    answers with an error (MOVED or ASK) is set again through a pipeline, which follows the
    redirection (or raises what a single node answered); a dropped connection is retried once for
    the keys not yet answered. ``value_of`` may be called twice for one index: it must build the
    same value again."""
    done: set[int] = set()
    redirected: list[int] = []
    extra: tuple[Any, ...] = ("EX", ttl_s) if ttl_s else ()

    def attempt(part: list[int]) -> None:
        if part:
            _set_streams(client, keys, part, value_of, extra, max_inflight, done, redirected)

    _twice(attempt, indices, done)
    if redirected:
        pipe = client.pipeline(transaction=False)
        for i in redirected:
            pipe.set(keys[i], value_of(i), ex=ttl_s or None)
        pipe.execute()


def _set_streams(
    client: Any,
    keys: Sequence[bytes],
    part: Sequence[int],
    value_of: Callable[[int], bytes | bytearray | memoryview],
    extra: tuple[Any, ...],
    max_inflight: int,
    done: set[int],
    redirected: list[int],
) -> None:
    streams = _open_streams(client, keys, part)
    failed = True

    def read_one(s: _Stream) -> None:
        i = s.ids[s.read]
        try:
            s.conn.read_response()
        except redis.ResponseError:
            redirected.append(i)
        s.read += 1
        done.add(i)

    try:
        for s in streams:  # every node's values sent before the last node's replies are read
            sizes: list[int] = []
            unanswered = 0
            for i in s.ids:
                value = value_of(i)
                s.conn.send_packed_command(s.conn.pack_command("SET", keys[i], value, *extra))
                s.sent += 1
                sizes.append(len(value))
                unanswered += len(value)
                while unanswered > max_inflight and s.read < s.sent - 1:
                    unanswered -= sizes[s.read]
                    read_one(s)
        for s in streams:
            while s.read < s.sent:
                read_one(s)
        failed = False
    finally:
        _close_streams(streams, failed=failed)


_REDIRECTED = object()
