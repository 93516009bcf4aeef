"""Cache sizes larger than the machine or than a float: a clear error naming the knob.

Before: ``cpu_cache_gb`` larger than RAM failed late in the allocator, and ``1e300`` with a raw
``OverflowError`` from ``int(inf)``; neither said which knob was wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.config import KvTierConfig, ModelConfig, blocks_in, physical_memory_bytes
from kvtier.ops.tinymodel import build_tiny_llama
from kvtier.settings import SettingsError, load_settings

RAM = physical_memory_bytes()
MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)


def test_physical_memory_is_known_here() -> None:
    assert RAM is not None and RAM > 1 << 30


@pytest.mark.parametrize("source", ["extra", "KVTIER_CPU_CACHE_GB", "DYN_KVBM_CPU_CACHE_GB"])
def test_1e300_gb_names_the_knob(source: str) -> None:
    extra, env = ({"cpu_cache_gb": 1e300}, {}) if source == "extra" else ({}, {source: "1e300"})
    with pytest.raises(SettingsError, match=r"cpu_cache_gb.*more than any machine holds"):
        load_settings(extra, env)


def test_disk_1e300_gb_names_the_knob() -> None:
    with pytest.raises(SettingsError, match=r"KVTIER_DISK_CACHE_GB \(disk_cache_gb\)"):
        load_settings({"disk_dir": "/tmp/x"}, {"KVTIER_DISK_CACHE_GB": "1e300"})


def test_cpu_cache_larger_than_ram_names_the_knob() -> None:
    assert RAM is not None
    too_big = 2 * RAM / 1e9
    settings = load_settings({"cpu_cache_gb": too_big}, {})
    with pytest.raises(SettingsError, match=r"cpu_cache_gb=.*more than this machine's memory"):
        KvTierConfig.from_settings(settings, MODEL)
    blocks = load_settings({}, {"KVTIER_CPU_CACHE_BLOCKS": str(2 * RAM // MODEL.block_bytes)})
    with pytest.raises(SettingsError, match=r"cpu_cache_blocks=\d+ asks for"):
        KvTierConfig.from_settings(blocks, MODEL)
    # Half the machine is allowed (the check is about impossible sizes, not about policy).
    half = load_settings({"cpu_cache_gb": RAM / 2e9}, {})
    assert half.host_blocks(MODEL.block_bytes) == int(RAM / 2) // MODEL.block_bytes
    assert KvTierConfig.from_settings(half, MODEL).host_blocks == int(RAM / 2) // MODEL.block_bytes


def test_manager_config_refuses_a_g2_larger_than_ram() -> None:
    assert RAM is not None
    with pytest.raises(ValueError, match=r"host_blocks=\d+ .* more than this machine's memory"):
        KvTierConfig(MODEL, host_blocks=2 * RAM // MODEL.block_bytes)
    with pytest.raises(ValueError, match="too large"):
        blocks_in(1e300, MODEL.block_bytes)


SCRIPT = """
import sys
from vllm import LLM
from vllm.config import KVTransferConfig
LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
    kv_cache_memory_bytes=8 << 20, max_model_len=512,
    kv_transfer_config=KVTransferConfig(
        kv_connector="KvTierConnector", kv_connector_module_path="kvtier.vllm",
        kv_role="kv_both", kv_connector_extra_config={"cpu_cache_gb": float(sys.argv[2])}))
print("STARTED")
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_with_cpu_cache_larger_than_ram_fails_naming_the_knob(
    tmp_path: Path,
) -> None:
    assert RAM is not None
    model = build_tiny_llama(tmp_path / "model")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(4 * RAM / 1e9)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "more than this machine's memory" in proc.stderr
    assert "KVTIER_CPU_CACHE_GB" in proc.stderr
