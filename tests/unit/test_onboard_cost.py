"""The cost-aware onboarding decision on synthetic measurements: exact chosen lengths.

Units: blocks of 100 tokens and 1 MB; recompute 0.1 ms per token (10 ms per block) unless a
test says otherwise, so a tier pays off when one block loads in under 10 ms.
"""

from __future__ import annotations

import random

import pytest

from kvtier.core.onboard_cost import TIERS, OnboardCostConfig, OnboardCostModel

BS = 100
BB = 1_000_000


def model(
    bw: dict[str, float] | None = None,
    lat: dict[str, float] | None = None,
    per_token: float = 1e-4,
    per_pair: float = 0.0,
    bias: float = 1.0,
    weight: float = 1e6,
) -> OnboardCostModel:
    """A model whose priors are the 'measurements' (held with a huge weight)."""
    bandwidth = {"G2": 10e9, "G3": 1e9, "G4": 1e9} | (bw or {})
    latency = {"G2": 0.0, "G3": 0.0, "G4": 0.0} | (lat or {})
    return OnboardCostModel(
        OnboardCostConfig(
            block_bytes=BB,
            bias=bias,
            bandwidth_prior=bandwidth,
            latency_prior=latency,
            prefill_per_token_prior=per_token,
            prefill_per_pair_prior=per_pair,
            prior_weight=weight,
        )
    )


def chosen(
    m: OnboardCostModel, matched: list[tuple[str, int]], start: int = 0, tail: int = 50
) -> int:
    prompt = (start + sum(n for _, n in matched)) * BS + tail
    return m.choose(matched, start * BS, prompt, BS, now=0.0).total_blocks


def test_fast_host_tier_loads_everything() -> None:
    assert chosen(model(), [("G2", 8)]) == 8


def test_slow_remote_tier_is_recomputed() -> None:
    # 50 MB/s: 20 ms per block against 10 ms of recompute
    m = model(bw={"G4": 50e6})
    d = m.choose([("G4", 8)], 0, 850, BS, now=0.0)
    assert d.total_blocks == 0
    assert d.skipped == {"G2": 0, "G3": 0, "G4": 8}
    assert d.est_ttft_s == pytest.approx(d.est_recompute_all_s) == pytest.approx(0.085)


def test_partial_load_fast_part_only() -> None:
    m = model(bw={"G4": 50e6})
    d = m.choose([("G2", 4), ("G3", 0), ("G4", 6)], 0, 1050, BS, now=0.0)
    assert d.blocks == {"G2": 4, "G3": 0, "G4": 0}
    assert d.est_ttft_s == pytest.approx(4 * 0.0001 + 0.065)


def test_latency_pays_only_for_long_matches() -> None:
    m = model(bw={"G3": 100e9}, lat={"G3": 0.050})
    assert chosen(m, [("G3", 3)]) == 0  # saves 30 ms, costs 50
    assert chosen(m, [("G3", 8)]) == 8  # saves 80 ms


def test_queue_ahead_counts() -> None:
    m = model()
    assert chosen(m, [("G2", 8)]) == 8
    m.load_submitted(1, {"G2": int(10e9)}, now=0.0)  # one second of G2 reads in flight
    assert m.queued_bytes["G2"] == int(10e9)
    assert m.queue_seconds("G2") == pytest.approx(1.0)
    assert m.choose([("G2", 8)], 0, 850, BS, now=0.25).total_blocks == 0
    m.load_finished(1, now=1.0)
    assert m.queued_bytes["G2"] == 0
    assert m.choose([("G2", 8)], 0, 850, BS, now=1.0).total_blocks == 8


def test_bias_leans_towards_recompute() -> None:
    m = model(bw={"G4": 120e6})  # 8.3 ms per block
    assert chosen(m, [("G4", 8)]) == 8
    assert chosen(model(bw={"G4": 120e6}, bias=1.5), [("G4", 8)]) == 0  # 12.5 ms per block


def test_recompute_cost_grows_with_context() -> None:
    # 5 ms per block plus 1e-8 s per token of context: 15 ms per block behind a 10k-token hit
    m = model(bw={"G4": 125e6}, per_token=5e-5, per_pair=1e-8)  # 8 ms per block
    assert chosen(m, [("G4", 5)], start=0) == 0
    assert chosen(m, [("G4", 5)], start=100) == 5


