"""The scheduler half's cost-aware onboarding (``OnboardAdvisor``) fed in vLLM's call order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvtier.core.onboard_cost import OnboardCostConfig
from kvtier.vllm.onboard import OnboardAdvisor

BS = 128
BB = 131072


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def advisor(clock: Clock) -> OnboardAdvisor:
    slow_g4 = {"G2": 10e9, "G3": 2e9, "G4": 1e6}  # 131 ms per block: recompute wins
    return OnboardAdvisor(
        OnboardCostConfig(block_bytes=BB, bandwidth_prior=slow_g4), enabled=True, clock=clock
    )


def test_a_one_token_request_is_measured_though_vllm_forgets_it_first() -> None:
    # vLLM frees a request that finished at its first token (request_finished -> forget) before
    # it hands back that step's connector output (step_done): the TTFT must still be measured,
    # and it calibrates the recompute estimate.
    clock = Clock()
    adv = advisor(clock)
    req = SimpleNamespace(request_id="r1", num_tokens=12 * BS + 37, kv_transfer_params=None)
    assert adv.choose(req, 0, [("G2", 0), ("G3", 0), ("G4", 12)], BS) == 0
    estimated = adv.model.prefill_seconds(0, req.num_tokens)
    adv.step_planned(0, [("r1", 0, req.num_tokens)])
    clock.now = 3 * estimated
    adv.forget("r1")
    adv.step_done(0)
    (est,) = adv.take_estimates()
    assert (est.kind, est.estimated, est.measured) == ("ttft", estimated, 3 * estimated)
    assert adv.model.recompute_scale == pytest.approx(3**0.1)
    # a request forgotten with no step of it in flight leaves nothing behind
    req2 = SimpleNamespace(request_id="r2", num_tokens=req.num_tokens, kv_transfer_params=None)
    assert adv.choose(req2, 0, [("G4", 12)], BS) == 0
    adv.forget("r2")
    adv.step_planned(1, [])
    adv.step_done(1)
    assert adv.take_estimates() == []


def test_steps_are_timed_by_their_own_output() -> None:
    # An idle step (nothing scheduled, nothing to report) never comes back; the prefill step
    # after it is timed from its own plan to its own output.
    clock = Clock()
    adv = advisor(clock)
    adv.step_planned(0, [])
    clock.now = 0.001
    adv.step_planned(1, [("r1", 0, 1573)])
    clock.now = 0.061
    adv.step_done(1)
    assert adv.model.prefill.observations == 1
    # 60 ms learnt, against a prior of 20 us a token (31 ms)
    assert 0.040 < adv.model.prefill.predict([1573.0, 1573.0**2 / 2]) < 0.061
    adv.step_done(0)  # a late or unknown step id is ignored
    assert adv.model.prefill.observations == 1


def request(rid: str, tokens: int = 12 * BS + 37) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, num_tokens=tokens, kv_transfer_params=None)


def test_only_a_lone_recompute_calibrates_the_recompute_estimate() -> None:
    # Three recomputes each reach their first token after 3x their estimate. One shared the step
    # that completed it with another request's prefill, one was decided behind 2000 tokens of
    # others' prefill (more than 1/4 of its own 1573): their times are the others' too, not
    # learnt. The lone one (beside decodes only) moves the recompute estimate.
    clock = Clock()
    adv = advisor(clock)
    n = 12 * BS + 37
    assert adv.choose(request("a"), 0, [("G4", 12)], BS) == 0
    estimated = adv.model.prefill_seconds(0, n)
    assert adv.choose(request("b", 5 * BS), 0, [("G4", 0)], BS) == 0  # came after, nothing hit
    adv.step_planned(0, [("a", 0, n), ("b", 0, 5 * BS)])
    clock.now += 3 * estimated
    adv.step_done(0)
    assert adv.model.recompute_scale == 1.0
    assert adv.choose(request("c", 2000), 0, [("G4", 0)], BS) == 0
    backlog = adv.model.backlog_seconds()
    assert adv.choose(request("d"), 0, [("G4", 12)], BS) == 0
    estimated = adv.model.prefill_seconds(0, n)
    assert backlog > 0.25 * estimated
    adv.step_planned(1, [("c", 0, 2000), ("a", n, 1), ("b", 5 * BS, 1)])
    clock.now += backlog
    adv.step_done(1)
    adv.step_planned(2, [("d", 0, n), ("a", n + 1, 1), ("b", 5 * BS + 1, 1)])
    clock.now += 3 * (backlog + estimated) - backlog  # 3x its estimate since its decision
    adv.step_done(2)
    assert adv.model.recompute_scale == 1.0
    assert [e.kind for e in adv.take_estimates()] == ["ttft", "ttft"]  # both still measured
    assert adv.model.backlog_seconds() == 0.0
    assert adv.choose(request("e"), 0, [("G4", 12)], BS) == 0
    estimated = adv.model.prefill_seconds(0, n)
    adv.step_planned(3, [("e", 0, n), ("a", n + 2, 1), ("b", 5 * BS + 2, 1), ("c", 2000, 1)])
    clock.now += 3 * estimated
    adv.step_done(3)
    assert adv.model.recompute_scale == pytest.approx(3**0.1)


def test_a_load_teaches_the_contention_it_waited_beside_the_backlog() -> None:
    # 1 ms of another request's prefill (50 tokens) ahead; 12 G2 blocks load in 0.36 ms. The
    # loaded request's first token came after its load, half the backlog and its 37-token rest.
    clock = Clock()
    adv = advisor(clock)
    n = 12 * BS + 37
    assert adv.choose(request("o", 50), 0, [("G2", 0)], BS) == 0
    backlog = adv.model.backlog_seconds()
    assert backlog == pytest.approx(0.001)
    assert adv.choose(request("r"), 0, [("G2", 12)], BS) == 12
    adv.allocated("r", 12)
    load = adv.model.loads["G2"].predict([1.0, 12 * BB])
    rest = adv.model.prefill_seconds(12 * BS, n)
    adv.load_planned(0, {"G2": 12})
    adv.step_planned(0, [("o", 0, 50)])
    clock.now = load
    adv.load_done(0)
    adv.step_done(0)
    adv.step_planned(1, [("r", 12 * BS, 37), ("o", 50, 1)])
    clock.now = load + 0.5 * backlog + rest
    adv.step_done(1)
    assert adv.model.contention == pytest.approx(0.1 * 0.5)
    assert adv.model.recompute_scale == 1.0  # a load does not calibrate the recompute
