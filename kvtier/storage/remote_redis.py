"""The redis-py side of G4: connection classes and client construction (``build_client``).

Why this is its own module: ``redis`` is imported only here, and this module is imported only when
a ``RemoteStore`` starts, so the vLLM connector and the rest of kvtier import on a machine without
redis-py (a GPU host that never configures G4). No protocol code of our own: redis-py with the
hiredis reply parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
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


class _PythonPacker:
    """Commands packed in Python: hiredis' packer copies every 2 MiB value into a new buffer (a
    third of a put's time, measured); this one sends large values as they are. Replies are
    still parsed by hiredis."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return packer or PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)  # type: ignore[attr-defined]


class _Connection(_PythonPacker, redis.Connection):
    """redis-py's connection with ``_PythonPacker``."""


class _SSLConnection(_PythonPacker, redis.SSLConnection):
    """``_Connection`` over TLS."""


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
"""GETs in flight on one connection (``stream_gets``): the next is sent as soon as a reply is
read, so the server prepares a value while this side verifies the last. Not a whole pipeline:
redis-server builds every reply of a pipeline in its output buffers before the socket drains
them: a one-node get of 64 x 2 MiB ran at 0.45-0.57x the rate of 2 in flight (measured)."""

_REDIRECTED = object()


def _pool_of(client: Any, key: bytes) -> Any:
    """The connection pool of the node serving ``key``."""
    if _is_cluster(client):
        return client.get_redis_connection(client.get_node_from_key(key)).connection_pool
    return client.connection_pool


@contextmanager
def _connections(
    client: Any, keys: Sequence[bytes], part: Sequence[int]
) -> Iterator[list[tuple[Any, list[int]]]]:
    """One pooled connection per node for the indices of ``part`` it serves. After a failure
    replies may be left unread: the connections are dropped, never handed back dirty."""
    taken: list[tuple[Any, Any, list[int]]] = []
    try:
        for ids in node_groups(client, keys, part):
            pool = _pool_of(client, keys[ids[0]])
            taken.append((pool, pool.get_connection(), ids))
        yield [(conn, ids) for _, conn, ids in taken]
    except BaseException:
        for _, conn, _ in taken:
            conn.disconnect()
        raise
    finally:
        for pool, conn, _ in taken:
            pool.release(conn)


def _retry_once(
    attempt: Callable[[list[int]], None], indices: Sequence[int], done: set[int]
) -> None:
    """``attempt(indices)``, and once more for those not ``done`` if a connection dropped (a
    restarted server; the retry takes new connections). No retry on a timeout."""
    try:
        attempt(list(indices))
    except redis.ConnectionError:
        left = [i for i in indices if i not in done]
        if left:
            attempt(left)


def stream_gets(
    client: Any,
    keys: Sequence[bytes],
    indices: Sequence[int],
    sink: Callable[[int, bytes | None], None],
    *,
    window: int = GET_WINDOW,
) -> None:
    """GET ``keys[i]`` for every ``i`` in ``indices``, handing each value to ``sink(i, value)``
    as soon as it is read, once.

    Why not a pipeline's ``execute()``: it keeps every reply until the last one arrives, so each
    2 MiB value lands in fresh pages (all are freed together and handed back to the system: 513
    page faults a value, measured) and is cold again when verified; here a value is dropped
    before the next one is read and the allocator hands the same warm memory back (16-56 faults
    a value; a get + verify of 64 x 2 MiB costs 2-2.5x less CPU). One connection per node with
    ``window`` GETs in flight, the nodes read in turn; redis-py packs the commands and hiredis
    parses every reply: no protocol code here. A key a node answers with an error (MOVED or ASK
    while a slot migrates) is fetched again through a cluster pipeline, which follows the
    redirection and refreshes the slot map."""
    done: set[int] = set()
    redirected: list[int] = []

    def attempt(part: list[int]) -> None:
        with _connections(client, keys, part) as streams:
            for conn, ids in streams:
                conn.send_packed_command(
                    conn.pack_commands([("GET", keys[i]) for i in ids[:window]])
                )
            for n in range(max(len(ids) for _, ids in streams)):
                for conn, ids in streams:
                    if n >= len(ids):
                        continue
                    try:
                        value = conn.read_response()
                    except redis.ResponseError:
                        value = _REDIRECTED
                    if n + window < len(ids):  # refill the window before this side's work
                        conn.send_packed_command(conn.pack_command("GET", keys[ids[n + window]]))
                    if value is _REDIRECTED:
                        redirected.append(ids[n])
                    else:
                        sink(ids[n], value)
                    done.add(ids[n])

    _retry_once(attempt, indices, done)
    if redirected:
        pipe = client.pipeline(transaction=False)
        for i in redirected:
            pipe.get(keys[i])
        for i, value in zip(redirected, pipe.execute(), strict=True):
            sink(i, value)


def stream_sets(
    client: Any,
    keys: Sequence[bytes],
    indices: Sequence[int],
    value_of: Callable[[int], bytes | bytearray | memoryview],
    *,
    ttl_s: int | None,
) -> None:
    """SET ``keys[i]`` to ``value_of(i)`` for every ``i`` in ``indices`` (expiring after
    ``ttl_s`` if given), one connection per node, every value sent before any reply is read.

    Why not a pipeline: ``value_of`` runs here, on the connection's thread, just before its
    value is sent, so building values (header and checksum) overlaps the other connections'
    sends instead of all being built first. redis-py sends a large value as it is (no copy).
    A key a node answers with an error (MOVED or ASK) is set again through a pipeline, which
    follows the redirection (or raises what the node said). ``value_of`` may be called again
    for an index (a retry): it must build the same value."""
    done: set[int] = set()
    redirected: list[int] = []
    extra: tuple[Any, ...] = ("EX", ttl_s) if ttl_s else ()

    def attempt(part: list[int]) -> None:
        with _connections(client, keys, part) as streams:
            for conn, ids in streams:
                for i in ids:
                    conn.send_packed_command(conn.pack_command("SET", keys[i], value_of(i), *extra))
            for conn, ids in streams:
                for i in ids:
                    try:
                        conn.read_response()
                    except redis.ResponseError:
                        redirected.append(i)
                    done.add(i)

    _retry_once(attempt, indices, done)
    if redirected:
        pipe = client.pipeline(transaction=False)
        for i in redirected:
            pipe.set(keys[i], value_of(i), ex=ttl_s or None)
        pipe.execute()