def brute_cost(
    k: int,
    matched: list[tuple[str, int]],
    bw: dict[str, float],
    lat: dict[str, float],
    costs: tuple[float, float, float],
    start: int,
    prompt: int,
    backlog: float,
) -> float:
    """T(k) straight from its definition, block by block (each tier's part loads in parallel)."""
    per_token, per_pair, bias = costs
    load, left = 0.0, k
    for t, n in matched:
        take = min(n, left)
        left -= take
        if take:
            load = max(load, lat[t] + take * BB / bw[t])
    p = (start + k) * BS
    wait = max(bias * load, backlog) if k else backlog
    return wait + per_token * (prompt - p) + per_pair * (prompt**2 - p**2) / 2


def test_decision_equals_brute_force_over_every_length() -> None:
    rng = random.Random(13)
    for _ in range(300):
        bw = {t: 10 ** rng.uniform(7, 10) for t in TIERS}
        lat = {t: rng.uniform(0, 0.05) for t in TIERS}
        per_token, per_pair = (
            10 ** rng.uniform(-6, -3),
            rng.choice([0.0, 10 ** rng.uniform(-10, -7)]),
        )
        bias = rng.choice([1.0, rng.uniform(0.5, 2)])
        m = model(bw, lat, per_token, per_pair, bias)
        matched = [(t, rng.randint(0, 6)) for t in TIERS]
        start, tail = rng.randint(0, 50), rng.randint(1, 99)
        backlog = rng.choice([0.0, rng.uniform(0, 0.5)])
        total = sum(n for _, n in matched)
        prompt = (start + total) * BS + tail

        full = sum(n for _, n in matched)
        costs = [
            brute_cost(k, matched, bw, lat, (per_token, per_pair, bias), start, prompt, backlog)
            for k in range(total + 1)
        ]
        scores = [c * (1.1 if k < full else 1.0) for k, c in enumerate(costs)]
        best = min(scores)
        want = max(k for k in range(total + 1) if scores[k] <= best * (1 + 1e-9))
        got = m.choose(matched, start * BS, prompt, BS, now=0.0, backlog_s=backlog)
        assert got.total_blocks == want, (matched, costs)
        assert got.est_ttft_s == pytest.approx(costs[want], rel=1e-6)


def test_learns_tier_and_prefill_costs_from_measurements() -> None:
    # Truth: G3 12 ms latency, 200 MB/s (5 ms per block); prefill 0.1 ms a token.
    m = OnboardCostModel(OnboardCostConfig(block_bytes=BB))
    now = 0.0
    for i in range(40):
        blocks = 1 + i % 8
        m.load_submitted(i, {"G3": blocks * BB}, now)
        now += 0.012 + blocks * 0.005
        assert m.load_finished(i, now) is not None
    for i in range(40):
        tokens = 64 + 97 * (i % 11)
        m.step_started(i, tokens, tokens * tokens / 2, now)
        now += tokens * 1e-4
        m.step_finished(i, now)
    assert m.tier_latency("G3") == pytest.approx(0.012, rel=0.15)  # the prior pulls a little
    assert m.tier_bandwidth("G3") == pytest.approx(200e6, rel=0.05)
    assert m.prefill_seconds(0, 1000) == pytest.approx(0.1, rel=0.05)
    # unmeasured tiers keep their priors
    assert m.tier_bandwidth("G4") == pytest.approx(1e9, rel=0.01)
    assert m.choose([("G3", 1)], 0, 150, BS, now).total_blocks == 0  # 17 ms > 10 ms
    assert m.choose([("G3", 8)], 0, 850, BS, now).total_blocks == 8  # 52 ms < 80 ms


