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


def test_each_decision_logs_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    adv = advisor(Clock())
    req = SimpleNamespace(request_id="r7", num_tokens=12 * BS + 5, kv_transfer_params=None)
    with caplog.at_level("DEBUG", logger="kvtier.vllm.onboard"):
        assert adv.choose(req, 0, [("G2", 3), ("G4", 9)], BS) == 3
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("kvtier onboard: request r7 matched {'G2': 3, 'G4': 9} blocks")
    assert "load 3 (est ttft" in line and "recompute all" in line
    caplog.clear()
    with caplog.at_level("INFO", logger="kvtier.vllm.onboard"):
        adv.choose(req, 0, [("G2", 3), ("G4", 9)], BS)
    assert caplog.records == []
