"""Fixtures of the vLLM end-to-end tests: the tiny model, built offline once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.ops.tinymodel import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