def test_service_time_is_fifo_not_queue_wait() -> None:
    m = model()
    m.load_submitted(1, {"G3": BB}, 0.0)
    m.load_submitted(2, {"G3": BB}, 0.0)
    for job, done in ((1, 0.010), (2, 0.020)):
        got = m.load_finished(job, done)
        assert got is not None
        assert got[0] == pytest.approx(0.001)  # predicted from the prior: 1 MB at 1 GB/s
        assert got[1] == pytest.approx(0.010)  # measured: not the 10 ms job 2 waited
    assert m.load_finished(3, 0.030) is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="bias"):
        OnboardCostConfig(block_bytes=BB, bias=0.0)
    with pytest.raises(ValueError, match="block_bytes"):
        OnboardCostConfig(block_bytes=0)
    with pytest.raises(ValueError, match="bandwidth_prior"):
        OnboardCostConfig(block_bytes=BB, bandwidth_prior={"G2": 1.0})


def test_mixed_jobs_teach_the_slow_tier_not_the_fast_one() -> None:
    # Truth: G2 0.1 ms per block, G4 20 ms per block (50 MB/s); G4's prior says 1 GB/s.
    m = OnboardCostModel(OnboardCostConfig(block_bytes=BB, prefill_per_token_prior=1e-4))
    assert m.choose([("G2", 4), ("G4", 8)], 0, 1250, BS, 0.0).total_blocks == 12
    now = 0.0
    for i in range(30):
        m.load_submitted(i, {"G2": 4 * BB, "G4": 8 * BB}, now)
        now += 0.0004 + 0.160
        m.load_finished(i, now)
    assert m.tier_bandwidth("G4") == pytest.approx(50e6, rel=0.1)
    assert m.tier_bandwidth("G2") > 1e9
    assert m.choose([("G2", 4), ("G4", 8)], 0, 1250, BS, now).blocks == {"G2": 4, "G3": 0, "G4": 0}


def test_a_load_hides_behind_the_compute_backlog() -> None:
    m = model(bw={"G4": 50e6})  # 20 ms per block against 10 ms of recompute
    assert chosen(m, [("G4", 8)]) == 0
    # 200 ms of other requests' prefill ahead: loading 8 blocks (160 ms) runs beside it
    m.prefill_pending("other", 0, 2000)
    assert m.backlog_seconds() == pytest.approx(0.2)
    assert m.backlog_seconds(exclude="other") == 0.0
    assert m.choose([("G4", 8)], 0, 850, BS, 0.0, backlog_s=m.backlog_seconds()).total_blocks == 8
    # 100 ms ahead: the load hides up to 5 blocks; the 6th to 8th cost more than recomputing
    m.prefill_pending("other", 1000, 2000)
    d = m.choose([("G4", 8)], 0, 850, BS, 0.0, backlog_s=m.backlog_seconds())
    assert d.total_blocks == 5
    assert d.est_ttft_s == pytest.approx(0.100 + 0.035)
    m.prefill_pending("other", 2000, 2000)
    assert m.backlog_seconds() == 0.0


def test_one_stall_does_not_flip_the_decision() -> None:
    m = OnboardCostModel(OnboardCostConfig(block_bytes=BB, prefill_per_token_prior=1e-4))
    now = 0.0
    for i in range(20):  # G2: 1 ms per 8-block job
        m.load_submitted(i, {"G2": 8 * BB}, now)
        now += 0.001
        m.load_finished(i, now)
    m.load_submitted(99, {"G2": 8 * BB}, now)
    now += 1.0  # the machine stalled for a second
    m.load_finished(99, now)
    assert m.choose([("G2", 8)], 0, 850, BS, now).total_blocks == 8
    # a lasting slowdown (a second per job) does show, within a few jobs
    for i in range(100, 110):
        m.load_submitted(i, {"G2": 8 * BB}, now)
        now += 1.0
        m.load_finished(i, now)
    assert m.choose([("G2", 8)], 0, 850, BS, now).total_blocks == 0


def test_short_steps_do_not_teach_a_context_cost() -> None:
    # Full prompts from no context (0.02 ms a token) and, after each load, a 37-token rest at
    # 1536 tokens of context that takes 2.5 ms (the step's own overhead): the rest must not be
    # read as attention cost, or loading the first blocks would look worthless.
    m = model(bw={"G4": 50e6}, weight=0.2)
    now = 0.0
    for i in range(15):
        m.step_started(2 * i, 1573, 1573 * 1573 / 2, now)
        now += 1573 * 2e-5
        m.step_finished(2 * i, now)
        m.step_started(2 * i + 1, 37, 37 * (1536 + 18.5), now)
        now += 0.0025
        m.step_finished(2 * i + 1, now)
    per_token, per_pair = m.prefill.theta
    assert per_token == pytest.approx(2e-5, rel=0.1)
    assert per_pair < 1e-9
    # G2 part (4 blocks, ~free) + G4 part at 20 ms per block against 2 ms of recompute
    assert m.choose([("G2", 4), ("G4", 8)], 0, 1237, BS, now).blocks == {"G2": 4, "G3": 0, "G4": 0}


