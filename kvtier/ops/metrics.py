"""Prometheus metrics of a kvtier instance (served by ``kvtier.ops.metrics_server``).

Why a class with its own ``CollectorRegistry``: two managers in one process (tests, several
engines) must not share or clash over counters, and nothing is registered at import time.

What is measured: blocks, bytes and latency per transfer path; tokens looked up and matched per
tier and their sliding-window hit rate; pool occupancy; frequency-filter rejections; load errors;
pinned bytes; cost-aware onboarding's decisions, estimates and beliefs. Each metric's name,
labels and meaning are in docs/operations.md (and in its help text below).

The Dynamo KVBM names (``kvbm_offload_blocks_d2h`` ...) are exported beside them, so dashboards
built for Dynamo keep working; docs/operations.md lists the mapping. This module imports no torch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvtier.config import require_count
from kvtier.ops.remote_metrics import RemoteMetrics

PATHS: tuple[str, ...] = (
    "device_to_host",
    "host_to_disk",
    "device_to_disk",
    "host_to_device",
    "disk_to_device",
)
"""Transfer paths, offloads first, then onboards."""
TIERS: tuple[str, ...] = ("device", "host", "disk")
"""Tiers as metric labels: G1, G2, G3."""
MATCH_TIERS: tuple[str, ...] = ("host", "disk")
"""Tiers a lookup can match in (G1 hits are the engine's own prefix cache)."""
ONBOARD_TIERS: tuple[str, ...] = ("host", "disk", "remote")
"""Tiers a load can come from (G2, G3, G4), as cost-aware onboarding labels them."""
ONBOARD_KINDS: tuple[str, ...] = ("load", "ttft")
"""What an onboarding estimate is of: a load job's service time, or a request's TTFT."""
ERROR_TIERS: tuple[str, ...] = ("host", "disk", "unknown")
"""Sources of a failed load as metric labels (``unknown``: the reporter does not say)."""
POOL_STATES: tuple[str, ...] = ("in_use", "inactive", "free")
"""Block states of a pool: referenced, registered but unreferenced (matchable), empty."""

DYNAMO_BLOCK_COUNTERS: dict[str, str] = {
    "device_to_host": "kvbm_offload_blocks_d2h",
    "host_to_disk": "kvbm_offload_blocks_h2d",
    "device_to_disk": "kvbm_offload_blocks_d2d",
    "host_to_device": "kvbm_onboard_blocks_h2d",
    "disk_to_device": "kvbm_onboard_blocks_d2d",
}
"""Dynamo KVBM's block counter for each kvtier path (its h2d offload means host to disk)."""
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Seconds; from one small pinned copy (~100 us) to a slow disk batch (seconds)."""


def _check_label(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


class SlidingHitRate:
    """Hit rate per tier over the lookups of the last ``window_s`` seconds (thread-safe; G2/G3's
    ``kvtier_hit_rate`` and G4's each read one).

    Each lookup adds (time, blocks looked up, blocks matched per tier); old entries fall out when
    the rate is read. With no lookup in the window the rate is 0.0 (nothing was served).
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: deque[tuple[float, int, dict[str, int]]] = deque()

    def add(self, looked_up: int, matched: dict[str, int]) -> None:
        """Record one lookup of ``looked_up`` blocks, of which ``matched[tier]`` came from tier."""
        with self._lock:
            self._entries.append((self._clock(), looked_up, dict(matched)))

    def rate(self, tier: str) -> float:
        """Matched blocks of ``tier`` / looked-up blocks, within the window."""
        with self._lock:
            horizon = self._clock() - self._window_s
            while self._entries and self._entries[0][0] < horizon:
                self._entries.popleft()
            total = sum(e[1] for e in self._entries)
            hits = sum(e[2].get(tier, 0) for e in self._entries)
        return hits / total if total else 0.0


class KvTierMetrics:
    """All counters and gauges of one kvtier instance, in a private registry.

    The data plane calls :meth:`record_transfer` and :meth:`record_load_errors`; the control plane
    calls :meth:`record_lookup`, :meth:`record_filter_rejections`, :meth:`set_pool_occupancy` and
    :meth:`set_pinned_bytes`. Every method is thread-safe (prometheus-client locks each value).
    """

    def __init__(
        self, hit_rate_window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._window = SlidingHitRate(hit_rate_window_s, clock)
        self._blocks = Counter("kvtier_blocks", "Blocks moved, per path.", ["path"], registry=reg)
        self._bytes = Counter("kvtier_bytes", "Bytes moved, per path.", ["path"], registry=reg)
        self._latency = Histogram(
            "kvtier_transfer_seconds",
            "Latency of one transfer batch, per path.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._lookup_tokens = Counter(
            "kvtier_lookup_tokens",
            "Tokens looked up in kvtier (beyond what G1 already had).",
            registry=reg,
        )
        self._matched = Counter(
            "kvtier_matched_tokens", "Tokens matched, per tier.", ["tier"], registry=reg
        )
        self._hit_rate = Gauge(
            "kvtier_hit_rate",
            f"Matched / looked-up tokens over the last {hit_rate_window_s:g} s, per tier.",
            ["tier"],
            registry=reg,
        )
        self._pool = Gauge(
            "kvtier_pool_blocks", "Pool occupancy in blocks.", ["tier", "state"], registry=reg
        )
        self._rejections = Counter(
            "kvtier_disk_filter_rejections",
            "Offloads to G3 refused by the frequency filter (block seen only once).",
            registry=reg,
        )
        self._load_errors = Counter(
            "kvtier_load_errors",
            "Blocks whose load failed (the engine recomputes them), per source tier.",
            ["tier"],
            registry=reg,
        )
        self._pinned = Gauge("kvtier_pinned_bytes", "Host memory page-locked for G2.", registry=reg)
        self._init_onboard(reg)
        self._dynamo_blocks = {
            path: Counter(
                name, f"Dynamo KVBM name of kvtier_blocks_total{{path={path!r}}}.", registry=reg
            )
            for path, name in DYNAMO_BLOCK_COUNTERS.items()
        }
        self._dynamo_matched = Gauge(
            "kvbm_matched_tokens",
            "Dynamo KVBM name: tokens matched by the last lookup.",
            registry=reg,
        )
        for tier in MATCH_TIERS:
            self._hit_rate.labels(tier).set_function(self._rate_of(tier))
        # G4 (remote tier): its own kvtier_remote_* families (kvtier.ops.remote_metrics).
        self._remote_window = SlidingHitRate(hit_rate_window_s, clock)
        self.remote = RemoteMetrics(reg, lambda: self._remote_window.rate("remote"))
        for tier in MATCH_TIERS:
            doc = f"Dynamo KVBM name of kvtier_hit_rate{{tier='{tier}'}}."
            Gauge(f"kvbm_{tier}_cache_hit_rate", doc, registry=reg).set_function(
                self._rate_of(tier)
            )
        # Every series exists from the start, at zero; the per-step setters keep the children
        # (``labels()`` validates and locks on every call: a few us each, every step).
        self._path_series = {
            path: (self._blocks.labels(path), self._bytes.labels(path), self._latency.labels(path))
            for path in PATHS
        }
        for tier in MATCH_TIERS:
            self._matched.labels(tier)
        for tier in ERROR_TIERS:
            self._load_errors.labels(tier)
        self._pool_series = {
            tier: tuple(self._pool.labels(tier, state) for state in POOL_STATES) for tier in TIERS
        }

    def _rate_of(self, tier: str) -> Callable[[], float]:
        return lambda: self._window.rate(tier)

    def record_transfer(self, path: str, blocks: int, nbytes: int, seconds: float) -> None:
        """One finished transfer batch of ``blocks`` blocks (``nbytes`` bytes) on ``path``."""
        _check_label("path", path, PATHS)
        require_count("blocks", blocks)
        require_count("nbytes", nbytes)
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self._path_series[path][2].observe(seconds)
        self._count(path, blocks, nbytes)

    def _count(self, path: str, blocks: int, nbytes: int) -> None:
        """Move ``path``'s block and byte counters (kvtier's and Dynamo's names)."""
        blocks_total, bytes_total, _ = self._path_series[path]
        blocks_total.inc(blocks)
        bytes_total.inc(nbytes)
        self._dynamo_blocks[path].inc(blocks)

    def record_transfers(
        self, transfers: Iterable[tuple[str, int, float]], block_bytes: int
    ) -> None:
        """Many finished batches ``(path, blocks, seconds)`` of ``block_bytes``-byte blocks at
        once, as ``record_transfer`` each (negative seconds count as 0): the scheduler half lands
        one per stored block (2048 for a 32k prompt), so the counters move once per path and
        only the latency once per batch. All are checked before any is counted."""
        require_count("block_bytes", block_bytes)
        batch = list(transfers)
        totals: dict[str, int] = {}
        for path, blocks, _ in batch:
            if path not in self._path_series:
                _check_label("path", path, PATHS)
            if type(blocks) is not int or blocks < 0:
                require_count("blocks", blocks)
            totals[path] = totals.get(path, 0) + blocks
        for path, _, seconds in batch:
            self._path_series[path][2].observe(max(0.0, seconds))
        for path, blocks in totals.items():
            self._count(path, blocks, blocks * block_bytes)

    def record_lookup(
        self, looked_up_blocks: int, host_blocks: int, disk_blocks: int, block_size: int
    ) -> None:
        """One prefix lookup: ``looked_up_blocks`` full blocks asked, found in G2 then G3."""
        for name, value in (
            ("looked_up_blocks", looked_up_blocks),
            ("host_blocks", host_blocks),
            ("disk_blocks", disk_blocks),
        ):
            require_count(name, value)
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size!r}")
        if host_blocks + disk_blocks > looked_up_blocks:
            raise ValueError(
                f"matched {host_blocks}+{disk_blocks} blocks of only {looked_up_blocks} looked up"
            )
        self.record_lookup_tokens(
            looked_up_blocks * block_size, host_blocks * block_size, disk_blocks * block_size
        )

    def record_lookup_tokens(self, looked_up: int, host: int, disk: int) -> None:
        """One lookup counted in tokens: ``looked_up`` tokens beyond G1 (partial tail included,
        as vLLM counts its external queries), ``host`` / ``disk`` of them found in G2 / G3."""
        for name, value in (("looked_up", looked_up), ("host", host), ("disk", disk)):
            require_count(name, value)
        if host + disk > looked_up:
            raise ValueError(f"matched {host}+{disk} tokens of only {looked_up} looked up")
        self._lookup_tokens.inc(looked_up)
        self._matched.labels("host").inc(host)
        self._matched.labels("disk").inc(disk)
        self._dynamo_matched.set(host + disk)
        self._window.add(looked_up, {"host": host, "disk": disk})

    def record_remote_lookup(self, looked_up_blocks: int, hit_blocks: int) -> None:
        """G4 lookups: blocks asked past the G2/G3 hit, and found in G4 (its hit rate)."""
        require_count("looked_up_blocks", looked_up_blocks)
        require_count("hit_blocks", hit_blocks)
        self.remote.record_lookup(looked_up_blocks, hit_blocks)
        self._remote_window.add(looked_up_blocks, {"remote": hit_blocks})

    def record_filter_rejections(self, count: int = 1) -> None:
        """``count`` G2 -> G3 offloads refused by the frequency filter."""
        require_count("count", count)
        self._rejections.inc(count)

    def record_load_errors(self, tier: str, blocks: int) -> None:
        """``blocks`` blocks whose load from ``tier`` failed (the engine recomputes them)."""
        _check_label("tier", tier, ERROR_TIERS)
        require_count("blocks", blocks)
        self._load_errors.labels(tier).inc(blocks)

    def set_pool_occupancy(self, tier: str, in_use: int, inactive: int, free: int) -> None:
        """Current block counts of ``tier``'s pool."""
        _check_label("tier", tier, TIERS)
        counts = (in_use, inactive, free)
        for state, value in zip(POOL_STATES, counts, strict=True):  # all checked before any is set
            require_count(state, value)
        for series, value in zip(self._pool_series[tier], counts, strict=True):
            series.set(value)

    def set_pinned_bytes(self, nbytes: int) -> None:
        """Bytes of host memory currently page-locked for G2."""
        require_count("nbytes", nbytes)
        self._pinned.set(nbytes)

    # -- cost-aware onboarding (kvtier.core.onboard_cost) -------------------------------------

    def _init_onboard(self, reg: CollectorRegistry) -> None:
        self._onboard_tokens = Counter(
            "kvtier_onboard_tokens",
            "Matched tokens loaded, or skipped (recomputed) by cost-aware onboarding, per tier.",
            ["tier", "decision"],
            registry=reg,
        )
        self._onboard_seconds = Histogram(
            "kvtier_onboard_seconds",
            "Cost-aware onboarding: the model's estimate and what was measured, per kind (a load "
            "job's service time, a request's time from decision to its prompt's last step).",
            ["kind", "source"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._onboard_bw = Gauge(
            "kvtier_onboard_bandwidth_bytes_per_second",
            "Load bandwidth the cost model believes now, per tier.",
            ["tier"],
            registry=reg,
        )
        self._onboard_lat = Gauge(
            "kvtier_onboard_latency_seconds",
            "Fixed cost per load job the cost model believes now, per tier.",
            ["tier"],
            registry=reg,
        )
        self._onboard_queued = Gauge(
            "kvtier_onboard_queued_bytes",
            "Bytes of loads planned and not reported done, per tier.",
            ["tier"],
            registry=reg,
        )
        self._onboard_prefill = Gauge(
            "kvtier_onboard_prefill_seconds_per_token",
            "Prefill seconds per token (at no context) the cost model believes now.",
            registry=reg,
        )
        for tier in ONBOARD_TIERS:
            for decision in ("loaded", "skipped"):
                self._onboard_tokens.labels(tier, decision)

    def record_onboard_tokens(self, tier: str, loaded: int, skipped: int) -> None:
        """Matched tokens of ``tier`` loaded and skipped since the last call."""
        _check_label("tier", tier, ONBOARD_TIERS)
        require_count("loaded", loaded)
        require_count("skipped", skipped)
        self._onboard_tokens.labels(tier, "loaded").inc(loaded)
        self._onboard_tokens.labels(tier, "skipped").inc(skipped)

    def record_onboard_estimate(self, kind: str, estimated: float, measured: float) -> None:
        """One estimate of the cost model next to what then happened (seconds)."""
        _check_label("kind", kind, ONBOARD_KINDS)
        if not (estimated >= 0 and measured >= 0):
            raise ValueError(f"seconds must be >= 0, got {estimated!r}, {measured!r}")
        self._onboard_seconds.labels(kind, "estimated").observe(estimated)
        self._onboard_seconds.labels(kind, "measured").observe(measured)

    def set_onboard_model(
        self, tier: str, bandwidth: float, latency: float, queued_bytes: int
    ) -> None:
        """What the cost model believes of ``tier`` now."""
        _check_label("tier", tier, ONBOARD_TIERS)
        require_count("queued_bytes", queued_bytes)
        self._onboard_bw.labels(tier).set(bandwidth)
        self._onboard_lat.labels(tier).set(latency)
        self._onboard_queued.labels(tier).set(queued_bytes)

    def set_onboard_prefill(self, seconds_per_token: float) -> None:
        self._onboard_prefill.set(seconds_per_token)

    def hit_rate(self, tier: str) -> float:
        """The sliding-window hit rate of ``tier`` (what ``kvtier_hit_rate`` shows)."""
        _check_label("tier", tier, MATCH_TIERS)
        return self._window.rate(tier)
