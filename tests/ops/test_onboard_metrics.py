"""Metrics of cost-aware onboarding: values land under their labels; bad input is refused."""

from __future__ import annotations

import pytest

from kvtier.ops.metrics import KvTierMetrics


def value(m: KvTierMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_onboard_metrics() -> None:
    m = KvTierMetrics()
    assert value(m, "kvtier_onboard_tokens_total", tier="remote", decision="skipped") == 0
    m.record_onboard_tokens("remote", loaded=256, skipped=1024)
    m.record_onboard_tokens("host", loaded=512, skipped=0)
    assert value(m, "kvtier_onboard_tokens_total", tier="remote", decision="loaded") == 256
    assert value(m, "kvtier_onboard_tokens_total", tier="remote", decision="skipped") == 1024
    assert value(m, "kvtier_onboard_tokens_total", tier="host", decision="loaded") == 512
    m.record_onboard_estimate("ttft", estimated=0.010, measured=0.030)
    assert value(m, "kvtier_onboard_seconds_sum", kind="ttft", source="estimated") == 0.010
    assert value(m, "kvtier_onboard_seconds_sum", kind="ttft", source="measured") == 0.030
    m.set_onboard_model("remote", bandwidth=50e6, latency=0.002, queued_bytes=1 << 20)
    assert value(m, "kvtier_onboard_bandwidth_bytes_per_second", tier="remote") == 50e6
    assert value(m, "kvtier_onboard_queued_bytes", tier="remote") == 1 << 20
    m.set_onboard_prefill(2e-5)
    assert value(m, "kvtier_onboard_prefill_seconds_per_token") == 2e-5


def test_onboard_metrics_refuse_bad_input() -> None:
    m = KvTierMetrics()
    with pytest.raises(ValueError, match="unknown tier 'G4'"):
        m.record_onboard_tokens("G4", 1, 1)
    with pytest.raises(ValueError, match="skipped must be a non-negative int"):
        m.record_onboard_tokens("disk", 1, -1)
    with pytest.raises(ValueError, match="unknown kind 'prefill'"):
        m.record_onboard_estimate("prefill", 0.1, 0.1)
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        m.record_onboard_estimate("load", -0.1, 0.1)
    assert value(m, "kvtier_onboard_tokens_total", tier="disk", decision="loaded") == 0
