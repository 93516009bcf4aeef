"""``CudaCopyConfig``: the CUDA engine's knobs, validated when built.

Why a file of its own: a configuration is built and checked without starting anything, so it
imports nothing from torch or CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CudaCopyConfig"]

_MODES = ("dma", "kernel")
_GATHERS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class CudaCopyConfig:
    """Knobs of the CUDA engine.

    - ``mode``: ``"dma"`` (device gather + large DMAs; default) or ``"kernel"`` (a small-grid
      Triton kernel reading/writing mapped pinned memory, layer by layer).
    - ``gather``: device gather/scatter implementation for ``dma``: ``"triton"``, ``"torch"``
      (indexing ops) or ``"auto"`` (Triton when importable and the geometry is 4-byte aligned).
    - ``staging_bytes``: device staging per direction (two slots of half each).
    - ``kernel_programs``: grid of the mapped-memory kernel (bounds the SMs it takes).
    - ``gather_programs``: grid of the device gather; 0 = one program per SM.
    - ``dma_streams``: DMA streams per direction; runs of host rows alternate between them, so
      one copy engine's per-copy set-up hides behind another's transfer (scattered host rows).
    - ``dma_batch``: issue each stream's runs as one ``cuMemcpyBatchAsync`` (cuda-bindings) when it
      is importable and works; the first failure switches to one ``copy_`` per run for good.
    """

    mode: str = "dma"
    gather: str = "auto"
    staging_bytes: int = 256 << 20
    kernel_programs: int = 16
    gather_programs: int = 0
    dma_streams: int = 2
    dma_batch: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.gather not in _GATHERS:
            raise ValueError(f"gather must be one of {_GATHERS}, got {self.gather!r}")
        for name in ("staging_bytes", "kernel_programs", "dma_streams"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        v = self.gather_programs
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"gather_programs must be an int >= 0, got {v!r}")
        if not isinstance(self.dma_batch, bool):
            raise ValueError(f"dma_batch must be a bool, got {self.dma_batch!r}")
