"""Real vLLM (CPU build), in-process engine: cost-aware onboarding never changes the output.

The same prompt comes back from G2 after ``reset_prefix_cache`` with every kind of decision:
everything loaded, nothing loaded, a first part loaded (forced through the per-request
``kv_transfer_params`` override) and whatever the cost model picks. vLLM recomputes what kvtier
does not load, so the greedy output must equal the cold run's each time, and vLLM's cached-token
count must show exactly the length that was chosen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import BLOCK, connectors, drain, engine, prompt, reset_g1

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCKS = 6


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Any]:
    extra = {"cpu_cache_blocks": 64, "onboard_cost_aware": True}
    with engine(tiny_model, extra, in_process=True) as llm:
        yield llm


def run(llm: Any, tokens: list[int], params: dict[str, Any] | None) -> tuple[list[int], int]:
    from vllm import SamplingParams

    sp = SamplingParams(
        temperature=0,
        max_tokens=8,
        detokenize=False,
        ignore_eos=True,
        extra_args={"kv_transfer_params": params} if params is not None else None,
    )
    (out,) = llm.generate([{"prompt_token_ids": tokens}], sp, use_tqdm=False)
    drain(llm)
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)


def test_outputs_identical_whatever_is_loaded(llm: Any) -> None:
    tokens = prompt(13, BLOCKS * BLOCK + 40)
    cold, cached = run(llm, tokens, None)
    assert cached == 0
    sched, _ = connectors(llm)
    onboard = sched.scheduler.onboard
    cases: list[tuple[dict[str, Any] | None, int | None]] = [
        ({"kvtier_onboard": "load"}, BLOCKS),
        ({"kvtier_load_tokens": 2 * BLOCK + 5}, 2),  # a first part only, rounded down
        ({"kvtier_onboard": "recompute"}, 0),
        ({"kvtier_onboard": "load", "kvtier_load_tokens": 4 * BLOCK}, 4),
        ({"kvtier_onboard": "bogus"}, None),  # ignored with a warning: the model decides
        (None, None),
    ]
    for params, want_blocks in cases:
        reset_g1(llm)
        before = dict(onboard.counters.loaded_tokens)
        out, cached = run(llm, tokens, params)
        assert out == cold, params
        loaded = onboard.counters.loaded_tokens["G2"] - before["G2"]
        assert cached == loaded, params
        if want_blocks is not None:
            assert loaded == want_blocks * BLOCK, params
    c = onboard.counters
    assert c.skipped_tokens["G2"] >= (BLOCKS - 2) * BLOCK + BLOCKS * BLOCK + 2 * BLOCK
    assert c.partial_loads >= 2
    assert c.overrides == 4  # the bogus mode is ignored, not an override
    reg = sched.telemetry.metrics.registry
    for decision, want in (("loaded", c.loaded_tokens["G2"]), ("skipped", c.skipped_tokens["G2"])):
        got = reg.get_sample_value(
            "kvtier_onboard_tokens_total", {"tier": "host", "decision": decision}
        )
        assert got == want
    assert reg.get_sample_value(
        "kvtier_onboard_seconds_count", {"kind": "load", "source": "measured"}
    )
    # the cost model has measured G2 loads and the engine's steps by now
    assert onboard.model.loads["G2"].observations >= 3
    assert onboard.model.prefill.observations >= 4  # steps of 256+ tokens
    sched.scheduler.check_invariants()
