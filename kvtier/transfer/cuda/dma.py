"""The PCIe half of ``mode="dma"``: runs of pinned host rows, copied to or from a staging slot.

Why a file of its own: which host rows may cross together (consecutive rows inside one pinned
registration), that every row is page-locked (never a silent pageable copy), and how runs are
issued (round-robin over the DMA streams, one ``cuMemcpyBatchAsync`` per stream when
cuda-bindings offers it, else one ``copy_`` per run) are one concern, apart from the device
gather and from the engine's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.storage.host import HostStorage
from kvtier.storage.pinned import ChunkedPinner, PinningError
from kvtier.transfer.cuda.batch import BatchCopier
from kvtier.transfer.cuda.events import new_event

__all__ = ["RowDma", "check_pinned", "host_runs", "join_streams"]


def check_pinned(host: HostStorage, hids: tuple[int, ...], pinner: ChunkedPinner | None) -> None:
    """Raise ``PinningError`` unless every row ``hids`` of ``host`` is page-locked."""
    rows = host.rows
    if pinner is not None:
        pinner.check_rows(hids)
        return
    if host.pin_memory and rows.is_pinned():
        return
    for h in hids:
        if not rows[h].is_pinned():
            raise PinningError(
                f"host row {h} is not page-locked; refusing a pageable copy (allocate the "
                "host storage pinned, or attach the ChunkedPinner that registers it)"
            )


def host_runs(
    host: HostStorage, hids: Sequence[int], offset: int, pinner: ChunkedPinner | None
) -> list[tuple[int, int, int]]:
    """(host row, staging row, count) runs of consecutive rows inside one registration."""
    whole = pinner is None and host.pin_memory
    out: list[tuple[int, int, int]] = []
    j = 0
    while j < len(hids):
        k = j + 1
        if whole or pinner is not None:
            while k < len(hids) and hids[k] == hids[k - 1] + 1:
                k += 1
        if pinner is not None:
            out.extend((r, offset + j + o, c) for r, o, c in pinner.runs(hids[j], k - j))
        else:
            out.append((hids[j], offset + j, k - j))
        j = k
    return out


def join_streams(streams: list[torch.cuda.Stream]) -> None:
    """Make ``streams[0]`` wait for everything enqueued so far on the others."""
    for other in streams[1:]:
        ev = new_event()
        ev.record(other)
        streams[0].wait_event(ev)


class RowDma:
    """Issues runs of host rows <-> staging rows; remembers a refused batch API for good.

    Built with nothing; ``enable_batches()`` (at engine start) loads ``cuMemcpyBatchAsync`` unless
    it failed before. The first refused batch switches to one ``copy_`` per run (``batch_error``
    says why); the refused batch enqueued nothing, so its runs are simply copied again. Both
    directions share one ``RowDma`` from their own threads: ``copy`` reads the batcher once, so the
    other direction switching it off mid-copy never fails a batch.
    """

    def __init__(self) -> None:
        self._batcher: BatchCopier | None = None
        self.batch_error: str | None = None

    def enable_batches(self) -> None:
        if self.batch_error is None:
            self._batcher = BatchCopier.load()

    @property
    def uses_batches(self) -> bool:
        return self._batcher is not None

    def copy(
        self,
        streams: list[torch.cuda.Stream],
        runs: list[tuple[int, int, int]],
        host_rows: torch.Tensor,
        staging: torch.Tensor,
        *,
        to_host: bool,
    ) -> None:
        """One DMA per run, runs dealt round-robin over ``streams``: one ``cuMemcpyBatchAsync``
        per stream when available (``dma_batch``), else one ``copy_`` per run."""
        k = len(streams)
        rb = host_rows.shape[1]
        batcher = self._batcher  # once: the other direction may switch it off meanwhile
        for s_i, stream in enumerate(streams):
            mine = runs[s_i::k]
            if not mine:
                continue
            if batcher is not None:
                hp, sp = host_rows.data_ptr(), staging.data_ptr()
                hs = [hp + h * rb for h, _, _ in mine]
                ss = [sp + j * rb for _, j, _ in mine]
                sizes = [c * rb for _, _, c in mine]
                pair = (hs, ss) if to_host else (ss, hs)
                if batcher.copy(stream, pair[0], pair[1], sizes):
                    continue
                # Refused: it enqueued nothing, so these runs go one ``copy_`` each below, and so
                # do the later streams' runs of this batch and every later batch.
                self.batch_error = batcher.error
                self._batcher = batcher = None
            with torch.cuda.stream(stream):
                for h, j, c in mine:
                    hv = host_rows[h] if c == 1 else host_rows[h : h + c]
                    sv = staging[j] if c == 1 else staging[j : j + c]
                    if to_host:
                        hv.copy_(sv, non_blocking=True)
                    else:
                        sv.copy_(hv, non_blocking=True)
