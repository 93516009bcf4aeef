"""Live cost model of onboarding vs recompute: the measurements a load decision is made on.

Why this exists: loading KV from a tier is not always faster than recomputing it (a slow disk,
a remote store over a thin link, a queue of loads ahead). This module keeps live measurements
from which ``kvtier.core.onboard_choice`` answers, per request and in microseconds, how many of
the matched blocks to load so that the expected time to first token is lowest. It is pure
Python, no torch, no clock of its own (every call is given ``now``), so the decision is
unit-tested on synthetic measurements.

What it measures (fed by the connector's scheduler half, see ``kvtier.vllm.onboard``):

- **Loads.** Each load job is one request's matched blocks, ``bytes[t]`` from each tier ``t``;
  its parts load side by side, each on its tier's FIFO path (one G3 reader, one G4 fetcher).
  Its *service time* is measured FIFO on its slowest part's path: ``done - max(submitted, that
  path's previous job done)`` (a job that waited behind others is not charged for the wait).
  Done is only seen at a step end, so what is learnt is the prediction moved into the window
  the steps leave (done by this step's end, not by the one before): a long step hides the time.
  Per tier, a decayed least-squares fit of ``service = latency + bytes / bandwidth`` (moving
  averages: older jobs fade by ``decay`` at each new one), taught only by the jobs whose part
  there is predicted slowest (so a G2 + G4 job neither hides G4's slowness nor teaches G2 to be
  slow). What is queued ahead of a new part is the predicted service of the parts in flight on
  its tier's path: their count times the tier's latency plus their bytes at its bandwidth (the
  fit measures each job's service FIFO, so the queue is the sum of those; with jobs all of one
  size the fit cannot tell latency from bandwidth, and a burst's G4 fit put all of a job's 44 ms
  in its latency: a queue of bytes alone read 15 loads ahead as no wait at all).
- **Prefill.** Each engine step (from the plan sent to the workers to the workers' output of that
  step coming back, matched by step id, queued behind the step before it) with its scheduled
  tokens: ``step = per_token * tokens + per_pair * pairs``, where ``pairs`` sums each new token's
  context length (attention grows with it), learnt from steps of at least ``prefill_min_tokens``.
  There is no per-step overhead term on purpose: both choices pay one step, and on a shared
  machine a fitted overhead soaks up the noise and leaves recompute looking free; small steps
  (mostly overhead) are left out instead.
- Before data, both fits lean on a prior (``OnboardCostConfig``) held with a small fixed weight,
  so a tier never seen keeps its prior and new measurements dominate within a few observations.

- **Recompute calibration.** When a request that recomputed everything reaches its first
  token, the ratio of that time to its estimate moves ``recompute_scale`` (all prefill
  estimates are multiplied by it): the step time misses what vLLM spends around the forward pass.
  Requests decided while loads were in flight move ``loading_factor`` instead, applied on top
  while loads are in flight (on a CPU build the loads take cores from the prefill).
- **Compute backlog.** The prompt tokens other requests still have to prefill (noted at each
  decision, taken off as steps schedule them), priced by the prefill fit: a request that
  recomputes waits behind them, a load runs beside them.

The decision built on these estimates (``OnboardCostModel.choose``) is in
``kvtier.core.onboard_choice``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.core.decayed_fit import DecayedLinearFit
from kvtier.core.onboard_choice import TIERS, OnboardDecision, choose

__all__ = [
    "TIERS",
    "DecayedLinearFit",
    "OnboardCostConfig",
    "OnboardCostModel",
    "OnboardDecision",
]


def _tier_defaults(g2: float, g3: float, g4: float) -> dict[str, float]:
    return {"G2": g2, "G3": g3, "G4": g4}


@dataclass(frozen=True)
class OnboardCostConfig:
    """Priors and weights of the cost model, and the bias of the decision.

    The priors are deliberately on the side of loading (the behaviour without this model): a
    tier that has not been measured yet is assumed fast, and prefill not cheap."""

    block_bytes: int
    bias: float = 1.0
    """Factor on every estimated load time: > 1 leans towards recompute, < 1 towards loading."""
    bandwidth_prior: dict[str, float] = field(
        default_factory=lambda: _tier_defaults(10e9, 2e9, 1e9)
    )
    """Bytes per second of each tier before it is measured."""
    latency_prior: dict[str, float] = field(
        default_factory=lambda: _tier_defaults(0.0002, 0.0005, 0.001)
    )
    """Seconds of fixed cost per load job with a part in that tier, before it is measured."""
    prefill_per_token_prior: float = 20e-6
    prefill_per_pair_prior: float = 0.0
    prior_weight: float = 0.2
    """How many observations the prior weighs (a one-block load, a 256-token step), for ever."""
    decay: float = 0.9
    """Weight kept by older observations at each new one (0.9: about the last 10 count)."""
    prefill_min_tokens: int = 256
    """Steps with fewer scheduled tokens are not learnt from: their time is mostly the step's
    own overhead (decode steps, the short rest after a load), which would be read as a cost per
    token or, for a rest at a long context, per pair of context."""
    outlier_factor: float = 4.0
    """An observation above this many times the current prediction counts as that much, unless
    the one before was such an outlier too: one stall of a shared machine must not flip
    decisions, a lasting change is learnt from its second observation on."""
    margin: float = 0.1
    """Loading less than everything matched is chosen only when estimated this fraction faster
    (measurements are noisy; loading all is what happens without this model)."""

    def __post_init__(self) -> None:
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, int):
            raise ValueError(
                f"OnboardCostConfig.block_bytes must be an int, got {self.block_bytes!r}"
            )
        if self.block_bytes <= 0:
            raise ValueError(f"OnboardCostConfig.block_bytes must be > 0, got {self.block_bytes}")
        if not self.bias > 0.0:
            raise ValueError(f"OnboardCostConfig.bias must be > 0, got {self.bias!r}")
        for name in ("bandwidth_prior", "latency_prior"):
            table = getattr(self, name)
            if set(table) != set(TIERS):
                raise ValueError(f"OnboardCostConfig.{name} must name exactly {TIERS}")
        if any(v <= 0 for v in self.bandwidth_prior.values()):
            raise ValueError("OnboardCostConfig.bandwidth_prior must be > 0")
        if any(v < 0 for v in self.latency_prior.values()):
            raise ValueError("OnboardCostConfig.latency_prior must be >= 0")
        if self.prefill_per_token_prior < 0 or self.prefill_per_pair_prior < 0:
            raise ValueError("OnboardCostConfig: prefill priors must be >= 0")
        if not self.prior_weight > 0 or not 0.0 < self.decay <= 1.0:
            raise ValueError("OnboardCostConfig: need prior_weight > 0 and 0 < decay <= 1")
        if not self.outlier_factor > 1.0 or not self.margin >= 0.0:
            raise ValueError("OnboardCostConfig: need outlier_factor > 1 and margin >= 0")


@dataclass
class _Job:
    submitted: float
    parts: dict[str, float]  # tier -> bytes
    predicted: float


@dataclass
class _Ready:
    """The loads in flight as ``inflight_delay`` reads them: predicted seconds of work queued on
    each tier's path, each load's predicted landing (sorted) and their running sums."""

    ahead: dict[str, float]
    ends: list[float]
    sums: list[float]


@dataclass
class _Step:
    step: int
    started: float
    features: list[float]


class OnboardCostModel:
    """Measurements (loads per tier, engine steps) and, through ``choose``, the decision on them;
    see the module docstrings of this module and of ``kvtier.core.onboard_choice``."""

    def __init__(self, config: OnboardCostConfig) -> None:
        self.config = config
        bb = float(config.block_bytes)
        typical_bytes = bb  # the prior weighs as ``prior_weight`` one-block loads
        self.loads = {
            t: DecayedLinearFit(
                [config.latency_prior[t], 1.0 / config.bandwidth_prior[t]],
                [1.0, typical_bytes],
                config.prior_weight,
                config.decay,
            )
            for t in TIERS
        }
        self.prefill = DecayedLinearFit(
            [config.prefill_per_token_prior, config.prefill_per_pair_prior],
            # ... and as that many 256-token steps at 4k tokens of context: context-dependent cost
            # needs data that varies in context to show (same-shaped prompts leave it collinear)
            [256.0, 256.0 * 4096.0],
            config.prior_weight,
            config.decay,
        )
        self._jobs: dict[int, _Job] = {}
        self._ready: _Ready | None = None  # see _loads_ready
        self._path_free_at = dict.fromkeys(TIERS, float("-inf"))  # each tier's path last idle
        self._steps: deque[_Step] = deque()
        self._steps_free_at = float("-inf")
        self.queued_bytes: dict[str, int] = dict.fromkeys(TIERS, 0)
        self.queued_parts: dict[str, int] = dict.fromkeys(TIERS, 0)  # jobs with a part there
        self._pending: dict[str, tuple[float, float]] = {}  # request -> (tokens, pairs) to compute
        self._pending_tokens = 0.0
        self._pending_pairs = 0.0
        self.recompute_scale = 1.0  # TTFT of a recompute / the prefill fit's estimate
        self.loading_factor = 1.0  # ... and on top of it while loads are in flight

    # -- measurements -----------------------------------------------------------------------

    def tier_latency(self, tier: str) -> float:
        return self.loads[tier].theta[0]

    def tier_bandwidth(self, tier: str) -> float:
        spb = self.loads[tier].theta[1]
        return 1.0 / spb if spb > 0 else float("inf")

    def prefill_seconds(self, start: int, end: int) -> float:
        """Estimated compute of prompt tokens ``start..end`` (their context included)."""
        if end <= start:
            return 0.0
        per_token, per_pair = self.prefill.theta
        cost = per_token * (end - start) + per_pair * (end * end - start * start) / 2.0
        return cost * self.recompute_scale * (self.loading_factor if self._jobs else 1.0)

    def recompute_observed(self, estimated: float, measured: float, *, loading: bool) -> None:
        """A request that recomputed everything reached its first token after ``measured``
        seconds where ``estimated`` was predicted (``loading``: with loads in flight then).

        The step times the prefill fit learns from leave out what vLLM spends around the
        forward pass (scheduling, output processing, on a busy machine a lot), which a load's
        measured time includes; this calibrates the recompute side to TTFT (a moving average of
        the ratio, in the log, within 1/4..20): ``recompute_scale``, and on top of it while
        loads are in flight ``loading_factor`` (on a CPU build the loads take cores from the
        prefill: a burst's recomputes took 4x their estimate)."""
        if estimated <= 0 or measured <= 0:
            return
        step = math.exp((1.0 - self.config.decay) * math.log(measured / estimated))
        if loading:
            self.loading_factor = min(20.0, max(0.25, self.loading_factor * step))
        else:
            self.recompute_scale = min(20.0, max(0.25, self.recompute_scale * step))

    @property
    def loading(self) -> bool:
        """Loads are in flight."""
        return bool(self._jobs)

    def _part_seconds(self, tier: str, nbytes: float) -> float:
        """Predicted seconds of a job's part of ``nbytes`` in ``tier`` (0 for no part)."""
        return self.loads[tier].predict([1.0, nbytes]) if nbytes else 0.0

    def queue_seconds(self, tier: str) -> float:
        """Predicted wait of a new part in ``tier`` behind the loads in flight there: the sum of
        their predicted service, a latency each plus their bytes at the tier's bandwidth (each
        tier's worker path is FIFO: one G3 reader thread, one G4 fetch thread; the tiers run in
        parallel). The service the fit learns is measured FIFO, a job's time past the one before
        it (pipelined reads overlap their latencies and learn a small one), so summing it counts
        no wait twice; the bytes alone miss a queue whose cost the fit puts in the latency."""
        lat, spb = self.loads[tier].theta
        return self.queued_parts[tier] * lat + self.queued_bytes[tier] * spb

    def _loads_ready(self) -> _Ready:
        """Predicted seconds until each load in flight is done (FIFO per tier), sorted, and
        their running sums; kept until a load finishes (the fits move then), a newly submitted
        load is added to it (``_add_ready``: a burst submits one load per decision)."""
        if self._ready is None:
            self._ready = _Ready(dict.fromkeys(TIERS, 0.0), [], [0.0])
            for job in self._jobs.values():
                self._add_ready(self._ready, job)
        return self._ready

    def _add_ready(self, ready: _Ready, job: _Job) -> None:
        """Queue ``job`` behind the loads in ``ready`` (FIFO on each of its tiers' paths)."""
        end = 0.0
        for t, n in job.parts.items():
            ready.ahead[t] += self._part_seconds(t, n)
            end = max(end, ready.ahead[t])
        bisect.insort(ready.ends, end)
        ready.sums = list(itertools.accumulate(ready.ends, initial=0.0))

    def inflight_delay(self, start: float, end: float) -> float:
        """Sum over the loads in flight landing in ``[start, end)`` of ``end - landing``: what
        a prefill running over that span adds to their TTFT (their rest waits for it)."""
        cached = self._loads_ready()
        ready, sums = cached.ends, cached.sums
        lo, hi = bisect.bisect_left(ready, start), bisect.bisect_left(ready, end)
        return (hi - lo) * end - (sums[hi] - sums[lo])

    def load_submitted(self, job_id: int, bytes_by_tier: dict[str, int], now: float) -> float:
        """A load job was planned; returns its predicted service seconds (its parts run in
        parallel, one per tier)."""
        parts = {t: float(n) for t, n in bytes_by_tier.items() if n}
        predicted = max((self._part_seconds(t, n) for t, n in parts.items()), default=0.0)
        if job_id in self._jobs:  # the same id again replaces that job: rebuilt when read
            self._ready = None
        job = self._jobs[job_id] = _Job(now, parts, predicted)
        if self._ready is not None:
            self._add_ready(self._ready, job)
        for t, n in parts.items():
            self.queued_bytes[t] += int(n)
            self.queued_parts[t] += 1
        return predicted

    def load_finished(
        self, job_id: int, now: float, *, ok: bool = True
    ) -> tuple[float, float] | None:
        """A load job was reported done; returns (predicted, measured) service seconds, or None
        for a job not known. A failed job is not learned from (it may have stopped early).

        The job's time is its slowest part's, so only the tier predicted slowest learns from it
        (a G2 + G4 job neither hides G4's slowness nor teaches G2 to be slow; the others learn
        from jobs of their own). Service time is FIFO on that tier's path: from when it was
        submitted or the path's previous job was done, whichever is later."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        self._ready = None
        for t, n in job.parts.items():
            self.queued_bytes[t] = max(0, self.queued_bytes[t] - int(n))
            self.queued_parts[t] = max(0, self.queued_parts[t] - 1)
        if not job.parts:
            return job.predicted, 0.0
        top = max(job.parts, key=lambda t: self._part_seconds(t, job.parts[t]))
        x = [1.0, job.parts[top]]
        start = max(job.submitted, self._path_free_at[top])
        service = max(0.0, now - start)
        # Reports come at step ends: the job was done by now but not yet when the step before
        # came back. A prediction inside that window is what is learnt (a long prefill step
        # reports a 1 ms G2 load after 300 ms); one outside it learns the nearer end.
        known = service
        if self._steps or self._steps_free_at > float("-inf"):  # timed by steps
            after = max(0.0, self._steps_free_at - start)
            known = min(service, max(after, self.loads[top].predict(x)))
        self._path_free_at[top] = start + known  # when this path took up the next job
        if ok:
            self._observe(self.loads[top], x, known)
        return job.predicted, service

    def _observe(self, fit: DecayedLinearFit, x: list[float], y: float) -> None:
        """Learn ``y``; a lone outlier is clipped, two in a row are a change and learnt."""
        cap = self.config.outlier_factor * fit.predict(x)
        outlier = cap > 0 and y > cap
        if outlier and not fit.last_outlier:
            y = cap
        fit.last_outlier = outlier
        fit.observe(x, y)

    def step_started(self, step: int, tokens: int, pairs: float, now: float) -> None:
        """Engine step ``step`` (increasing ids) with ``tokens`` scheduled tokens and ``pairs``
        (sum of each token's context length) was planned."""
        self._steps.append(_Step(step, now, [float(tokens), float(pairs)]))
        if len(self._steps) > 64:  # outputs that never came back (a caller that does not report)
            self._steps.popleft()

    def step_finished(self, step: int, now: float) -> float | None:
        """Step ``step``'s output came back; returns its measured seconds (None: not planned
        here). Steps planned before it that never came back are dropped unmeasured: vLLM hands
        no output back for a step that ran nothing and reported nothing, so matching outputs
        to steps in order would charge each step the time of another (it did: every prefill
        step of a benchmark read as the idle step before it, 10x too cheap)."""
        steps = self._steps
        while steps and steps[0].step < step:
            steps.popleft()
        if not steps or steps[0].step != step:
            return None
        got = steps.popleft()
        seconds = max(0.0, now - max(got.started, self._steps_free_at))
        self._steps_free_at = now
        if got.features[0] >= self.config.prefill_min_tokens:
            self._observe(self.prefill, got.features, seconds)
        return seconds

    def prefill_pending(self, key: str, start: int, end: int) -> None:
        """Request ``key`` still has prompt tokens ``start..end`` to compute (replaces what was
        noted for it; nothing left removes it)."""
        old = self._pending.pop(key, None)
        if old is not None:
            self._pending_tokens -= old[0]
            self._pending_pairs -= old[1]
        if end > start:
            item = (float(end - start), (end * end - start * start) / 2.0)
            self._pending[key] = item
            self._pending_tokens += item[0]
            self._pending_pairs += item[1]
        if not self._pending:
            self._pending_tokens = self._pending_pairs = 0.0  # no drift from float sums

    def backlog_seconds(self, exclude: str | None = None) -> float:
        """Predicted prefill still to run for the requests noted by ``prefill_pending``."""
        tokens, pairs = self._pending_tokens, self._pending_pairs
        mine = self._pending.get(exclude) if exclude is not None else None
        if mine is not None:
            tokens, pairs = tokens - mine[0], pairs - mine[1]
        per_token, per_pair = self.prefill.theta
        scale = self.recompute_scale * (self.loading_factor if self._jobs else 1.0)
        return max(0.0, per_token * tokens + per_pair * pairs) * scale

    # -- the decision (kvtier.core.onboard_choice) ------------------------------------------

    def choose(
        self,
        matched: Sequence[tuple[str, int]],
        start_tokens: int,
        prompt_tokens: int,
        block_size: int,
        now: float,
        backlog_s: float = 0.0,
    ) -> OnboardDecision:
        """How many of the matched blocks to load: ``kvtier.core.onboard_choice.choose``."""
        return choose(self, matched, start_tokens, prompt_tokens, block_size, now, backlog_s)
