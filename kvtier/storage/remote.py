"""G4: a Redis / Valkey server or cluster shared by a fleet of engines (``RemoteStore``).

Why this exists: engines on many hosts recompute prefixes another host already computed. G4 keeps
blocks in an existing distributed store spoken to in the Redis protocol, one key per block (see
``kvtier.storage.remote_block`` for keys and values). This module is the client: batched
gets/sets/exists per shard (a batch's keys grouped by node, one stream per node and connection;
gets hand each value on as it is read and keep none, see ``get_each``; puts build each value on
the connection that sends it, see ``put_each``; MOVED/ASK redirections followed), a connection
pool per node, optional password and TLS, optional TTL, and a ``CircuitBreaker`` so a sick
server costs one timeout, then nothing, until a
probe finds it healthy again. It never retries for long: a failed or refused call raises
``RemoteError`` and the caller counts a G4 miss.

Client: redis-py with the hiredis parser (``kvtier.storage.remote_redis``, imported by ``start()``
only, so kvtier imports without redis-py where no G4 is configured); measured faster than
valkey-glide for 2 MiB values (benchmarks/RESULTS.md). No protocol code of our own. No torch.

URLs: ``redis://[:password@]host:port[/db]``, ``rediss://`` (TLS), ``redis+cluster://host:port``
(any node of a cluster; ``rediss+cluster://`` with TLS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kvtier.lifecycle import Lifecycle
from kvtier.storage.breaker import CircuitBreaker

__all__ = [
    "RemoteConfig",
    "RemoteError",
    "RemoteStore",
    "RemoteUnavailable",
    "default_parallel",
    "parse_remote_url",
    "split_parts",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
MIN_PART = 4
"""Fewest blocks a parallel part of one get/put carries."""
PER_NODE = 2
"""Most connections one get/put uses per node: more threads only queue for the GIL (redis-py's
command handling, hiredis building each reply) and one redis-server is no faster with more
clients. One node, 16 cores, 64 x 2 MiB (measured 2026-12-04): put 4.2 GB/s with 2
connections, 3.7 with 4, 3.2 with 8; get 3.1, 2.8, 2.1. A cluster's parallelism is its nodes."""
GET_PARALLEL = 4
"""Most connections one get uses in all, whatever ``parallel`` says: every reply is parsed under
the GIL, so more reading threads only queue for it (3-node cluster: 3 connections 2.9 GB/s, 6
connections 2.3-2.4)."""
_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}


class RemoteError(Exception):
    """A G4 call failed (connection, timeout, server error); the caller treats it as a miss."""


class RemoteUnavailable(RemoteError):
    """The circuit breaker is open: G4 was not asked."""


@dataclass(frozen=True)
class RemoteUrl:
    """A parsed ``remote_url``."""

    host: str
    port: int
    db: int
    tls: bool
    cluster: bool
    password: str | None


