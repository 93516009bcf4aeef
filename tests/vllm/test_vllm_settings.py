"""kvtier.settings: every knob from kv_connector_extra_config, KVTIER_* and DYN_KVBM_* names."""

from __future__ import annotations

from dataclasses import fields

import pytest

from kvtier.settings import KNOBS, KvTierSettings, SettingsError, load_settings


def test_defaults() -> None:
    s = load_settings({}, {})
    assert s == KvTierSettings()
    assert (s.host_blocks(1000), s.disk_blocks(1000)) == (0, 0)
    assert s.load_failure_policy == "recompute" and s.disk_filter and s.disk_o_direct


def test_documented_load_string() -> None:
    s = load_settings({"cpu_cache_gb": 4, "disk_cache_gb": 100, "disk_dir": "/path"}, {})
    assert (s.cpu_cache_gb, s.disk_cache_gb, s.disk_dir) == (4.0, 100.0, "/path")
    assert s.host_blocks(131072) == 4_000_000_000 // 131072 == 30517
    assert s.disk_blocks(131072) == 100_000_000_000 // 131072


def test_kvtier_env_names() -> None:
    env = {"KVTIER_CPU_CACHE_GB": "0.5", "KVTIER_DISK_CACHE_GB": "2", "KVTIER_DISK_DIR": "/d"}
    s = load_settings(None, env)
    assert (s.cpu_cache_gb, s.disk_cache_gb, s.disk_dir) == (0.5, 2.0, "/d")


def test_dynamo_fallbacks_including_inverted_switches() -> None:
    env = {
        "DYN_KVBM_CPU_CACHE_GB": "3",
        "DYN_KVBM_DISK_CACHE_GB": "7",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "11",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "13",
        "DYN_KVBM_DISK_CACHE_DIR": "/dyn",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "1",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
    }
    s = load_settings({}, env)
    assert (s.cpu_cache_gb, s.disk_cache_gb) == (3.0, 7.0)
    assert (s.host_blocks(10**9), s.disk_blocks(10**9)) == (11, 13)  # blocks override GB
    assert s.disk_dir == "/dyn"
    assert s.disk_o_direct is False and s.disk_filter is False


def test_precedence_extra_then_kvtier_then_dynamo() -> None:
    env = {"KVTIER_CPU_CACHE_GB": "2", "DYN_KVBM_CPU_CACHE_GB": "3"}
    assert load_settings({}, env).cpu_cache_gb == 2.0
    assert load_settings({"cpu_cache_gb": 1}, env).cpu_cache_gb == 1.0
    assert load_settings({}, {"DYN_KVBM_CPU_CACHE_GB": "3"}).cpu_cache_gb == 3.0
    # an empty variable counts as unset
    assert (
        load_settings({}, {"KVTIER_CPU_CACHE_GB": "", "DYN_KVBM_CPU_CACHE_GB": "3"}).cpu_cache_gb
        == 3.0
    )


def test_blocks_override_gb_across_sources() -> None:
    s = load_settings({"cpu_cache_gb": 4}, {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "5"})
    assert s.host_blocks(1) == 5


@pytest.mark.parametrize(
    ("extra", "env", "names"),
    [
        ({"cpu_cache_gb": "lots"}, {}, "kv_connector_extra_config['cpu_cache_gb']"),
        ({}, {"KVTIER_DISK_CACHE_GB": "-1"}, "KVTIER_DISK_CACHE_GB"),
        ({}, {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "1.5"}, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM"),
        ({}, {"DYN_KVBM_DISK_DISABLE_O_DIRECT": "maybe"}, "DYN_KVBM_DISK_DISABLE_O_DIRECT"),
        ({"load_failure_policy": "ignore"}, {}, "load_failure_policy"),
        ({"io_threads": 0}, {}, "io_threads"),
        ({"cpu_cache_gb": float("nan")}, {}, "cpu_cache_gb"),
        ({"disk_dir": ""}, {}, "disk_dir"),
    ],
)
def test_bad_values_name_the_knob(
    extra: dict[str, object], env: dict[str, str], names: str
) -> None:
    with pytest.raises(SettingsError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_settings(extra, env)


def test_unknown_extra_key_is_refused() -> None:
    with pytest.raises(SettingsError, match="cpu_cache_gbs"):
        load_settings({"cpu_cache_gbs": 4}, {})


def test_disk_size_without_dir_is_refused() -> None:
    with pytest.raises(SettingsError, match="disk_dir"):
        load_settings({"disk_cache_gb": 1}, {})
    assert load_settings({"disk_cache_blocks": 0}, {}).disk_blocks(1) == 0


def test_every_knob_is_documented_and_unique() -> None:
    assert sorted(k.field for k in KNOBS) == sorted(f.name for f in fields(KvTierSettings))
    assert len({k.env for k in KNOBS}) == len(KNOBS)
    assert len({k.extra_key for k in KNOBS}) == len(KNOBS)
    assert all(k.env.startswith("KVTIER_") and k.doc for k in KNOBS)
    assert {k.dynamo_env for k in KNOBS if k.dynamo_env} >= {
        "DYN_KVBM_CPU_CACHE_GB",
        "DYN_KVBM_DISK_CACHE_GB",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
        "DYN_KVBM_DISK_CACHE_DIR",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER",
    }
