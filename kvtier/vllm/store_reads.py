"""``StoreReads``: the GPU blocks that planned stores may still be reading, by step.

Why this exists: on a GPU a step's stores gather their blocks on the copy engine's own stream,
after the forward pass; a later forward pass that writes one of those blocks before the gather
read it would store the wrong bytes under the block's hash. vLLM writes a GPU block only once it
handed it to a request in a step's schedule (a new request's blocks, a running request's new
blocks, a resumed request's blocks). A finished request's blocks are held back by the delayed
free until its stores released them, so in practice only a preemption hands out a block that a
store may still read. Making every forward pass wait for the last store's gather costs decode
throughput when stores are queued behind PCIe; the scheduler half, which sees every block a step
hands out, tells the workers which steps must wait (``StepPlan.gate_forward``).

Control plane: no torch; a step costs one set lookup per block handed out while any store is
unconfirmed, nothing otherwise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["StoreReads"]


class StoreReads:
    """GPU blocks read by stores planned at steps the workers have not yet confirmed."""

    def __init__(self) -> None:
        self._by_step: deque[tuple[int, list[int]]] = deque()
        self._latest: dict[int, int] = {}  # GPU block -> last step whose stores read it

    def add(self, step: int, gpu_blocks: Iterable[int]) -> None:
        """Step ``step``'s stores read ``gpu_blocks`` (after its forward pass)."""
        blocks = list(gpu_blocks)
        if not blocks:
            return
        if self._by_step and self._by_step[-1][0] >= step:
            raise ValueError(f"steps must increase: {step} after {self._by_step[-1][0]}")
        self._by_step.append((step, blocks))
        latest = self._latest
        for b in blocks:
            latest[b] = step

    def confirm(self, step: int) -> None:
        """The workers finished reading every block of stores planned up to ``step``."""
        by_step, latest = self._by_step, self._latest
        while by_step and by_step[0][0] <= step:
            s, blocks = by_step.popleft()
            for b in blocks:
                if latest.get(b) == s:
                    del latest[b]

    def any_read(self, gpu_blocks: Iterable[int]) -> bool:
        """Whether a store not yet confirmed may still read one of ``gpu_blocks``."""
        latest = self._latest
        return bool(latest) and any(b in latest for b in gpu_blocks)

    def __len__(self) -> int:
        """Blocks still read by unconfirmed stores."""
        return len(self._latest)