def parse_remote_url(url: str) -> RemoteUrl:
    """Parse and check a ``remote_url``; raise ``ValueError`` naming what is wrong (with any
    password in the URL masked)."""
    parts = urlsplit(url.strip())
    shown = _redact(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"remote_url {shown!r}: scheme must be redis://, rediss://, redis+cluster:// or "
            f"rediss+cluster://"
        )
    tls, cluster = _SCHEMES[parts.scheme]
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"remote_url {shown!r}: bad port ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"remote_url {shown!r}: no host")
    path = parts.path.strip("/")
    if path and (cluster or not path.isdigit()):
        raise ValueError(
            f"remote_url {shown!r}: the path must be a database number (single node only), "
            f"got {path!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"remote_url {shown!r}: query strings and fragments are not supported")
    return RemoteUrl(parts.hostname, port, int(path or 0), tls, cluster, parts.password)


def _redact(url: str) -> str:
    """``url`` with the user/password part masked, for messages and logs."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    return f"{head}://***@{rest.split('@', 1)[1]}"


def default_parallel() -> int:
    """``RemoteConfig.parallel``'s default: the CPUs this process may run on, 1 to 8 (each
    connection's thread needs a core for its share of the work that runs off the GIL)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


@dataclass(frozen=True)
class RemoteConfig:
    """How to reach G4 and how long to wait for it.

    ``timeout_ms``: socket connect/read timeout of every call (and, in the connector, the most a
    step waits for G4). ``ttl_s``: expiry of every stored block (0: none, the server's eviction
    policy decides).
    """

    url: str
    password: str | None = None
    ttl_s: int = 0
    timeout_ms: int = 100
    breaker_failures: int = 3
    breaker_cooldown_s: float = 2.0
    parallel: int = field(default_factory=default_parallel)
    """Most connections one large get/put uses at once (a batch's keys grouped by node, then
    split in contiguous parts, at most ``PER_NODE`` a node; a get at most ``GET_PARALLEL``),
    each on its own thread: socket reads and writes, the checksum and the copies release the
    GIL, hiredis' reply parsing does not. Default ``default_parallel()``."""

    def __post_init__(self) -> None:
        parse_remote_url(self.url)
        for name in ("ttl_s", "timeout_ms", "breaker_failures", "parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RemoteConfig.{name} must be an int >= 0, got {value!r}")
        if 0 in (self.timeout_ms, self.breaker_failures, self.parallel):
            raise ValueError("RemoteConfig: timeout_ms, breaker_failures, parallel >= 1")

    @property
    def endpoint(self) -> RemoteUrl:
        return parse_remote_url(self.url)


def split_parts(groups: list[list[int]], most: int) -> list[list[int]]:
    """Node groups of indices in at most ``most`` parts, one connection each: a part then needs
    one connection, not one per node, and every node streams at once; a node's indices split in
    up to ``PER_NODE`` contiguous parts of at least ``MIN_PART``; with fewer connections than
    nodes, a part holds several nodes' indices."""
    if len(groups) >= most:
        merged: list[list[int]] = [[] for _ in range(most)]
        for j, ids in enumerate(groups):
            merged[j % most].extend(ids)
        return [ids for ids in merged if ids]
    share = min(PER_NODE, most // len(groups))
    out: list[list[int]] = []
    for ids in groups:
        n = max(1, min(share, len(ids) // MIN_PART))
        step = -(-len(ids) // n)
        out.extend(ids[i : i + step] for i in range(0, len(ids), step))
    return out


class RemoteStore(Lifecycle):
    """A pooled, breaker-guarded client of one G4 server or cluster (see the module docstring).

    Thread-safe: redis-py's pools hand each thread its own connection."""

    def __init__(self, config: RemoteConfig, *, breaker: CircuitBreaker | None = None) -> None:
        self.config = config
        self.breaker = breaker or CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._client: Any = None
        self._lock = threading.Lock()
        self._started = False
        self._down = False
        self._workers: ThreadPoolExecutor | None = None
        self._errors: tuple[type[BaseException], ...] = (OSError,)
        self._binding: Any = None

    def start(self) -> RemoteStore:
        """Ready to serve; connects lazily (a server that is down at start is not an error).
        Imports redis-py here, not at module import (see the module docstring)."""
        from kvtier.storage import remote_redis

        self._binding = remote_redis
        self._errors = remote_redis.ERRORS
        if self.config.parallel > 1 and self._workers is None:
            self._workers = ThreadPoolExecutor(
                self.config.parallel - 1, thread_name_prefix="kvtier-g4-io"
            )
        self._started = True
        return self

    def close(self) -> None:
        self._started = False
        if self._workers is not None:
            self._workers.shutdown(wait=True)
            self._workers = None
        self._drop_client()

    # -- calls ----------------------------------------------------------------------------------

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys the store holds (one pipeline of EXISTS, grouped by shard)."""
        return [bool(n) for n in self._each_key("exists", keys)]

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (None where missing). Keeps every value until the last one
        arrived: a data path that verifies and copies values should use ``get_each``."""
        out: list[bytes | None] = [None] * len(keys)

        def keep(i: int, value: bytes | None) -> None:
            out[i] = value

        self.get_each(keys, keep)
        return out

    def get_each(self, keys: Sequence[bytes], sink: Callable[[int, bytes | None], None]) -> None:
        """Fetch ``keys`` (pipelined per shard, split over ``parallel`` connections), calling
        ``sink(index, value)`` (None where missing) for each value as it is read, on the
        connection's thread (several at once: ``sink`` must only touch what ``index`` owns).
        The store keeps no value after its ``sink`` call, so memory stays warm (see
        ``remote_redis.stream_gets``). An error raised by ``sink`` ends the call."""
        if not keys:
            return

        def run(client: Any) -> None:
            self._parallel(
                lambda ids: self._binding.stream_gets(client, keys, ids, sink),
                self._parts(client, keys, min(self.config.parallel, GET_PARALLEL)),
            )

        self._call(run)

    def put(self, items: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> None:
        """Store ``(key, value)`` pairs (SET with the configured TTL), streamed per shard."""
        self.put_each([key for key, _ in items], lambda i: items[i][1])

    def put_each(
        self,
        keys: Sequence[bytes],
        value_of: Callable[[int], bytes | bytearray | memoryview],
    ) -> None:
        """Store ``value_of(i)`` under ``keys[i]`` (SET with the configured TTL; streamed per
        shard, split over ``parallel`` connections). ``value_of`` runs on the connection's
        thread just before its value is sent (several at once: it must only touch what ``i``
        owns, and may be called again for a resent ``i``), so building values (a header's
        checksum) overlaps the sends (see ``remote_redis.stream_sets``)."""
        if not keys:
            return
        ttl = self.config.ttl_s or None

        def run(client: Any) -> None:
            self._parallel(
                lambda ids: self._binding.stream_sets(client, keys, ids, value_of, ttl_s=ttl),
                self._parts(client, keys, self.config.parallel),
            )

        self._call(run)

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys; returns how many existed."""
        return sum(int(n) for n in self._each_key("delete", keys))

    def ping(self) -> bool:
        """True if every node answers (a health probe that goes through the breaker)."""
        try:
            return bool(self._call(lambda client: client.ping()))
        except RemoteError:
            return False

    # -- internals ------------------------------------------------------------------------------

    def _each_key(self, command: str, keys: Sequence[bytes]) -> list[Any]:
        """One pipeline (grouped by shard) of ``command`` on every key: its replies in order."""
        if not keys:
            return []

        def run(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                getattr(pipe, command)(key)
            return list(pipe.execute())

        return self._call(run)

    def _parts(self, client: Any, keys: Sequence[bytes], most: int) -> list[list[int]]:
        """The indices of ``keys`` in parts of one connection each (``split_parts``)."""
        return split_parts(self._binding.node_groups(client, keys, range(len(keys))), most)

    def _parallel(self, fn: Callable[[list[int]], _T], parts: list[list[int]]) -> list[_T]:
        """``fn`` over the parts, the first on this thread, the others on the I/O threads (each
        takes its own pooled connection); the first error is raised after all finished."""
        if len(parts) == 1 or self._workers is None:
            return [fn(p) for p in parts]
        futures = [self._workers.submit(fn, p) for p in parts[1:]]
        first: list[_T] = []
        error: BaseException | None = None
        try:
            first = [fn(parts[0])]
        except BaseException as exc:
            error = exc
        rest: list[_T] = []
        for f in futures:
            try:
                rest.append(f.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return first + rest

    def _call(self, fn: Callable[[Any], _T]) -> _T:
        if not self._started:
            raise RemoteError("RemoteStore is not started")
        if not self.breaker.allow():
            raise RemoteUnavailable("G4 circuit breaker is open")
        try:
            result = fn(self._connect())
        except self._errors as exc:
            if self.breaker.failure() and not self._down:
                self._down = True  # logged once per episode, until a call succeeds again
                logger.warning("kvtier: G4 (%s) unavailable, breaker open: %s", self._where(), exc)
            if self.config.endpoint.cluster:
                self._drop_client()  # rediscover the topology on the next call
            raise RemoteError(f"G4 call failed: {type(exc).__name__}: {exc}") from exc
        self.breaker.success()
        if self._down:
            self._down = False
            logger.warning("kvtier: G4 (%s) reachable again", self._where())
        return result

    def _where(self) -> str:
        ep = self.config.endpoint
        return f"{ep.host}:{ep.port}"

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*self._errors):
                client.close()

    def _connect(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    def _build(self) -> Any:
        ep = self.config.endpoint
        return self._binding.build_client(
            host=ep.host,
            port=ep.port,
            db=ep.db,
            tls=ep.tls,
            cluster=ep.cluster,
            password=self.config.password if self.config.password is not None else ep.password,
            timeout_s=self.config.timeout_ms / 1000.0,
        )
