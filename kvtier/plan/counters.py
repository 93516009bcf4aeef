"""Cumulative counters of the tier planner and the vLLM scheduler half that drives it.

Why one dataclass for both: metrics and tests read one set of figures (``SchedulerCounters``, the
name vLLM's side exports); the planner counts what it decides (hits, copies, evictions, failures),
the scheduler half what vLLM asks (lookups, query tokens). Plain data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerCounters"]


@dataclass
class SchedulerCounters:
    """Cumulative counters of the scheduler half (blocks unless named otherwise)."""

    lookups: int = 0
    lookup_blocks: int = 0
    query_tokens: int = 0
    """Tokens beyond G1 of the requests vLLM scheduled (not resumed after preemption), counted
    once per scheduling, as vLLM counts ``vllm:external_prefix_cache_queries``; retried
    lookups of a request waiting for G1 space are not counted again."""
    query_host_tokens: int = 0
    query_disk_tokens: int = 0
    host_hit_blocks: int = 0
    disk_hit_blocks: int = 0
    matched_tokens: int = 0
    onboard_h2d: int = 0
    onboard_d2d: int = 0
    offload_d2h: int = 0
    offload_h2d: int = 0
    offload_d2d: int = 0
    store_failures: int = 0
    load_failures: int = 0
    host_load_failures: int = 0
    disk_load_failures: int = 0
    disk_corrupt: int = 0
    host_evictions: int = 0
    disk_evictions: int = 0
    resumed_requests: int = 0
