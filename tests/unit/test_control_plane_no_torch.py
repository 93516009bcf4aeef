"""Importing (and using) the control plane must not import torch: it runs in the scheduler."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import pkgutil, sys
import kvtier, kvtier.hashing, kvtier.tokens, kvtier.core
mods = [m.name for m in pkgutil.walk_packages(kvtier.core.__path__, "kvtier.core.")]
for name in mods:
    __import__(name)
from kvtier.core import BlockPool
from kvtier.tokens import TokenBlockSequence
pool = BlockPool(4)
(b,) = pool.allocate(1)
b.mark_complete()
pool.register(b, TokenBlockSequence(list(range(16)), block_size=16).sequence_hashes()[0]).release()
print(len(mods), "torch" in sys.modules)
"""


def test_control_plane_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert int(out[0]) >= 6  # block, errors, filter, free_slots, offload, pool, registry
    assert out[1] == "False"
