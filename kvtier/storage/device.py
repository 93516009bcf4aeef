"""G1 device storage: the engine's KV tensors (or kvtier's own), seen as bytes per layer.

Why this exists: copy engines move bytes, not typed values, so every layout is exposed as uint8
views that index a block with one integer. Byte copies are bit-exact for every dtype, fp8 included.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from kvtier.storage.layout import KvLayout, LayoutKind, byte_view

__all__ = ["DeviceStorage"]


class DeviceStorage:
    """The bytes of the G1 tier. Holds references to tensors; allocates only in ``allocate``.

    ``layer_bytes(i)`` is a uint8 view of layer ``i``: ``[num_blocks, layer_block_bytes]`` for
    fully-contiguous and block-first layouts, ``[outer, num_blocks, layer_block_bytes / outer]`` for
    outer-first layouts.
    """

    def __init__(self, layout: KvLayout, tensors: Mapping[str, torch.Tensor] | torch.Tensor):
        self.layout = layout
        self.tensors = tensors
        lbb = layout.layer_block_bytes
        nb = layout.num_blocks
        views: list[torch.Tensor] = []
        if isinstance(tensors, torch.Tensor):
            whole = byte_view(tensors).view(nb, layout.model.num_layers, lbb)
            views = [whole[:, i] for i in range(layout.model.num_layers)]
            self.device = tensors.device
        else:
            for name in layout.layer_names:
                flat = byte_view(tensors[name])
                if layout.kind is LayoutKind.OUTER_FIRST:
                    outer = layout.model.outer_dim
                    views.append(flat.view(outer, nb, lbb // outer))
                else:
                    views.append(flat.view(nb, lbb))
            self.device = tensors[layout.layer_names[0]].device
        self._views = views
        self._numpy: list[np.ndarray] | None = None
        self._bytes: list[memoryview] | None = None

    def numpy_layers(self) -> list[np.ndarray]:
        """CPU only: numpy views of ``layer_bytes(i)`` for every layer, ``[num_blocks, ...]``
        (outer-first layers with their block axis swapped first). Built once: a per-copy
        ``.numpy()`` of every layer cost more than a decode step's memcpy."""
        if self._numpy is None:
            if self.device.type != "cpu":
                raise ValueError(f"numpy views of {self.device} storage")
            outer_first = self.layout.kind is LayoutKind.OUTER_FIRST
            self._numpy = [
                v.numpy().swapaxes(0, 1) if outer_first else v.numpy() for v in self._views
            ]
        return self._numpy

    def byte_layers(self) -> list[memoryview] | None:
        """CPU only: each layer's bytes as one flat memoryview (block ``b`` at
        ``b * layer_block_bytes``), or None unless every layer is one dense block-major region.
        A memoryview slice copy is ~2x cheaper than a numpy one for a single (block, layer)."""
        if self._bytes is None:
            views = self.numpy_layers()
            dense = self.layout.kind is not LayoutKind.OUTER_FIRST and all(
                v.flags.c_contiguous for v in views
            )
            self._bytes = [v.data.cast("B") for v in views] if dense else []
        return self._bytes or None

    @classmethod
    def allocate(cls, model_layout: KvLayout, device: str | torch.device = "cpu") -> DeviceStorage:
        """Allocate zeroed tensors of ``model_layout``'s shape (kvtier's own G1)."""
        m = model_layout.model
        dtype = getattr(torch, m.dtype)
        nb = model_layout.num_blocks
        if model_layout.kind is LayoutKind.FULLY_CONTIGUOUS:
            t = torch.zeros(
                (nb, m.num_layers, *model_layout.interior_shape), dtype=dtype, device=device
            )
            return cls(model_layout, t)
        if model_layout.kind is LayoutKind.BLOCK_FIRST:
            shape = (nb, *model_layout.interior_shape)
        else:
            shape = (model_layout.interior_shape[0], nb, *model_layout.interior_shape[1:])
        tensors = {
            n: torch.zeros(shape, dtype=dtype, device=device) for n in model_layout.layer_names
        }
        return cls(model_layout, tensors)

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """uint8 view of one layer (see the class docstring for its shape)."""
        return self._views[layer]

    def layer_view(self, block_id: int, layer: int) -> torch.Tensor:
        """The engine's own tensor view (its dtype) of one (block, layer): no copy."""
        self._check_id(block_id)
        if isinstance(self.tensors, torch.Tensor):
            return self.tensors[block_id, layer]
        t = self.tensors[self.layout.layer_names[layer]]
        return t[:, block_id] if self.layout.kind is LayoutKind.OUTER_FIRST else t[block_id]

    def block_view(self, block_id: int) -> list[torch.Tensor]:
        """Views of one block, one per layer, in layer order (see ``layer_view``)."""
        return [self.layer_view(block_id, i) for i in range(self.layout.model.num_layers)]

    def read_block(self, block_id: int) -> torch.Tensor:
        """A CPU copy of one block in canonical row form (for checks and tests; not a hot path)."""
        self._check_id(block_id)
        pieces = []
        for v in self._views:
            if self.layout.kind is LayoutKind.OUTER_FIRST:
                pieces.append(v[:, block_id].reshape(-1))
            else:
                pieces.append(v[block_id])
        return torch.cat(pieces).cpu()

    def write_block(self, block_id: int, row: torch.Tensor) -> None:
        """Write one canonical row into a block (for checks and tests; not a hot path)."""
        self._check_id(block_id)
        lbb = self.layout.layer_block_bytes
        if row.dtype != torch.uint8 or row.numel() != self.layout.block_bytes:
            raise ValueError(f"row must be {self.layout.block_bytes} uint8 bytes")
        for i, v in enumerate(self._views):
            piece = row[i * lbb : (i + 1) * lbb].to(v.device)
            if self.layout.kind is LayoutKind.OUTER_FIRST:
                v[:, block_id] = piece.view(v.shape[0], -1)
            else:
                v[block_id] = piece

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.layout.num_blocks:
            raise IndexError(
                f"device block {block_id} out of range 0..{self.layout.num_blocks - 1}"
            )
