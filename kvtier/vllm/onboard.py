"""Cost-aware onboarding in the connector's scheduler half: feeds the live cost model and caps
each request's load at the length it chooses. No torch.

Why this exists: ``KvTierScheduler.get_num_new_matched_tokens`` finds how much of a prompt G2,
G3 and G4 hold; loading all of it is not always faster than recomputing it. ``OnboardAdvisor``
asks ``kvtier.core.onboard_cost.OnboardCostModel`` how many of those blocks to load; vLLM
recomputes the rest, so the output is the same whatever it chooses (the KV is the same).

What it times, honestly and without help from the workers:

- a load job from the step it is planned in (``update_state_after_alloc``) to the worker report
  that says it is done (FIFO service time on the onboarding path, see the cost model);
- an engine step from ``build_connector_meta`` (the plan goes to the workers) to vLLM handing
  that step's output back (``update_connector_output``, matched by the step id the workers'
  metadata carries; vLLM hands nothing back for some idle steps): forward pass, sampling and
  kvtier's own stores of that step; with its scheduled tokens and their context lengths;
- for the metrics, each decision's estimated TTFT next to the time from the decision to the end
  of the step that completes that request's prompt.

Per request, vLLM passes ``SamplingParams.extra_args["kv_transfer_params"]`` to the connector
(``Request.kv_transfer_params``); kvtier reads ``kvtier_onboard``: ``"auto"`` (the knob's
choice), ``"load"`` (everything matched), ``"recompute"`` (nothing), and ``kvtier_load_tokens``:
load at most that many tokens (rounded down to whole blocks), past the cost model. A bad value
is logged as a warning naming it and ignored (the request is served as with ``"auto"``).

Not modelled: chunked prefill's extra steps, requests vLLM has not asked about yet, and loads of
one step running in parallel on a worker (the model queues them one after another, so it errs
towards recompute at high concurrency).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvtier.core.onboard_cost import TIERS, OnboardCostConfig, OnboardCostModel, OnboardDecision

__all__ = ["OnboardAdvisor", "OnboardCounters", "OnboardEstimate"]

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("auto", "load", "recompute")


@dataclass
class OnboardCounters:
    """Cumulative tokens loaded and skipped (recomputed though matched), per tier."""

    loaded_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    skipped_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    decisions: int = 0
    partial_loads: int = 0
    overrides: int = 0


@dataclass(frozen=True)
class OnboardEstimate:
    """One estimate next to what then happened (seconds): ``kind`` ``load`` (service time of a
    load job) or ``ttft`` (decision to the end of the step that completes the prompt)."""

    kind: str
    estimated: float
    measured: float


@dataclass
class _Decided:
    at: float
    prompt_tokens: int
    est_ttft: float
    recomputed: bool
    loading: bool  # loads were in flight


def _override(params: Any, request_id: str) -> tuple[str, int | None]:
    """(mode, token cap) from a request's ``kv_transfer_params`` (see the module docstring)."""
    if not isinstance(params, dict):
        return "auto", None
    mode = params.get("kvtier_onboard", "auto")
    cap = params.get("kvtier_load_tokens")
    if mode not in MODES:
        logger.warning(
            "kvtier: request %s: kv_transfer_params kvtier_onboard=%r is not one of %s; ignored",
            request_id,
            mode,
            ", ".join(MODES),
        )
        mode = "auto"
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        logger.warning(
            "kvtier: request %s: kv_transfer_params kvtier_load_tokens=%r is not an int >= 0; "
            "ignored",
            request_id,
            cap,
        )
        cap = None
    return str(mode), cap


def _log_decision(
    rid: str, matched: list[tuple[str, int]], start: int, chosen: int, d: OnboardDecision
) -> None:
    """The debug line of one cost-aware decision."""
    logger.debug(
        "kvtier onboard: request %s matched %s blocks from block %d; load %d "
        "(est ttft %.1f ms: load %.1f + queue %.1f ms; recompute all %.1f ms; "
        "delays the loads in flight by %.1f ms)",
        rid,
        dict(matched),
        start,
        chosen,
        d.est_ttft_s * 1e3,
        d.est_load_s * 1e3,
        d.est_queue_s * 1e3,
        d.est_recompute_all_s * 1e3,
        d.est_delay_s * 1e3,
    )


