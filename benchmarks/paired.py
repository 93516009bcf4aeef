"""Paired ratios of two setups measured round by round, and their about-95% interval.

Why a module of its own: the GPU decode A/B (``vllm_gpu.py``) and the cost-aware onboarding
benchmark (``vllm_cost_aware.py``) both compare two setups that take turns on a machine whose
rounds swing by 15-20%; a difference of 2-3% can only be read from per-round ratios.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["paired_interval", "paired_ratio"]


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Geometric mean of round-by-round ratios: each round runs both engines back to back (the
    order alternating), so a drift slower than a round cancels within each pair."""
    logs = _log_ratios(base, other)
    return math.exp(sum(logs) / len(logs))


def _log_ratios(base: list[float], other: list[float]) -> list[float]:
    """``log(other / base)`` round by round."""
    return [math.log(o / b) for b, o in zip(base, other, strict=True)]


def paired_interval(base: list[float], other: list[float]) -> tuple[float, float]:
    """About 95% bounds of ``paired_ratio`` (mean of the logs +- 2 standard errors): on a host
    whose rounds swing by 20%, a 3% difference needs this to be read at all."""
    logs = _log_ratios(base, other)
    if len(logs) < 2:
        return (math.nan, math.nan)
    mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    return (math.exp(mean - 2 * se), math.exp(mean + 2 * se))