def test_recompute_estimate_is_calibrated_to_what_recomputes_took() -> None:
    m = model(bw={"G4": 40e6})  # 25 ms per block against 10 ms of recompute
    assert chosen(m, [("G4", 8)]) == 0
    for _ in range(25):  # every recompute took three times its estimate
        m.recompute_observed(0.085 * m.recompute_scale, 3 * 0.085, loading=False)
    assert m.recompute_scale == pytest.approx(3.0, rel=0.1)
    assert m.prefill_seconds(0, 100) == pytest.approx(0.030, rel=0.1)
    assert chosen(m, [("G4", 8)]) == 8  # 25 ms per block now beats 30 ms of recompute


def test_a_step_whose_output_never_came_back_does_not_shift_the_others() -> None:
    # vLLM hands no output back for an idle step with nothing to report: each prefill step
    # (1573 tokens, 60 ms) follows such a step (1 ms). Matched in order, every prefill step would
    # be charged the idle step's time; matched by step id, the prefill is learnt as it ran.
    m = model(weight=0.2)
    now = 0.0
    for i in range(20):
        m.step_started(2 * i, 0, 0.0, now)  # idle: waits for a lookup; never reported
        now += 0.001
        m.step_started(2 * i + 1, 1573, 1573 * 1573 / 2, now)
        now += 0.060
        assert m.step_finished(2 * i + 1, now) == pytest.approx(0.060)
    assert m.prefill_seconds(0, 1573) == pytest.approx(0.060, rel=0.05)
    assert m.step_finished(5, now) is None  # long gone
    assert m.step_finished(99, now) is None  # never planned


def test_each_tier_queues_on_its_own_path() -> None:
    # A second of G4 reads in flight delays a G4 part, not a G2 one: in a burst, loading the G2
    # part and recomputing the rest still beats recomputing everything.
    m = model(bw={"G4": 50e6})  # 20 ms per G4 block against 10 ms of recompute
    m.load_submitted(1, {"G4": 50 * BB}, now=0.0)
    assert m.queue_seconds("G4") == pytest.approx(1.0)
    assert m.queue_seconds("G2") == 0.0
    d = m.choose([("G2", 4), ("G3", 0), ("G4", 8)], 0, 1250, BS, now=0.0)
    assert d.blocks == {"G2": 4, "G3": 0, "G4": 0}
    assert d.est_queue_s == 0.0
    assert d.est_ttft_s == pytest.approx(4 * 0.0001 + 0.085)
    # a job's parts load side by side: it takes as long as its slowest part
    assert m.load_submitted(2, {"G2": 4 * BB, "G4": 8 * BB}, now=0.0) == pytest.approx(0.160)


def test_a_recompute_is_charged_for_the_loads_it_holds_up() -> None:
    # Four 2-block G4 loads in flight (25 ms each: ready at 25, 50, 75, 100 ms). Recomputing 850
    # tokens (85 ms) is this request's fastest choice, but vLLM runs its prefill ahead of those
    # loads' rests, delaying the three that land while it runs by 60 + 35 + 10 ms: 190 ms in all
    # (209 with the margin) against 205 ms for loading behind them, which delays no one.
    m = model(bw={"G4": 80e6})  # 12.5 ms per block against 10 ms of recompute
    assert chosen(m, [("G4", 8)]) == 0
    for job in range(4):
        m.load_submitted(job, {"G4": 2 * BB}, now=0.0)
    d = m.choose([("G4", 8)], 0, 850, BS, now=0.0)
    assert d.total_blocks == 8
    assert d.est_queue_s == pytest.approx(0.100)
    assert d.est_ttft_s == pytest.approx(0.205)
    assert d.est_delay_s == 0.0
    for job in range(4):
        m.load_finished(job, now=0.1)
    assert chosen(m, [("G4", 8)]) == 0


