"""Prometheus metrics of G4 (the remote tier), in the registry of one ``KvTierMetrics``.

Why a module of its own: G4's figures are not the other tiers' (lookups are EXISTS batches that
may time out, values can be missing or corrupt, writes go behind through a bounded queue, and a
circuit breaker may switch the tier off), so they get their own families, all ``kvtier_remote_*``:

- ``kvtier_remote_lookup_blocks_total`` / ``kvtier_remote_hit_blocks_total``: blocks asked of G4
  (past the G2/G3 hit) and found there (onboarded); ``kvtier_remote_hit_rate``: their ratio over
  the same sliding window as ``kvtier_hit_rate``;
- ``kvtier_remote_blocks_total`` / ``kvtier_remote_bytes_total`` / ``kvtier_remote_seconds_total``
  [op = get | put | lookup]: blocks, bytes and time of fetches, write-behind and lookups (mean
  latency = rate(seconds) / rate(blocks));
- ``kvtier_remote_misses_total`` [reason = missing | corrupt | failed | lookup_timeout |
  lookup_error]: why G4 did not serve (each a recompute, never wrong KV);
- ``kvtier_remote_write_dropped_total`` / ``kvtier_remote_write_failed_total``: write-behind
  blocks dropped (queue full, too old, breaker open) or refused by the server;
- ``kvtier_remote_breaker_state`` [side = scheduler | worker]: 0 closed, 1 half open, 2 open.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BREAKER_CODES", "MISS_REASONS", "REMOTE_OPS", "RemoteMetrics"]

REMOTE_OPS: tuple[str, ...] = ("get", "put", "lookup")
MISS_REASONS: tuple[str, ...] = ("missing", "corrupt", "failed", "lookup_timeout", "lookup_error")
BREAKER_CODES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}


class RemoteMetrics:
    """G4 families registered in ``registry`` (built by ``KvTierMetrics``)."""

    def __init__(self, registry: CollectorRegistry, hit_rate: Callable[[], float]) -> None:
        reg = registry
        self._looked = Counter(
            "kvtier_remote_lookup_blocks", "Blocks looked up in G4.", registry=reg
        )
        self._hits = Counter("kvtier_remote_hit_blocks", "Blocks found in G4.", registry=reg)
        Gauge(
            "kvtier_remote_hit_rate",
            "G4 hit blocks / looked-up blocks over the sliding window.",
            registry=reg,
        ).set_function(hit_rate)
        self._blocks = Counter("kvtier_remote_blocks", "G4 blocks, per op.", ["op"], registry=reg)
        self._bytes = Counter("kvtier_remote_bytes", "G4 bytes, per op.", ["op"], registry=reg)
        self._seconds = Counter(
            "kvtier_remote_seconds", "Time spent in G4 calls, per op.", ["op"], registry=reg
        )
        self._misses = Counter(
            "kvtier_remote_misses", "G4 misses by reason.", ["reason"], registry=reg
        )
        self._dropped = Counter(
            "kvtier_remote_write_dropped", "Write-behind blocks dropped.", registry=reg
        )
        self._failed = Counter(
            "kvtier_remote_write_failed", "Write-behind blocks the server refused.", registry=reg
        )
        self._breaker = Gauge(
            "kvtier_remote_breaker_state",
            "G4 circuit breaker: 0 closed, 1 half open, 2 open.",
            ["side"],
            registry=reg,
        )
        for op in REMOTE_OPS:
            self._blocks.labels(op)
            self._bytes.labels(op)
            self._seconds.labels(op)
        for reason in MISS_REASONS:
            self._misses.labels(reason)
        for side in ("scheduler", "worker"):
            self._breaker.labels(side).set(0)

    def record_lookup(self, looked_up: int, hits: int) -> None:
        self._looked.inc(looked_up)
        self._hits.inc(hits)

    def record_op(self, op: str, blocks: int, nbytes: int, seconds: float) -> None:
        if op not in REMOTE_OPS:
            raise ValueError(f"unknown G4 op {op!r}; expected one of {REMOTE_OPS}")
        self._blocks.labels(op).inc(blocks)
        self._bytes.labels(op).inc(nbytes)
        self._seconds.labels(op).inc(max(0.0, seconds))

    def record_misses(self, reason: str, blocks: int) -> None:
        if reason not in MISS_REASONS:
            raise ValueError(f"unknown G4 miss reason {reason!r}; expected one of {MISS_REASONS}")
        self._misses.labels(reason).inc(blocks)

    def record_writes(self, dropped: int, failed: int) -> None:
        self._dropped.inc(dropped)
        self._failed.inc(failed)

    def set_breaker(self, side: str, state: str) -> None:
        self._breaker.labels(side).set(BREAKER_CODES.get(state, 2))
