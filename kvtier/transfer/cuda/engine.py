"""``CudaCopyEngine``: life cycle of the CUDA copy engine and the order of events on its streams.

The package docstring (``kvtier/transfer/cuda/__init__.py``) is the overview: how a batch moves.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch

from kvtier.lifecycle import Lifecycle
from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.pinned import ChunkedPinner
from kvtier.transfer.copy_api import CopyBatch, CopyEngine, check_ids, copy_failure
from kvtier.transfer.cuda.config import CudaCopyConfig
from kvtier.transfer.cuda.dma import RowDma, check_pinned, host_runs, join_streams
from kvtier.transfer.cuda.events import new_event, new_stream, record_through
from kvtier.transfer.cuda.gather import DeviceGather
from kvtier.transfer.cuda.handle import CudaCopyHandle
from kvtier.transfer.cuda.ids import IdRing
from kvtier.transfer.cuda.lane import Lane, chunk_bounds
from kvtier.transfer.cuda.plan import triton_available

__all__ = ["CudaCopyConfig", "CudaCopyEngine", "CudaCopyHandle", "chunk_bounds"]


class _Batch(NamedTuple):
    """One submitted batch, validated, on its way to a lane."""

    to_host: bool
    device: DeviceStorage
    host: HostStorage
    dids: tuple[int, ...]
    hids: tuple[int, ...]
    handle: CudaCopyHandle


class CudaCopyEngine(CopyEngine, Lifecycle):
    """``CopyEngine`` for device tensors on a CUDA GPU (see the module docstring).

    The constructor only validates and records; ``start()`` creates streams; ``close()`` waits for
    every enqueued copy, fails those whose threading gate never opened, and frees staging.
    """

    def __init__(
        self, config: CudaCopyConfig | None = None, *, device: torch.device | str | None = None
    ) -> None:
        self.config = config or CudaCopyConfig()
        self._device_arg = device
        self.device: torch.device | None = None
        self._lanes: dict[bool, Lane] = {}
        self._pinners: dict[int, ChunkedPinner] = {}
        self._gather = DeviceGather()
        self._row_dma = RowDma()
        self._waiters: list[tuple[threading.Thread, CudaCopyHandle]] = []
        self._closing = threading.Event()
        self._started = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("CudaCopyEngine needs a CUDA GPU; use TorchCopyEngine on CPU")
        dev = torch.device(self._device_arg if self._device_arg is not None else "cuda")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        want_triton = self.config.mode == "kernel" or self.config.gather in ("auto", "triton")
        use_triton = want_triton and triton_available()
        if not use_triton and (self.config.mode == "kernel" or self.config.gather == "triton"):
            raise RuntimeError(
                "CudaCopyConfig asks for Triton kernels but triton is not importable"
            )
        # (least, greatest) priority; a lower number runs first.
        high = int(torch.cuda.Stream.priority_range()[1])  # type: ignore[call-arg]
        with torch.cuda.device(dev):
            sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
            k = self.config.dma_streams
            self._lanes = {
                True: Lane(
                    new_stream(dev),
                    [new_stream(dev) for _ in range(k)],
                    threading.Lock(),
                    IdRing(dev),
                ),
                False: Lane(
                    new_stream(dev, high),
                    [new_stream(dev, high) for _ in range(k)],
                    threading.Lock(),
                    IdRing(dev),
                ),
            }
            for lane in self._lanes.values():
                lane.ids.reserve()
        self._gather.configure(
            dev, use_triton=use_triton, programs=self.config.gather_programs or sm_count
        )
        if self.config.dma_batch:
            self._row_dma.enable_batches()
        self._closing.clear()
        self._started = True

    def close(self) -> None:
        if not self._started:
            return
        self._closing.set()
        for thread, handle in self._waiters:
            thread.join(timeout=0.5)
            if thread.is_alive() or not handle._enqueued.is_set():
                handle._fail(RuntimeError("copy engine closed before the gate opened"))
        self._waiters.clear()
        for lane in self._lanes.values():
            lane.drain()
        self._lanes = {}
        self._gather.clear()
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def attach_pinner(self, host: HostStorage, pinner: ChunkedPinner) -> None:
        """Declare that ``host``'s rows are page-locked by ``pinner`` (rows below its progress)."""
        if pinner.rows.data_ptr() != host.rows.data_ptr() or pinner.total_rows != host.num_blocks:
            raise ValueError("the pinner does not cover this host storage's rows")
        self._pinners[host.rows.data_ptr()] = pinner

    @property
    def batch_error(self) -> str | None:
        """Why ``cuMemcpyBatchAsync`` is not in use after a failure (None: in use or not asked)."""
        return self._row_dma.batch_error

    @property
    def uses_batch_copies(self) -> bool:
        """Whether runs of host rows cross PCIe as ``cuMemcpyBatchAsync`` batches."""
        return self._row_dma.uses_batches

    # -- submission (the protocol's two verbs are CopyEngine's) -----------------------------

    def _submit(self, copy: CopyBatch) -> CudaCopyHandle:
        to_host, device, host, device_ids, host_ids, gate = copy
        if not self._started:
            raise RuntimeError("CudaCopyEngine is not started")
        check_ids(device, host, device_ids, host_ids)
        if device.device.type != "cuda" or device.device != self.device:
            raise ValueError(
                f"device storage lives on {device.device}, this engine on {self.device}"
            )
        if len(set(device_ids if not to_host else host_ids)) != len(device_ids):
            raise ValueError("a target block id appears twice in one batch")
        handle = CudaCopyHandle(device.layout.model.num_layers)
        dids, hids = tuple(int(d) for d in device_ids), tuple(int(h) for h in host_ids)
        if not dids:
            with torch.cuda.device(self.device):
                ev = new_event()
                ev.record(self._lanes[to_host].kernel_stream)
            handle._set([ev] * handle.num_layers, ev, [])
            return handle
        batch = _Batch(to_host, device, host, dids, hids, handle)
        if isinstance(gate, threading.Event) and not gate.is_set():
            t = threading.Thread(
                target=self._after_gate,
                args=(gate, batch),
                name="kvtier-cuda-gate",
                daemon=True,
            )
            self._waiters = [(w, h) for w, h in self._waiters if w.is_alive()]
            self._waiters.append((t, handle))
            t.start()
            return handle
        if isinstance(gate, threading.Event):
            gate = None
        elif gate is not None and not isinstance(gate, torch.cuda.Event):
            raise TypeError(
                f"gate must be None, a threading.Event or a torch.cuda.Event, got {type(gate)}"
            )
        self._enqueue(batch, gate)
        return handle

    def _after_gate(self, gate: threading.Event, batch: _Batch) -> None:
        while not gate.wait(0.05):
            if self._closing.is_set():
                return
        self._enqueue(batch, None)

    def _enqueue(self, batch: _Batch, gate: torch.cuda.Event | None) -> None:
        lane = self._lanes[batch.to_host]
        try:
            check_pinned(batch.host, batch.hids, self._pinners.get(batch.host.rows.data_ptr()))
            with lane.lock, torch.cuda.device(self.device):
                if self.config.mode == "kernel" and self._gather.segments(batch.device) is not None:
                    self._enqueue_kernel(lane, batch, gate)
                else:
                    self._enqueue_dma(lane, batch, gate)
        except Exception as exc:
            # Let whatever was enqueued drain so that a failed handle means "nothing moves".
            lane.drain()
            batch.handle._fail(copy_failure(batch.to_host, batch.dids, batch.hids, exc))

    def _enqueue_dma(self, lane: Lane, batch: _Batch, gate: torch.cuda.Event | None) -> None:
        to_host, device, host, dids, hids, handle = batch
        staging, slot_rows = lane.staging_slots(
            host.block_bytes, self.config.staging_bytes, self.device
        )
        assert lane.slot_free is not None
        ks, dss = lane.kernel_stream, lane.dma_streams
        ds = dss[0]  # joins the others before it records anything that frees a slot
        nl = handle.num_layers
        keep: list[Any] = []
        didx_all = lane.ids.upload(dids, ks)  # before the gate: the upload never waits on it
        if gate is not None:
            ks.wait_event(gate)
            for d in dss:
                d.wait_event(gate)
        # Device->host: every layer lands with the last DMA, so the event that frees the last
        # slot stands for all of them (one event per layer cost ~3 us of host time each).
        layer_events = [] if to_host else [new_event() for _ in range(nl)]
        released: torch.cuda.Event | None = None  # the last chunk's gather / DMA (n >= 1)
        pinner = self._pinners.get(host.rows.data_ptr())
        n = len(dids)
        for start, end in chunk_bounds(n, slot_rows):
            last = end == n
            slot = lane.next_slot
            lane.next_slot ^= 1
            stg = staging[slot]
            free = lane.slot_free[slot]
            idx = didx_all[start:end]
            runs = host_runs(host, hids[start:end], 0, pinner)
            if to_host:
                if free is not None:
                    ks.wait_event(free)
                with torch.cuda.stream(ks):
                    self._gather.move_rows(device, idx, stg, to_rows=True, layer_events=None)
                    gathered = new_event()
                    gathered.record()
                if last:
                    released = gathered
                for d in dss:
                    d.wait_event(gathered)
                self._row_dma.copy(dss, runs, host.rows, stg, to_host=True)
                join_streams(dss)
                with torch.cuda.stream(ds):
                    freed = new_event()
                    freed.record()
                if last:
                    layer_events = [freed] * nl
            else:
                if free is not None:
                    for d in dss:
                        d.wait_event(free)
                self._row_dma.copy(dss, runs, host.rows, stg, to_host=False)
                join_streams(dss)
                with torch.cuda.stream(ds):
                    landed = new_event()
                    landed.record()
                if last:
                    released = landed
                ks.wait_event(landed)
                with torch.cuda.stream(ks):
                    self._gather.move_rows(
                        device, idx, stg, to_rows=False, layer_events=layer_events if last else None
                    )
                    freed = new_event()
                    freed.record()
            lane.slot_free[slot] = freed
        assert released is not None
        handle._set(layer_events, released, keep)

    def _enqueue_kernel(self, lane: Lane, batch: _Batch, gate: torch.cuda.Event | None) -> None:
        to_host, device, host, dids, hids, handle = batch
        from kvtier.transfer.cuda.kernels import launch_segment

        segs = self._gather.segments(device)
        assert segs is not None
        ks = lane.kernel_stream
        didx = lane.ids.upload(dids, ks)
        hidx = lane.ids.upload(hids, ks)
        if gate is not None:
            ks.wait_event(gate)
        layer_events = [new_event() for _ in range(handle.num_layers)]
        rows_w = host.rows.view(-1).view(torch.int32)
        row_words = host.block_bytes // 4
        with torch.cuda.stream(ks):
            done_upto = 0
            for seg in segs:
                launch_segment(
                    seg,
                    rows_w,
                    row_words,
                    didx,
                    hidx,
                    to_rows=to_host,
                    programs=self.config.kernel_programs,
                )
                done_upto = record_through(layer_events, done_upto, seg.last_layer)
        released = layer_events[-1]
        handle._set(layer_events, released, [])