def test_a_load_reported_at_the_end_of_a_long_step_is_not_learnt_slow() -> None:
    # Reports come at step ends. A 1 MB G2 load (1 ms) planned with a 300 ms prefill step comes
    # back with it: all that says is "done within 300 ms". A 1 MB G4 load (50 ms) across 5 ms
    # idle steps is seen to the step.
    m = OnboardCostModel(OnboardCostConfig(block_bytes=BB))
    now, step = 0.0, 0
    for job in range(30):
        m.step_started(step, 2048, 2048 * 1024, now)
        m.load_submitted(job, {"G2": BB}, now)
        now += 0.300
        m.load_finished(job, now)
        m.step_finished(step, now)
        step += 1
    assert m.loads["G2"].predict([1.0, BB]) == pytest.approx(0.0002 + 1e-4)  # still its prior
    for job in range(100, 130):
        m.load_submitted(job, {"G4": BB}, now)
        done = now + 0.050
        while now < done:
            m.step_started(step, 0, 0.0, now)
            now += 0.005
            if now >= done - 1e-9:
                m.load_finished(job, now)
            m.step_finished(step, now)
            step += 1
    assert m.loads["G4"].predict([1.0, BB]) == pytest.approx(0.050, rel=0.15)
    # G2 loads that outlast the steps they were planned in (300 ms, seen past 200 ms) teach that
    # (the first as a lone outlier, clipped; then as a change)
    for job in range(200, 210):
        m.load_submitted(job, {"G2": BB}, now)
        for _ in range(3):
            m.step_started(step, 0, 0.0, now)
            now += 0.1
            m.step_finished(step, now)
            step += 1
        assert m.load_finished(job, now) is not None
    assert m.loads["G2"].predict([1.0, BB]) > 0.1


def test_recompute_with_loads_in_flight_is_calibrated_on_its_own() -> None:
    # On a CPU build the loads take cores from the prefill: recomputes decided while loads were
    # in flight took 4x their estimate, those decided with none took theirs.
    m = model(bw={"G4": 50e6})
    for _ in range(40):
        m.recompute_observed(m.prefill_seconds(0, 850), 0.085, loading=False)
    m.load_submitted(1, {"G4": BB}, now=0.0)
    for _ in range(40):
        m.recompute_observed(m.prefill_seconds(0, 850), 4 * 0.085, loading=True)
    assert m.loading_factor == pytest.approx(4.0, rel=0.05)
    assert m.prefill_seconds(0, 850) == pytest.approx(4 * 0.085, rel=0.05)
    m.load_finished(1, now=0.02)
    assert m.recompute_scale == pytest.approx(1.0)
    assert m.prefill_seconds(0, 850) == pytest.approx(0.085)


def test_queue_counts_the_latency_of_each_load_ahead() -> None:
    # Jobs all of one size leave the fit free to put a job's whole time in its latency (a burst's
    # G4 fit did: 44 ms a job, bandwidth unbounded). Three such loads in flight are 120 ms of
    # queue, not the 0 their bytes at that bandwidth say: recomputing (85 ms, delaying the loads
    # landing at 40 and 80 ms by 45 + 5 ms) beats loading behind them (120 + 40 + 5 ms).
    m = model(bw={"G4": 1e15}, lat={"G4": 0.040})
    assert chosen(m, [("G4", 8)]) == 8  # alone: 40 + 5 ms against 85 ms
    for job in range(3):
        m.load_submitted(job, {"G4": 8 * BB}, now=0.0)
    assert m.queue_seconds("G4") == pytest.approx(0.120)
    d = m.choose([("G4", 8)], 0, 850, BS, now=0.0)
    assert d.total_blocks == 0
    assert d.est_ttft_s == pytest.approx(0.085)
    assert d.est_delay_s == pytest.approx(0.050)
    m.load_finished(0, now=0.04)
    assert m.queued_parts["G4"] == 2
    assert m.queue_seconds("G4") == pytest.approx(0.080)