class OnboardAdvisor:
    """The scheduler half's cost-aware onboarding (see the module docstring)."""

    def __init__(
        self,
        config: OnboardCostConfig,
        *,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = OnboardCostModel(config)
        self.enabled = enabled
        self.counters = OnboardCounters()
        self._clock = clock
        self._decided: dict[str, _Decided] = {}
        self._chosen: dict[str, tuple[list[tuple[str, int]], int, int, bool]] = {}
        self._prompt_end: dict[str, int] = {}  # requests in the compute backlog
        self._completing: dict[int, list[str]] = {}  # step -> requests it completes
        self._estimates: deque[OnboardEstimate] = deque(maxlen=4096)

    def choose(
        self,
        request: Any,
        start_block: int,
        matched: list[tuple[str, int]],
        block_size: int,
    ) -> int:
        """Blocks to load of the ``matched`` (tier, blocks) run that starts at ``start_block``."""
        total = sum(n for _, n in matched)
        rid = str(request.request_id)
        prompt_end = int(request.num_tokens)
        if total == 0:  # nothing to decide; it adds to the compute backlog of later requests
            self._note_pending(rid, start_block * block_size, prompt_end)
            return 0
        mode, cap = _override(getattr(request, "kv_transfer_params", None), rid)
        now = self._clock()
        decision: OnboardDecision | None = None
        if mode == "recompute":
            chosen = 0
        elif mode == "load" or (mode == "auto" and not self.enabled):
            chosen = total
        else:
            decision = self.model.choose(
                matched,
                start_block * block_size,
                prompt_end,
                block_size,
                now,
                backlog_s=self.model.backlog_seconds(exclude=rid),
            )
            chosen = decision.total_blocks
        if cap is not None:
            chosen = min(chosen, cap // block_size)
        self._note_pending(rid, (start_block + chosen) * block_size, prompt_end)
        self._chosen[rid] = (matched, chosen, block_size, mode != "auto" or cap is not None)
        if decision is not None:
            first = self._decided.get(rid)  # vLLM may ask again while the request waits
            at = first.at if first is not None else now
            self._decided[rid] = _Decided(
                at, int(request.num_tokens), decision.est_ttft_s, chosen == 0, self.model.loading
            )
            if logger.isEnabledFor(logging.DEBUG):  # its arguments cost a burst's decisions
                _log_decision(rid, matched, start_block, chosen, decision)
        else:
            logger.debug(
                "kvtier onboard: request %s matched %s blocks; load %d (mode %s, cap %s)",
                rid,
                dict(matched),
                chosen,
                mode,
                cap,
            )
        return chosen

    def _note_pending(self, rid: str, start: int, end: int) -> None:
        self._prompt_end[rid] = end
        self.model.prefill_pending(rid, start, end)

    def allocated(self, request_id: str, blocks: int) -> None:
        """vLLM allocated the request's load (``blocks`` loaded): count the last decision once
        (vLLM may ask about a waiting request at several steps before it fits)."""
        got = self._chosen.pop(request_id, None)
        if got is None:
            return
        matched, chosen, block_size, overridden = got
        self.counters.overrides += int(overridden)
        self._count(matched, min(chosen, blocks), block_size)

    def _count(self, matched: list[tuple[str, int]], chosen: int, block_size: int) -> None:
        c = self.counters
        c.decisions += 1
        left = chosen
        total = 0
        for tier, n in matched:
            take = min(n, left)
            left -= take
            total += n
            c.loaded_tokens[tier] += take * block_size
            c.skipped_tokens[tier] += (n - take) * block_size
        if 0 < chosen < total:
            c.partial_loads += 1

    def load_planned(self, job_id: int, blocks: dict[str, int]) -> None:
        """A load job of ``blocks[tier]`` blocks per tier was planned (its clock starts)."""
        bb = self.model.config.block_bytes
        nbytes = {t: n * bb for t, n in blocks.items() if n}
        self.model.load_submitted(job_id, nbytes, self._clock())

    def load_done(self, job_id: int, *, ok: bool = True) -> None:
        got = self.model.load_finished(job_id, self._clock(), ok=ok)
        if got is not None:
            self._estimates.append(OnboardEstimate("load", got[0], got[1]))

    def step_planned(self, step: int, rows: Iterable[tuple[str, int, int]]) -> None:
        """Step ``step`` goes to the workers: (req_id, computed, scheduled tokens) per request."""
        rows = rows if isinstance(rows, list) else list(rows)
        tokens = 0
        pairs = 0.0
        for _, computed, scheduled in rows:  # every request, every step: the sums only
            if scheduled > 0:
                tokens += scheduled
                pairs += scheduled * (computed + scheduled / 2.0)
        completing: list[str] = []
        watched = self._prompt_end.keys() | self._decided.keys()  # prefills: usually few
        for rid, computed, scheduled in rows if watched else ():
            if scheduled <= 0 or rid not in watched:
                continue
            end = self._prompt_end.get(rid)
            if end is not None:
                self.model.prefill_pending(rid, computed + scheduled, end)
                if computed + scheduled >= end:
                    del self._prompt_end[rid]
            d = self._decided.get(rid)
            if d is not None and computed + scheduled >= d.prompt_tokens:
                completing.append(rid)
        self.model.step_started(step, tokens, pairs, self._clock())
        if completing:
            self._completing[step] = completing

    def step_done(self, step: int) -> None:
        """vLLM handed back the output of step ``step`` (the workers' report says which)."""
        now = self._clock()
        if self.model.step_finished(step, now) is None:
            return
        for old in [s for s in self._completing if s < step]:  # no output came back for it
            for rid in self._completing.pop(old):
                self._decided.pop(rid, None)
        for rid in self._completing.pop(step, ()):
            d = self._decided.pop(rid, None)
            if d is not None:
                self._estimates.append(OnboardEstimate("ttft", d.est_ttft, now - d.at))
                if d.recomputed:
                    self.model.recompute_observed(d.est_ttft, now - d.at, loading=d.loading)

    def forget(self, request_id: str) -> None:
        """The request finished; vLLM says so before it hands back the output of the step that
        finished it (one-token requests), so a decision that step completes waits for step_done."""
        if not any(request_id in rids for rids in self._completing.values()):
            self._decided.pop(request_id, None)
        self._chosen.pop(request_id, None)
        if self._prompt_end.pop(request_id, None) is not None:
            self.model.prefill_pending(request_id, 0, 0)

    def take_estimates(self) -> list[OnboardEstimate]:
        """Estimates next to measurements since the last call (for the metrics)."""
        out = list(self._estimates)
        self._estimates.clear()
        return out
