"""A bad kvtier knob stops a real vLLM engine at start, with a message naming the knob."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import sys
from vllm import LLM
from vllm.config import KVTransferConfig
LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
    kv_cache_memory_bytes=8 << 20, max_model_len=512,
    kv_transfer_config=KVTransferConfig(
        kv_connector="KvTierConnector", kv_connector_module_path="kvtier.vllm",
        kv_role="kv_both", kv_connector_extra_config={"cpu_cache_gb": 1}))
print("STARTED")
"""


def test_bad_env_value_is_refused_at_start(tiny_model: Path) -> None:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", DYN_KVBM_DISK_CACHE_GB="a lot")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "STARTED" not in proc.stdout
    assert "bad value for DYN_KVBM_DISK_CACHE_GB (disk_cache_gb)" in proc.stderr