def test_loads_submitted_one_by_one_are_read_as_if_queued_at_once() -> None:
    """A burst submits a load per decision and reads the loads in flight between them: what each
    new load adds to the loads already read must equal reading them all afresh."""
    rng = random.Random(7)
    parts = [
        {t: rng.choice([0, 1, 3]) * BB for t in TIERS} | {"G4": rng.randint(1, 4) * BB}
        for _ in range(12)
    ]
    spans = [(rng.uniform(0, 0.01), rng.uniform(0.01, 0.05)) for _ in range(20)]
    incremental = model(bw={"G3": 0.5e9, "G4": 0.2e9}, lat={"G4": 0.002})
    for job, p in enumerate(parts):
        incremental.inflight_delay(0.0, 1.0)  # read between submits, as the decisions do
        incremental.load_submitted(job, p, 0.0)
    fresh = model(bw={"G3": 0.5e9, "G4": 0.2e9}, lat={"G4": 0.002})
    for job, p in enumerate(parts):
        fresh.load_submitted(job, p, 0.0)
    got = [incremental.inflight_delay(a, b) for a, b in spans]
    assert got == [fresh.inflight_delay(a, b) for a, b in spans]
    assert any(d > 0 for d in got)
    incremental.load_finished(3, 0.01)
    fresh.load_finished(3, 0.01)
    assert [incremental.inflight_delay(a, b) for a, b in spans] == [
        fresh.inflight_delay(a, b) for a, b in spans
    ]


def scored_lengths(
    m: OnboardCostModel,
    matched: list[tuple[str, int]],
    bw: dict[str, float],
    lat: dict[str, float],
    start: int,
    prompt: int,
    backlog: float,
) -> list[float]:
    """Every length's score from the model's own queries: queue, load, backlog, recompute and
    the delay to the loads in flight, a shorter load's margin included."""
    total = sum(n for _, n in matched)
    out = []
    for k in range(total + 1):
        load, left = 0.0, k
        for t, n in matched:
            take = min(n, left)
            left -= take
            if take:
                load = max(load, m.queue_seconds(t) + lat[t] + take * BB / bw[t])
        wait = max(m.config.bias * load, backlog) if k else backlog
        ttft = wait + m.prefill_seconds((start + k) * BS, prompt)
        delay = m.inflight_delay(wait, ttft) if m.loading else 0.0
        out.append((ttft + delay) * (1.1 if k < total else 1.0))
    return out


def test_with_loads_in_flight_the_choice_is_the_best_of_every_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every length scored from the model's own queries (``scored_lengths``) against
    ``choose``; the shortcut that settles "load all"
    without the candidates must be taken in some cases and give the same answer in all."""
    from kvtier.core import onboard_choice

    taken: list[bool] = []
    real = onboard_choice._load_all_wins

    def spy(*args: object) -> tuple[float, float] | None:
        got = real(*args)  # type: ignore[arg-type]
        taken.append(got is not None)
        return got

    monkeypatch.setattr(onboard_choice, "_load_all_wins", spy)
    rng = random.Random(29)
    for _ in range(300):
        bw = {t: 10 ** rng.uniform(7, 10) for t in TIERS}
        lat = {t: rng.uniform(0, 0.02) for t in TIERS}
        per_token, per_pair = 10 ** rng.uniform(-6, -3), rng.choice([0.0, 1e-8])
        m = model(bw, lat, per_token, per_pair, rng.choice([1.0, rng.uniform(0.5, 2)]))
        for job in range(rng.randint(0, 6)):
            m.load_submitted(job, {t: rng.randint(0, 3) * BB for t in TIERS}, 0.0)
        matched = [(t, rng.randint(0, 6)) for t in TIERS]
        total = sum(n for _, n in matched)
        start, tail = rng.randint(0, 50), rng.randint(1, 99)
        prompt = (start + total) * BS + tail
        backlog = rng.choice([0.0, rng.uniform(0, 0.2)])

        scores = scored_lengths(m, matched, bw, lat, start, prompt, backlog)
        want = max(k for k, s in enumerate(scores) if s <= min(scores) * (1 + 1e-9))
        got = m.choose(matched, start * BS, prompt, BS, now=0.0, backlog_s=backlog)
        assert got.total_blocks == want, (matched, scores)
    assert any(taken) and not all(taken)
