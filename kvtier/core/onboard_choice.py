"""The decision how much of a matched prefix to load, on the live cost model's estimates.

Why a module of its own: ``kvtier.core.onboard_cost`` measures (load fits per tier, the prefill
fit, queues and backlog); this module only decides, reading those estimates through
``OnboardCostModel``'s public queries, so each side can be read and tested alone. Pure Python,
no torch, no clock. The entry point is ``OnboardCostModel.choose``, which calls ``choose`` here.

The decision: the matched prefix is laid out tier by tier (G2
blocks, then G3, then G4). Loading ``k`` blocks takes ``L(k) = max over the used tiers of (queue +
latency + bytes / bandwidth)`` and costs ``T(k) = max(bias * L(k), B) + R(P0 + k * block_size)``,
where ``B`` is the compute backlog and ``R(p)`` the recompute of tokens ``p..N``: ``per_token *
(N - p) + per_pair * (N^2 - p^2) / 2``; ``T(0) = B + R(P0)``. Inside one tier's segment the load
term is linear in ``k`` past the earlier tiers and ``R`` is concave (``per_pair >= 0``), so on
each side of the point where this tier's part stops hiding behind the earlier ones and ``B``
the stationary point is a maximum and the optimum lies at an end: the candidates are 0 and, for
each tier, its first and last block and the two blocks around that crossing point. Each
candidate is scored ``T(k)`` plus what its prefill (``T(k) - R`` to ``T(k)``) adds to the loads in
flight: vLLM runs a running prefill ahead of a loaded request's rest, so each load predicted to
land inside that span waits until its end (a burst where every request recomputes what the ones
before it load hold all their rests back). At most thirteen evaluations; a load shorter than the
whole match must be estimated ``margin`` faster (10%) to be chosen, and ties go to the longer
load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.core.onboard_cost import OnboardCostModel

__all__ = ["TIERS", "OnboardDecision", "choose"]

TIERS: tuple[str, ...] = ("G2", "G3", "G4")
"""Tiers a prefix can be onboarded from, in the order a match walks them."""


@dataclass(frozen=True)
class OnboardDecision:
    """What to load: ``blocks[t]`` of each tier's matched blocks (a prefix of the match), with
    the model's estimates (seconds) for that choice and for recomputing everything."""

    blocks: dict[str, int]
    matched: dict[str, int]
    est_load_s: float
    est_queue_s: float
    est_ttft_s: float
    est_recompute_all_s: float
    est_delay_s: float = 0.0
    """What this choice adds to the TTFT of the loads in flight (their rest waits for it)."""

    @property
    def total_blocks(self) -> int:
        return sum(self.blocks.values())

    @property
    def skipped(self) -> dict[str, int]:
        return {t: self.matched[t] - self.blocks[t] for t in self.matched}


