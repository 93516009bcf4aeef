"""Byte checks in a live engine: what kvtier stored is what the forward pass wrote, and what it
loaded is what it stored.

Why this exists: a greedy output that matches is strong evidence but not proof (a wrong byte may
not flip a token); these compare bytes. ``KvRecorder`` wraps the worker half's ``wait_for_save``
(it runs after the step's forward pass, on the model's stream: the snapshot of each block kvtier
is about to store is taken there, in canonical row form) and ``start_load_kv`` (the device blocks
each load fills, in prefix order: the G2 part, then the G3 part). Used by the MLA tests on CPU
(``tests/vllm/test_e2e_mla.py``) and CUDA (``tests/gpu_vllm/test_gpu_mla.py``).
"""

from __future__ import annotations

from typing import Any

import torch


class KvRecorder:
    """Records the bytes of stored blocks and the device blocks of loads, per request."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.stored: dict[int, torch.Tensor] = {}  # sequence hash -> canonical row (CPU)
        self.loaded: dict[str, list[int]] = {}  # request id -> device blocks, prefix order
        self._orig_save = worker.wait_for_save
        self._orig_load = worker.start_load_kv

    def start(self) -> KvRecorder:
        self.worker.wait_for_save = self._wait_for_save
        self.worker.start_load_kv = self._start_load_kv
        return self

    def stop(self) -> None:
        self.worker.wait_for_save = self._orig_save
        self.worker.start_load_kv = self._orig_load

    def rows(self, blocks: list[int]) -> torch.Tensor:
        """The canonical rows of device ``blocks`` now, ``[len(blocks), block_bytes]`` on CPU."""
        dev = self.worker.plane.device
        idx = torch.tensor(blocks, device=dev.device)
        pieces = []
        for layer in range(dev.layout.model.num_layers):
            view = dev.layer_bytes(layer)
            assert view.dim() == 2, f"{dev.layout.kind}: per-layer byte view is {view.shape}"
            pieces.append(view.index_select(0, idx))
        return torch.cat(pieces, dim=1).cpu()

    def _wait_for_save(self) -> None:
        plan = self.worker._plan
        if plan is not None and plan.stores.gpu_blocks:
            rows = self.rows(list(plan.stores.gpu_blocks))
            for i, h in enumerate(plan.stores.hashes):
                self.stored[h] = rows[i].clone()
        self._orig_save()

    def _start_load_kv(self) -> None:
        plan = self.worker._plan
        if plan is not None:
            for job in plan.loads:
                blocks = self.loaded.setdefault(job.req_id, [])
                blocks.extend([*job.host_gpu_blocks, *job.disk_gpu_blocks])
        self._orig_load()

    def check_stored_in_g2(self, sched: Any, hashes: list[int]) -> int:
        """Every block of ``hashes`` G2 holds is the row the forward pass wrote; returns how many
        were checked."""
        checked = 0
        for i, h in enumerate(hashes):
            slot = sched.host.lookup(h)
            if slot is None:
                continue
            assert h in self.stored, f"block {i} is in G2 but its store was never seen"
            row = self.worker.plane.host.row(slot)
            assert torch.equal(row.cpu(), self.stored[h]), f"G2 row of block {i} differs"
            checked += 1
        return checked

    def check_loaded(self, hashes: list[int], skip: frozenset[int] = frozenset()) -> int:
        """The device blocks of the last load of a prompt with ``hashes`` (the only request with
        loads since ``loaded`` was cleared) hold the rows stored for those hashes; blocks at
        prefix positions in ``skip`` (a load that was meant to fail) are left out. Returns how
        many blocks were compared."""
        assert len(self.loaded) == 1, f"expected the loads of one request, got {self.loaded}"
        (blocks,) = self.loaded.values()
        assert blocks, "nothing was loaded"
        keep = [i for i in range(len(blocks)) if i not in skip]
        now = self.rows([blocks[i] for i in keep])
        for j, i in enumerate(keep):
            assert torch.equal(now[j], self.stored[hashes[i]]), (
                f"device block {blocks[i]} (prompt block {i}) is not the bytes kvtier stored"
            )
        return len(keep)
