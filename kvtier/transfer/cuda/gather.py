"""Device gather/scatter between engine blocks and a staging slot of canonical rows.

Why a file of its own: this is the device half of ``mode="dma"``. With Triton, every layer of a
chunk moves in one launch driven by a table of layer addresses (when all layers share strides),
else one launch per segment; without Triton, or for geometries that are not 4-byte multiples,
torch indexing ops do the same (``plan.torch_move``). Per-storage
segment lists and per-lane address tables are cached here; ``clear()`` drops them.
"""

from __future__ import annotations

import torch

from kvtier.storage.device import DeviceStorage
from kvtier.transfer.cuda.events import record_through
from kvtier.transfer.cuda.plan import Segment, segments_of, torch_move

__all__ = ["DeviceGather"]


class DeviceGather:
    """Moves blocks <-> staging rows on the current stream (see the module docstring).

    Built with nothing; ``configure`` (at engine start) says whether Triton is used, on which
    device, and with how many programs. A table kernel that fails to compile once is not tried
    again (``table_error`` says why); per-segment launches take over.
    """

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.use_triton = False
        self.programs = 0
        self.table_error: str | None = None
        self._segments: dict[int, tuple[DeviceStorage, list[Segment] | None]] = {}
        self._tables: dict[tuple[int, bool], tuple[DeviceStorage, torch.Tensor | None]] = {}

    def configure(self, device: torch.device, *, use_triton: bool, programs: int) -> None:
        self.device = device
        self.use_triton = use_triton
        self.programs = programs

    def clear(self) -> None:
        self._segments.clear()
        self._tables.clear()

    def segments(self, device: DeviceStorage) -> list[Segment] | None:
        """``device``'s segments when Triton kernels move them, else None (torch ops)."""
        hit = self._segments.get(id(device))
        if hit is None or hit[0] is not device:
            hit = (device, segments_of(device) if self.use_triton else None)
            self._segments[id(device)] = hit
        return hit[1]

    def move_rows(
        self,
        device: DeviceStorage,
        idx: torch.Tensor,
        staging_slot: torch.Tensor,
        *,
        to_rows: bool,
        layer_events: list[torch.cuda.Event] | None,
    ) -> None:
        """Gather (to_rows) or scatter blocks ``idx`` <-> the first rows of a staging slot."""
        segs = self.segments(device)
        last_layer = device.layout.model.num_layers - 1
        if segs is None:
            torch_move(device, idx, staging_slot, to_rows=to_rows)
            record_through(layer_events, 0, last_layer)
            return
        from kvtier.transfer.cuda.kernels import launch_segment, launch_segments

        n = idx.numel()
        ar = torch.arange(n, dtype=torch.int64, device=self.device)
        rows_w = staging_slot.view(-1).view(torch.int32)
        row_words = staging_slot.shape[1] // 4
        programs = self.programs
        table = self._table(device, segs, to_rows)
        if table is not None:
            try:
                step = segs[1].row_offset if len(segs) > 1 else 0
                launch_segments(
                    table,
                    segs,
                    step,
                    rows_w,
                    row_words,
                    idx,
                    ar,
                    to_rows=to_rows,
                    programs=programs,
                )
            except Exception as exc:  # a Triton that cannot compile it: per-layer launches
                self.table_error = repr(exc)
                self._tables.clear()
            else:
                record_through(layer_events, 0, last_layer)
                return
        done_upto = 0
        for seg in segs:
            launch_segment(seg, rows_w, row_words, idx, ar, to_rows=to_rows, programs=programs)
            done_upto = record_through(layer_events, done_upto, seg.last_layer)

    def _table(
        self, device: DeviceStorage, segs: list[Segment], lane_key: bool
    ) -> torch.Tensor | None:
        """Device addresses of ``segs`` for the one-launch kernel, or None when it does not fit
        (unequal strides, or the kernel failed to compile once).

        Built on the current (lane) stream with fill kernels, not an H2D copy: a pageable copy
        would synchronise the stream, and a pinned one could stall the whole device. Each lane
        has its own table, so it is only ever read on the stream that wrote it.
        """
        if self.table_error is not None:
            return None
        key = (id(device), lane_key)
        hit = self._tables.get(key)
        if hit is not None and hit[0] is device:
            return hit[1]
        s0 = segs[0]
        step = segs[1].row_offset if len(segs) > 1 else 0
        fits = all(
            (s.block_stride, s.outer_stride, s.n_outer, s.chunk, s.row_offset, s.base)
            == (s0.block_stride, s0.outer_stride, s0.n_outer, s0.chunk, k * step, 0)
            for k, s in enumerate(segs)
        )
        table = None
        if fits:
            table = torch.empty(len(segs), dtype=torch.int64, device=self.device)
            for k, sg in enumerate(segs):
                table[k].fill_(sg.tensor.data_ptr())
        self._tables[key] = (device, table)
        return table
