"""Importing (and using) the control plane must not import torch: it runs in the scheduler."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import pkgutil, sys
sys.modules["torch"] = None  # blocked: any import of torch raises ImportError
import kvtier, kvtier.hashing, kvtier.core, kvtier.plan
import kvtier.config, kvtier.settings, kvtier.vllm.scheduler
mods = [m.name for m in pkgutil.walk_packages(kvtier.core.__path__, "kvtier.core.")]
plan = [m.name for m in pkgutil.walk_packages(kvtier.plan.__path__, "kvtier.plan.")]
for name in mods + plan:
    __import__(name)
from kvtier.core import BlockPool
from kvtier.hashing import SequenceHashes
pool = BlockPool(4)
(b,) = pool.allocate(1)
b.mark_complete()
seq = SequenceHashes(16)
seq.advance(list(range(16)), 16)
pool.register(b, seq.hashes[0]).release()
from kvtier.plan.planner import G2, PlannerConfig, TierPlanner
planner = TierPlanner(PlannerConfig(host_blocks=2, disk_blocks=0))
planner.store(7, None)
planner.store_reported(G2, 7, ok=True)
assert planner.match([7], 0, 1) == (1, 1)
print(len(mods), len(plan), sys.modules["torch"] is not None)
"""


def test_control_plane_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert int(out[0]) >= 6  # block, errors, filter, free_slots, pool, registry, ...
    assert int(out[1]) >= 4  # counters, planner, restore, slots
    assert out[2] == "False"
