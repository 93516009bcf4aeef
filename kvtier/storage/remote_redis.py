"""The redis-py side of G4: connection classes and client construction (``build_client``).

Why this is its own module: ``redis`` is imported only here, and this module is imported only when
a ``RemoteStore`` starts, so the vLLM connector and the rest of kvtier import on a machine without
redis-py (a GPU host that never configures G4). No protocol code of our own: redis-py with the
hiredis reply parser.
"""

from __future__ import annotations

from typing import Any

import redis
from redis._parsers import _HiredisParser
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

__all__ = ["ERRORS", "READ_SIZE", "build_client"]

READ_SIZE = 4 << 20
"""Socket read size: a 2 MiB value arrives in one or two reads, not 32 (redis-py: 64 KiB)."""

ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
"""What a failed call raises (connection, timeout, server error): the caller counts a miss."""


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
