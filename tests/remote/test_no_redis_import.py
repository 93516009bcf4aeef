"""kvtier and its vLLM connector import on a machine without redis-py (a GPU host with no G4)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import importlib.abc, pkgutil, sys

class NoRedis(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "redis" or name.startswith("redis.") or name == "hiredis":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoRedis())
import kvtier, kvtier.vllm
import kvtier.storage.remote, kvtier.storage.write_behind
failed = []
for pkg in (kvtier.vllm, kvtier.storage):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name == "kvtier.storage.remote_redis":
            continue  # the one module that is redis-py
        try:
            __import__(m.name)
        except ImportError as exc:
            failed.append(f"{m.name}: {exc}")
from kvtier.vllm import KvTierConnector
from kvtier.storage.remote import RemoteConfig, RemoteStore
store = RemoteStore(RemoteConfig("redis://127.0.0.1:1"))  # constructing needs no redis-py
try:
    store.start()
except ModuleNotFoundError as exc:
    started = "redis" in str(exc)
else:
    started = False
print(repr(failed), "redis" in sys.modules, started)
"""


def test_connector_imports_without_redis() -> None:
    out = (
        subprocess.run(
            [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=300
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert out == "[] False True", out