def choose(
    model: OnboardCostModel,
    matched: Sequence[tuple[str, int]],
    start_tokens: int,
    prompt_tokens: int,
    block_size: int,
    now: float,
    backlog_s: float = 0.0,
) -> OnboardDecision:
    """How many of the matched blocks to load, by ``model``'s estimates (see the module docstring).

    ``matched``: (tier, blocks) in match order; ``start_tokens``: tokens already computed
    (vLLM's G1 hit), where the match starts; ``prompt_tokens``: the prompt's length;
    ``backlog_s``: prefill the engine has yet to run for other requests
    (``backlog_seconds``)."""
    bias, bb, backlog = model.config.bias, model.config.block_bytes, backlog_s
    recompute_all = model.prefill_seconds(start_tokens, prompt_tokens)
    total_blocks = sum(max(0, n) for _, n in matched)
    shorter = 1.0 + model.config.margin  # a load shorter than the whole match must win by this

    def cost(k: int, load: float) -> tuple[float, float]:
        """(TTFT, delay to the loads in flight) when ``k`` blocks load in ``load`` s."""
        wait = max(bias * load, backlog) if k else backlog
        ttft = wait + model.prefill_seconds(start_tokens + k * block_size, prompt_tokens)
        return ttft, model.inflight_delay(wait, ttft) if model.loading else 0.0

    counts = dict.fromkeys(TIERS, 0)
    fast = _load_all_wins(model, matched, counts, start_tokens, prompt_tokens, block_size, backlog)
    if fast is not None:  # no shorter load can win: skip the candidates (a burst's usual case)
        load, queue = fast
        ttft, delay = cost(total_blocks, load)
        return _decision(counts, total_blocks, load, queue, ttft, delay, recompute_all)
    best_t, best_delay = cost(0, 0.0)
    best_k, best_load, best_queue = 0, 0.0, 0.0
    best_score = (best_t + best_delay) * (shorter if total_blocks else 1.0)
    done_blocks, done_load, done_queue = 0, 0.0, 0.0  # the tiers before: all their blocks
    for tier, n in matched:
        if n <= 0:
            continue
        lat, spb = model.loads[tier].theta
        queue = model.queue_seconds(tier)
        ks = {1, n}
        if spb > 0:  # where this tier's part starts to decide: past the others and backlog
            cross = (max(done_load, backlog / bias) - queue - lat) / (bb * spb)
            ks.update(k for k in (math.floor(cross), math.ceil(cross)) if 1 <= k <= n)
        for k in sorted(ks):
            part = queue + lat + k * bb * spb
            load = max(done_load, part)
            ttft, delay = cost(done_blocks + k, load)
            score = (ttft + delay) * (shorter if done_blocks + k < total_blocks else 1.0)
            if score <= best_score:
                best_k, best_t, best_delay, best_score = done_blocks + k, ttft, delay, score
                best_load, best_queue = load, queue if part >= done_load else done_queue
        done_blocks += n
        part = queue + lat + n * bb * spb
        if part >= done_load:
            done_load, done_queue = part, queue
    return _decision(counts, best_k, best_load, best_queue, best_t, best_delay, recompute_all)


def _load_all_wins(
    model: OnboardCostModel,
    matched: Sequence[tuple[str, int]],
    counts: dict[str, int],
    start_tokens: int,
    prompt_tokens: int,
    block_size: int,
    backlog: float,
) -> tuple[float, float] | None:
    """(load seconds, queue seconds) of loading every matched block when that provably beats
    every shorter load, else None; fills ``counts`` (matched blocks per tier) either way.

    The proof: any shorter load ``k`` waits at least the backlog ``B`` and recomputes at least
    the last matched block more, so ``T(k) >= B + R(P0 + k * bs) >= B + R(end) + g`` with ``g``
    the prefill of that last block; loading all costs ``max(bias * L, B) + R(end)``. So when
    ``bias * L - B < g`` every shorter load is slower, and it also holds up the loads in flight
    at least as long (its prefill starts no later and ends later): the candidates' answer is
    "all", at the price of one estimate instead of up to thirteen."""
    done_load, done_queue, total = 0.0, 0.0, 0
    for tier, n in matched:
        if n <= 0:
            continue
        counts[tier] += n
        total += n
        lat, spb = model.loads[tier].theta
        queue = model.queue_seconds(tier)
        part = queue + lat + n * model.config.block_bytes * spb
        if part >= done_load:
            done_load, done_queue = part, queue
    end = start_tokens + total * block_size
    if total == 0 or end > prompt_tokens:
        return None
    gain = model.prefill_seconds(end - block_size, end)
    excess = max(0.0, model.config.bias * done_load - backlog)
    if gain > excess * (1.0 + 1e-9) + 1e-12:  # strictly: a rounding never decides it
        return done_load, done_queue
    return None


def _decision(
    counts: dict[str, int],
    k: int,
    load: float,
    queue: float,
    ttft: float,
    delay: float,
    recompute_all: float,
) -> OnboardDecision:
    """The decision to load the first ``k`` matched blocks, spread over the tiers in order."""
    blocks: dict[str, int] = {}
    left = k
    for t in TIERS:
        blocks[t] = min(counts[t], left)
        left -= blocks[t]
    return OnboardDecision(
        blocks=blocks,
        matched=counts,
        est_load_s=load - queue,
        est_queue_s=queue,
        est_ttft_s=ttft,
        est_recompute_all_s=recompute_all,
        est_delay_s=delay,
    )
