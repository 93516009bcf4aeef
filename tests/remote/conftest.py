"""Fixtures of the G4 tests: real redis-server processes on free localhost ports (one node, a
3-node cluster), started per module and stopped after; skipped with the reason when redis-server
is not installed (``.ci/run`` installs it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.ops.redislocal import LocalRedis, LocalRedisCluster, redis_available
from kvtier.ops.tinymodel import build_tiny_llama


@pytest.fixture(scope="module")
def redis_node() -> Iterator[LocalRedis]:
    reason = redis_available()
    if reason is not None:
        pytest.skip(reason)
    with LocalRedis() as node:
        yield node


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    reason = redis_available()
    if reason is not None:
        pytest.skip(reason)
    with LocalRedisCluster(3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
