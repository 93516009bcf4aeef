"""Real vLLM (CPU build), default multi-process engine (scheduler and worker in other processes).

Loaded with the exact documented load string (``cpu_cache_gb``/``disk_cache_gb``/``disk_dir``).
Shows: a new engine process over a disk directory written by an earlier engine hits G3 and gives
identical greedy outputs (persistence across restarts); G2 hits after ``reset_prefix_cache``; 32
concurrent requests with shared and private prefixes and decode, identical when served by kvtier.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_engine_helpers import BLOCK, drain, engine, generate, prompt, reset_g1

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PERSISTED = [prompt(30 + i, 3 * BLOCK + 11 * i + 1) for i in range(4)]


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("g3-shared")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, disk_dir: Path) -> list[tuple[list[int], int]]:
    """Outputs of an earlier, in-process engine that wrote every block to ``disk_dir``."""
    extra = {
        "cpu_cache_blocks": 4,
        "disk_cache_gb": 1,
        "disk_dir": str(disk_dir),
        "disk_filter": False,
    }
    with engine(tiny_model, extra, in_process=True) as llm:
        out = generate(llm, PERSISTED, max_tokens=12)
        drain(llm)
    assert len(list(disk_dir.glob("*/*.kvb"))) == 4 * 3
    return out


@pytest.fixture(scope="module")
def llm(tiny_model: Path, disk_dir: Path, reference: Any) -> Iterator[Any]:
    extra = {"cpu_cache_gb": 4, "disk_cache_gb": 100, "disk_dir": str(disk_dir)}
    with engine(tiny_model, extra, in_process=False) as llm:
        yield llm


def test_new_engine_process_hits_g3(llm: Any, reference: list[tuple[list[int], int]]) -> None:
    out = generate(llm, PERSISTED, max_tokens=12)
    assert [o for o, _ in out] == [o for o, _ in reference]
    assert [c for _, c in reference] == [0, 0, 0, 0]
    assert [c for _, c in out] == [3 * BLOCK] * 4


def test_g2_hits_in_multiprocess_engine(llm: Any) -> None:
    p = prompt(40, 4 * BLOCK + 77)
    [(first, cached0)] = generate(llm, [p], max_tokens=16)
    reset_g1(llm)
    [(again, cached1)] = generate(llm, [p], max_tokens=16)
    assert cached0 == 0
    assert (again, cached1) == (first, 4 * BLOCK)


def test_32_concurrent_in_multiprocess_engine(llm: Any) -> None:
    shared = [prompt(300 + g, 2 * BLOCK) for g in range(4)]
    prompts = [shared[i % 4] + prompt(400 + i, BLOCK + (i * 17) % 100 + 10) for i in range(32)]
    first = generate(llm, prompts, max_tokens=20)
    reset_g1(llm)
    again = generate(llm, prompts, max_tokens=20)
    assert [o for o, _ in again] == [o for o, _ in first]
    assert [c for _, c in again] == [((len(p) - 1) // BLOCK) * BLOCK for p in prompts]
