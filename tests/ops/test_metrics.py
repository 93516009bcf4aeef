"""Metrics: exact values through the registry, the sliding window, and a real HTTP scrape."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.ops.metrics import KvTierMetrics, SlidingHitRate
from kvtier.ops.metrics_server import MetricsConfig, MetricsServer


class FakeClock:
    """A settable clock, so the window test does not sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def value(m: KvTierMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_transfers_count_blocks_bytes_latency_and_dynamo_names() -> None:
    m = KvTierMetrics()
    m.record_transfer("device_to_host", blocks=3, nbytes=3 * 4096, seconds=0.002)
    m.record_transfer("device_to_host", blocks=2, nbytes=2 * 4096, seconds=0.3)
    m.record_transfer("disk_to_device", blocks=1, nbytes=4096, seconds=0.01)
    assert value(m, "kvtier_blocks_total", path="device_to_host") == 5
    assert value(m, "kvtier_bytes_total", path="device_to_host") == 5 * 4096
    assert value(m, "kvtier_blocks_total", path="host_to_disk") == 0
    assert value(m, "kvtier_transfer_seconds_count", path="device_to_host") == 2
    assert value(m, "kvtier_transfer_seconds_bucket", path="device_to_host", le="0.0025") == 1
    assert value(m, "kvtier_transfer_seconds_bucket", path="device_to_host", le="0.5") == 2
    assert value(m, "kvbm_offload_blocks_d2h_total") == 5
    assert value(m, "kvbm_onboard_blocks_d2d_total") == 1
    assert value(m, "kvbm_offload_blocks_h2d_total") == 0


def test_lookups_matched_tokens_and_hit_rate_window() -> None:
    clock = FakeClock()
    m = KvTierMetrics(hit_rate_window_s=10.0, clock=clock)
    assert value(m, "kvtier_hit_rate", tier="host") == 0.0
    m.record_lookup(looked_up_blocks=4, host_blocks=2, disk_blocks=1, block_size=16)
    assert value(m, "kvtier_lookup_tokens_total") == 64
    assert value(m, "kvtier_matched_tokens_total", tier="host") == 32
    assert value(m, "kvtier_matched_tokens_total", tier="disk") == 16
    assert value(m, "kvbm_matched_tokens") == 48
    assert value(m, "kvtier_hit_rate", tier="host") == 0.5
    assert value(m, "kvbm_disk_cache_hit_rate") == 0.25
    clock.now += 6
    m.record_lookup(looked_up_blocks=4, host_blocks=0, disk_blocks=0, block_size=16)
    assert m.hit_rate("host") == 2 / 8
    clock.now += 5  # the first lookup is now older than 10 s
    assert m.hit_rate("host") == 0.0
    assert value(m, "kvbm_host_cache_hit_rate") == 0.0
    assert value(m, "kvtier_matched_tokens_total", tier="host") == 32  # counters never drop


def test_pool_filter_errors_pinned() -> None:
    m = KvTierMetrics()
    m.set_pool_occupancy("host", in_use=3, inactive=5, free=8)
    m.set_pool_occupancy("host", in_use=1, inactive=7, free=8)
    assert value(m, "kvtier_pool_blocks", tier="host", state="in_use") == 1
    assert value(m, "kvtier_pool_blocks", tier="host", state="inactive") == 7
    assert value(m, "kvtier_pool_blocks", tier="disk", state="free") == 0
    m.record_filter_rejections(4)
    m.record_load_errors("disk", 2)
    m.set_pinned_bytes(1 << 30)
    assert value(m, "kvtier_disk_filter_rejections_total") == 4
    assert value(m, "kvtier_load_errors_total", tier="disk") == 2
    assert value(m, "kvtier_load_errors_total", tier="unknown") == 0
    assert value(m, "kvtier_pinned_bytes") == 1 << 30


def test_many_transfers_at_once_count_as_each_one_would() -> None:
    one, many = KvTierMetrics(), KvTierMetrics()
    batch = [
        ("device_to_host", 1, 0.002),
        ("device_to_host", 1, 0.3),
        ("host_to_device", 4, 0.01),
        ("device_to_host", 2, -0.001),  # a clock step back counts as 0, as in the telemetry
    ]
    for path, blocks, seconds in batch:
        one.record_transfer(path, blocks, blocks * 512, max(0.0, seconds))
    many.record_transfers(iter(batch), 512)
    names = (
        "kvtier_blocks_total",
        "kvtier_bytes_total",
        "kvtier_transfer_seconds_count",
        "kvtier_transfer_seconds_sum",
    )
    for path in ("device_to_host", "host_to_device", "disk_to_device"):
        for name in names:
            assert value(many, name, path=path) == value(one, name, path=path), (name, path)
        for le in ("0.0025", "0.5"):
            bucket = "kvtier_transfer_seconds_bucket"
            assert value(many, bucket, path=path, le=le) == value(one, bucket, path=path, le=le)
    assert value(many, "kvtier_blocks_total", path="device_to_host") == 4
    assert value(many, "kvbm_offload_blocks_d2h_total") == 4
    assert value(many, "kvbm_onboard_blocks_h2d_total") == 4
    with pytest.raises(ValueError, match="unknown path 'h2d'"):
        many.record_transfers([("host_to_device", 1, 0.1), ("h2d", 1, 0.1)], 512)
    with pytest.raises(ValueError, match="blocks must be a non-negative int"):
        many.record_transfers([("host_to_device", True, 0.1)], 512)  # type: ignore[list-item]
    assert value(many, "kvtier_blocks_total", path="host_to_device") == 4  # nothing counted
    assert value(many, "kvtier_transfer_seconds_count", path="host_to_device") == 1


def test_bad_input_names_the_problem_and_changes_nothing() -> None:
    m = KvTierMetrics()
    m.record_transfer("host_to_device", 1, 10, 0.1)
    with pytest.raises(ValueError, match="unknown path 'h2d'"):
        m.record_transfer("h2d", 1, 10, 0.1)
    with pytest.raises(ValueError, match="blocks must be a non-negative int"):
        m.record_transfer("host_to_device", -1, 10, 0.1)
    with pytest.raises(ValueError, match="matched 3\\+2 blocks of only 4"):
        m.record_lookup(4, 3, 2, 16)
    with pytest.raises(ValueError, match="unknown tier 'gpu'"):
        m.set_pool_occupancy("gpu", 1, 1, 1)
    with pytest.raises(ValueError, match="free must be a non-negative int"):
        m.set_pool_occupancy("host", 1, 1, -1)
    assert value(m, "kvtier_blocks_total", path="host_to_device") == 1
    assert value(m, "kvtier_lookup_tokens_total") == 0
    assert value(m, "kvtier_pool_blocks", tier="host", state="in_use") == 0
    with pytest.raises(ValueError, match=r"metrics port must be in 0\.\.65535"):
        MetricsConfig(port=70000)
    with pytest.raises(ValueError, match="window_s must be > 0"):
        SlidingHitRate(0)


def test_two_instances_do_not_share_counters() -> None:
    a, b = KvTierMetrics(), KvTierMetrics()
    a.record_filter_rejections()
    assert value(a, "kvtier_disk_filter_rejections_total") == 1
    assert value(b, "kvtier_disk_filter_rejections_total") == 0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_server_serves_over_http_and_frees_the_port() -> None:
    m = KvTierMetrics()
    m.record_transfer("device_to_host", 7, 700, 0.001)
    server = MetricsServer(m, MetricsConfig(enabled=True, port=0))
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    with server:
        samples = scrape(server.url)
        assert samples[("kvtier_blocks_total", (("path", "device_to_host"),))] == 7
        assert samples[("kvbm_offload_blocks_d2h_total", ())] == 7
        port = server.port
        # The port is taken while serving: a second server fails with a clear error.
        with pytest.raises(OSError, match=f"cannot serve kvtier metrics on 127.0.0.1:{port}"):
            MetricsServer(m, MetricsConfig(enabled=True, port=port)).start()
    with MetricsServer(m, MetricsConfig(enabled=True, port=port)) as again:  # the port is free
        assert scrape(again.url)[("kvtier_bytes_total", (("path", "device_to_host"),))] == 700


def test_record_lookup_tokens_counts_tokens_not_blocks() -> None:
    m = KvTierMetrics()
    m.record_lookup_tokens(looked_up=300, host=128, disk=128)  # partial tail of 44 included
    assert m.hit_rate("host") == pytest.approx(128 / 300)
    with pytest.raises(ValueError, match="of only 10 looked up"):
        m.record_lookup_tokens(10, 8, 8)
    with pytest.raises(ValueError, match="looked_up"):
        m.record_lookup_tokens(-1, 0, 0)
