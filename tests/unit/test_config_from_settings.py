"""``KvTierConfig.from_settings``: the one configuration root built from the knobs, and the
connector's scheduler config derived from it. No torch, no vLLM."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from kvtier.config import KvTierConfig, ModelConfig, physical_memory_bytes
from kvtier.settings import KvTierSettings, SettingsError, load_settings
from kvtier.vllm.scheduler import SchedulerConfig

MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)
BB = MODEL.block_bytes  # 16384


def _cfg(
    extra: Mapping[str, object],
    env: dict[str, str] | None = None,
    *,
    num_workers: int = 1,
    rank: int = 0,
    on_cuda: bool = False,
    async_scheduling: bool = False,
) -> KvTierConfig:
    return KvTierConfig.from_settings(
        load_settings(extra, env or {}),
        MODEL,
        num_workers=num_workers,
        rank=rank,
        on_cuda=on_cuda,
        async_scheduling=async_scheduling,
    )


def test_defaults_build_no_tier() -> None:
    cfg = _cfg({})
    assert (cfg.host_blocks, cfg.disk_blocks, cfg.disk_dir, cfg.remote) == (0, 0, None, None)
    assert (cfg.rank, cfg.num_workers, cfg.device, cfg.model) == (0, 1, "cpu", MODEL)
    assert cfg.disk_filter and cfg.disk_o_direct and not cfg.layerwise_onboard


def test_tier_sizes_from_gb() -> None:
    cfg = _cfg({"cpu_cache_gb": 0.5, "disk_cache_gb": 2, "disk_dir": "/d"})
    assert cfg.host_blocks == 500_000_000 // BB == 30517
    assert cfg.disk_blocks == 2_000_000_000 // BB


def test_block_counts_override_gb_from_any_source() -> None:
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "5", "KVTIER_DISK_CACHE_BLOCKS": "7"}
    cfg = _cfg({"cpu_cache_gb": 4, "disk_cache_gb": 100, "disk_dir": "/d"}, env)
    assert (cfg.host_blocks, cfg.disk_blocks) == (5, 7)


def test_disk_dir_is_per_rank_with_several_ranks() -> None:
    extra = {"disk_cache_blocks": 8, "disk_dir": "/d"}
    assert _cfg(extra).disk_dir == "/d"
    assert _cfg(extra, num_workers=1, rank=0).disk_dir == "/d"
    assert _cfg(extra, num_workers=2, rank=0).disk_dir == "/d/rank0"
    two = _cfg(extra, num_workers=2, rank=1)
    assert (two.disk_dir, two.rank, two.num_workers) == ("/d/rank1", 1, 2)
    assert _cfg({"cpu_cache_blocks": 2}, num_workers=4, rank=3).disk_dir is None


def test_flags_and_runtime_facts() -> None:
    env = {"DYN_KVBM_DISK_DISABLE_O_DIRECT": "1", "KVTIER_LAYERWISE_ONBOARD": "on"}
    extra = {"disk_filter": False, "onboard_cost_aware": True, "onboard_cost_bias": 2.5}
    cfg = _cfg(extra, env, on_cuda=True, async_scheduling=True)
    assert cfg.disk_o_direct is False and cfg.disk_filter is False
    assert cfg.layerwise_onboard is True and cfg.onboard_cost_aware is True
    assert (cfg.onboard_cost.bias, cfg.onboard_cost.block_bytes) == (2.5, BB)
    assert cfg.device == "cuda" and cfg.async_scheduling


def test_remote_tier_from_the_knobs() -> None:
    env = {"KVTIER_REMOTE_TTL_S": "60", "KVTIER_REMOTE_MAX_WRITE_QUEUE_MB": "64"}
    cfg = _cfg({"remote_url": "redis://h:1/0", "remote_password": "pw"}, env)
    assert cfg.remote is not None
    assert (cfg.remote.url, cfg.remote.password, cfg.remote.ttl_s) == ("redis://h:1/0", "pw", 60)
    assert cfg.remote.timeout_ms == 100 and cfg.remote_write_queue_bytes == 64_000_000


def test_scheduler_config_is_derived() -> None:
    extra = {"cpu_cache_blocks": 3, "disk_cache_blocks": 9, "disk_dir": "/d"}
    extra |= {"disk_filter": False, "layerwise_onboard": True}
    cpu = SchedulerConfig.from_config(_cfg(extra, num_workers=2))
    assert cpu == SchedulerConfig(
        block_size=16,
        host_blocks=3,
        disk_blocks=9,
        disk_filter=False,
        layerwise_onboard=True,
        num_workers=2,
    )
    gpu = SchedulerConfig.from_config(_cfg(extra, on_cuda=True, async_scheduling=True))
    assert gpu.async_store_reads and gpu.pinned_host_rows and not gpu.layerwise_disk


def test_a_g2_larger_than_ram_names_the_knob_as_given() -> None:
    ram = physical_memory_bytes()
    assert ram is not None
    with pytest.raises(SettingsError, match=r"cpu_cache_gb=.* more than this machine's memory"):
        _cfg({"cpu_cache_gb": 2 * ram / 1e9})
    with pytest.raises(SettingsError, match=r"KVTIER_CPU_CACHE_BLOCKS"):
        _cfg({}, {"KVTIER_CPU_CACHE_BLOCKS": str(2 * ram // BB)})


def test_a_refused_value_names_the_knob() -> None:
    # A settings object built by hand skips the parsers: the config's rule still names the knob.
    with pytest.raises(SettingsError, match=r"io_threads=0 is refused: .*KVTIER_IO_THREADS"):
        KvTierConfig.from_settings(KvTierSettings(io_threads=0), MODEL)
    # A fact read from vLLM is no knob: a plain ValueError naming the field.
    with pytest.raises(ValueError, match="rank") as err:
        _cfg({}, num_workers=2, rank=2)
    assert not isinstance(err.value, SettingsError)
