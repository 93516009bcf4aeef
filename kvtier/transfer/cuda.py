"""``CudaCopyEngine``: the ``CopyEngine`` protocol on CUDA streams, events and gather kernels.

Why this exists: on a GPU server kvtier's value is how fast it moves KV over PCIe and how little
it disturbs the model. Measured on the lent H200 (benchmarks/transfer_candidates.py, _variants.py,
transfer.py; figures in benchmarks/RESULTS.md): one DMA per (block, layer, K/V) piece reaches
2-3 GB/s; gathering the pieces on the device into a staging buffer of canonical rows and crossing
PCIe as batched DMAs of whole rows reaches 0.84-0.99 of the one-copy limit from 256 blocks on
(0.93-0.99 from 1024), leaves a bf16 matmul stream at full speed, and keeps 0.90-0.97 of the
two-way limit with both directions at once. A small-grid kernel that reads/writes mapped pinned
memory reaches 0.90-0.95 one way but only about 60 GB/s both ways and slows the matmuls by about
10%; it stays available as ``mode="kernel"`` because it lands layers one by one (true layer-wise
onboarding).

How a batch moves (``mode="dma"``, the default), per direction:

- a kernel stream (gather/scatter on the device) and ``dma_streams`` DMA streams; onboarding's
  streams run at the highest stream priority;
- the batch is cut into chunks of at most one staging slot (small first and last chunks); two
  slots alternate, so chunk k+1 is gathered while chunk k crosses PCIe; a slot is reused only
  after the event that freed it;
- one Triton launch moves every layer of a chunk (a table of layer addresses); without Triton, or
  for geometries that are not 4-byte multiples, torch indexing ops do the same;
- device->host: the kernel stream waits on the ``gate`` event (the forward pass or layer that wrote
  the blocks), gathers, and the DMA streams copy runs of consecutive host rows (split where a
  pinned registration ends), one ``cuMemcpyBatchAsync`` per stream and chunk when cuda-bindings
  offers it (``cuda_batch``); ``source_released()`` turns true after the gather, before PCIe;
- host->device: the ``gate`` orders the whole copy (e.g. after pending writes to the target
  blocks); DMA into staging, then the scatter; layer events complete together at the end (use
  ``mode="kernel"`` for layer-by-layer landing);
- block ids reach the device through a pinned ring (``IdRing``): the submit path never allocates
  pinned memory or synchronises a stream, so it never waits on the model;
- completion is polled with ``event.query()``; nothing calls back into the caller's metadata.

Host rows must be page-locked: either the storage was allocated pinned, or a ``ChunkedPinner`` was
attached with ``attach_pinner``. Any other row fails the copy with ``PinningError``; kvtier never
falls back to a pageable copy silently.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.pinned import ChunkedPinner, PinningError
from kvtier.transfer.cuda_batch import BatchCopier
from kvtier.transfer.cuda_ids import IdRing
from kvtier.transfer.cuda_plan import (
    Segment,
    segments_of,
    torch_gather,
    torch_scatter,
    triton_available,
)
from kvtier.transfer.engine import SubmittingEngine, check_ids, copy_failure

__all__ = ["CudaCopyConfig", "CudaCopyEngine", "CudaCopyHandle", "chunk_bounds"]


def _new_event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def _query(event: torch.cuda.Event) -> bool:
    return bool(event.query())  # type: ignore[no-untyped-call]


def _stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]


def _record(events: Sequence[torch.cuda.Event] | None, upto: int, through: int) -> int:
    """Record ``events[upto..through]`` on the current stream; returns the next to record."""
    if events is not None:
        while upto <= through:
            events[upto].record()
            upto += 1
    return upto


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


def chunk_bounds(n: int, slot_rows: int) -> list[tuple[int, int]]:
    """Split ``n`` rows into chunks of at most ``slot_rows``, the first and last ones small.

    The device gather of the first chunk delays the first DMA, and the device scatter of the last
    chunk runs after the last DMA: an eighth of a slot at both ends shortens those bubbles.
    """
    small = max(1, slot_rows // 8)
    if n <= small:
        return [(0, n)]
    bounds = [(0, small)]
    start = small
    while start < n:
        end = min(n, start + slot_rows)
        if end == n and end - start > small:
            bounds += [(start, end - small), (end - small, end)]
        else:
            bounds.append((start, end))
        start = end
    return bounds


class CudaCopyHandle:
    """Completion of one batch: per-layer CUDA events, polled with ``query()``.

    Until the batch is enqueued (a ``threading.Event`` gate not yet set) nothing is done. After a
    failure every layer reports done and ``error`` says why. ``source_released()`` tells when the
    source blocks may be overwritten (device->host: after the device gather, well before PCIe).
    """

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._enqueued = threading.Event()
        self._layer_events: list[torch.cuda.Event] = []
        self._released: torch.cuda.Event | None = None
        self._error: BaseException | None = None
        self._keep: list[Any] = []  # tensors the GPU still reads; dropped once done
        self.submitted_at = time.perf_counter()

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _set(
        self, layer_events: list[torch.cuda.Event], released: torch.cuda.Event, keep: list[Any]
    ) -> None:
        self._layer_events = layer_events
        self._released = released
        self._keep = keep
        self._enqueued.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._enqueued.set()

    def layer_done(self, layer: int) -> bool:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self._num_layers - 1}")
        if self._error is not None:
            return True
        if not self._enqueued.is_set():
            return False
        return bool(_query(self._layer_events[layer]))

    def done(self) -> bool:
        if self._error is not None:
            return True
        if not self._enqueued.is_set() or not _query(self._layer_events[-1]):
            return False
        self._keep = []
        return True

    def source_released(self) -> bool:
        if self._error is not None:
            return True
        return self._released is not None and bool(_query(self._released))

    def _wait_event(self, ev_of: Any, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.perf_counter() + timeout
        if not self._enqueued.wait(timeout):
            return False
        if self._error is not None:
            return True
        ev: torch.cuda.Event = ev_of()
        if deadline is None:
            ev.synchronize()
            return True
        pause = 20e-6
        while not _query(ev):
            if time.perf_counter() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    def wait(self, timeout: float | None = None) -> BaseException | None:
        if not self._wait_event(lambda: self._layer_events[-1], timeout):
            raise TimeoutError(f"copy not finished after {timeout} s")
        self.done()
        return self._error

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self._num_layers - 1}")
        if not self._wait_event(lambda: self._layer_events[layer], timeout):
            raise TimeoutError(f"layer {layer} not landed after {timeout} s")
        return self._error is None

    def stream_wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: current) wait for layer ``layer`` without blocking the CPU.

        This is how attention on a compute stream is gated on an onboard; it blocks the CPU only
        until the batch is enqueued (a threading gate).
        """
        self._enqueued.wait()
        if self._error is not None:
            raise self._error
        s = stream if stream is not None else torch.cuda.current_stream()
        s.wait_event(self._layer_events[layer])


@dataclass
class _Lane:
    """One direction's streams, staging slots and the events that free them."""

    kernel_stream: torch.cuda.Stream
    dma_streams: list[torch.cuda.Stream]
    lock: threading.Lock
    ids: IdRing
    staging: torch.Tensor | None = None  # [2, slot_rows, row_bytes] uint8 on the device
    slot_rows: int = 0
    slot_free: list[torch.cuda.Event | None] | None = None
    next_slot: int = 0

    def drain(self) -> None:
        """Block until everything enqueued on this lane's streams has run."""
        self.kernel_stream.synchronize()
        for ds in self.dma_streams:
            ds.synchronize()


class CudaCopyEngine(SubmittingEngine):
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
        self._lanes: dict[bool, _Lane] = {}
        self._pinners: dict[int, ChunkedPinner] = {}
        self._segments: dict[int, tuple[DeviceStorage, list[Segment] | None]] = {}
        self._tables: dict[tuple[int, bool], tuple[DeviceStorage, torch.Tensor | None]] = {}
        self._table_error: str | None = None
        self._batcher: BatchCopier | None = None
        self._batch_error: str | None = None
        self._waiters: list[tuple[threading.Thread, CudaCopyHandle]] = []
        self._closing = threading.Event()
        self._started = False
        self._use_triton = False
        self._sm_count = 0

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
        self._use_triton = want_triton and triton_available()
        if not self._use_triton and (
            self.config.mode == "kernel" or self.config.gather == "triton"
        ):
            raise RuntimeError(
                "CudaCopyConfig asks for Triton kernels but triton is not importable"
            )
        # (least, greatest) priority; a lower number runs first.
        high = int(torch.cuda.Stream.priority_range()[1])  # type: ignore[call-arg]
        with torch.cuda.device(dev):
            self._sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
            k = self.config.dma_streams
            self._lanes = {
                True: _Lane(
                    _stream(dev), [_stream(dev) for _ in range(k)], threading.Lock(), IdRing(dev)
                ),
                False: _Lane(
                    _stream(dev, high),
                    [_stream(dev, high) for _ in range(k)],
                    threading.Lock(),
                    IdRing(dev),
                ),
            }
            for lane in self._lanes.values():
                lane.ids.reserve()
        if self.config.dma_batch and self._batch_error is None:
            self._batcher = BatchCopier.load()
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
        self._segments.clear()
        self._tables.clear()
        self._started = False

    def __enter__(self) -> CudaCopyEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach_pinner(self, host: HostStorage, pinner: ChunkedPinner) -> None:
        """Declare that ``host``'s rows are page-locked by ``pinner`` (rows below its progress)."""
        if pinner.rows.data_ptr() != host.rows.data_ptr() or pinner.total_rows != host.num_blocks:
            raise ValueError("the pinner does not cover this host storage's rows")
        self._pinners[host.rows.data_ptr()] = pinner

    @property
    def batch_error(self) -> str | None:
        """Why ``cuMemcpyBatchAsync`` is not in use after a failure (None: in use or not asked)."""
        return self._batch_error

    @property
    def uses_batch_copies(self) -> bool:
        """Whether runs of host rows cross PCIe as ``cuMemcpyBatchAsync`` batches."""
        return self._batcher is not None

    @property
    def uses_triton(self) -> bool:
        """Whether gathers/scatters run as Triton kernels (False: torch indexing ops)."""
        return self._use_triton

    # -- submission (the protocol's two verbs are SubmittingEngine's) -----------------------

    def _submit(
        self,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        device_ids: Sequence[int],
        host_ids: Sequence[int],
        gate: object | None,
    ) -> CudaCopyHandle:
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
                ev = _new_event()
                ev.record(self._lanes[to_host].kernel_stream)
            handle._set([ev] * handle.num_layers, ev, [])
            return handle
        if isinstance(gate, threading.Event) and not gate.is_set():
            t = threading.Thread(
                target=self._after_gate,
                args=(gate, to_host, device, host, dids, hids, handle),
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
        self._enqueue(to_host, device, host, dids, hids, gate, handle)
        return handle

    def _after_gate(
        self,
        gate: threading.Event,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        dids: tuple[int, ...],
        hids: tuple[int, ...],
        handle: CudaCopyHandle,
    ) -> None:
        while not gate.wait(0.05):
            if self._closing.is_set():
                return
        self._enqueue(to_host, device, host, dids, hids, None, handle)

    def _enqueue(
        self,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        dids: tuple[int, ...],
        hids: tuple[int, ...],
        gate: torch.cuda.Event | None,
        handle: CudaCopyHandle,
    ) -> None:
        lane = self._lanes[to_host]
        try:
            self._check_pinned(host, hids)
            with lane.lock, torch.cuda.device(self.device):
                if self.config.mode == "kernel" and self._segs(device) is not None:
                    self._enqueue_kernel(lane, to_host, device, host, dids, hids, gate, handle)
                else:
                    self._enqueue_dma(lane, to_host, device, host, dids, hids, gate, handle)
        except Exception as exc:
            # Let whatever was enqueued drain so that a failed handle means "nothing moves".
            lane.drain()
            handle._fail(copy_failure(to_host, dids, hids, exc))

    def _check_pinned(self, host: HostStorage, hids: tuple[int, ...]) -> None:
        rows = host.rows
        pinner = self._pinners.get(rows.data_ptr())
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

    def _segs(self, device: DeviceStorage) -> list[Segment] | None:
        hit = self._segments.get(id(device))
        if hit is None or hit[0] is not device:
            hit = (device, segments_of(device) if self._use_triton else None)
            self._segments[id(device)] = hit
        return hit[1]

    def _host_runs(
        self, host: HostStorage, hids: Sequence[int], offset: int
    ) -> list[tuple[int, int, int]]:
        """(host row, staging row, count) runs of consecutive rows inside one registration."""
        pinner = self._pinners.get(host.rows.data_ptr())
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

    def _staging(self, lane: _Lane, row_bytes: int) -> tuple[torch.Tensor, int]:
        if lane.staging is None or lane.staging.shape[2] != row_bytes:
            if lane.staging is not None:
                lane.drain()
            rows = max(1, self.config.staging_bytes // 2 // row_bytes)
            lane.staging = torch.empty((2, rows, row_bytes), dtype=torch.uint8, device=self.device)
            lane.slot_rows = rows
            lane.slot_free = [None, None]
            lane.next_slot = 0
        return lane.staging, lane.slot_rows

    def _move_rows(
        self,
        device: DeviceStorage,
        idx: torch.Tensor,
        staging_slot: torch.Tensor,
        *,
        to_rows: bool,
        layer_events: list[torch.cuda.Event] | None,
    ) -> None:
        """Gather (to_rows) or scatter blocks ``idx`` <-> the first rows of a staging slot."""
        segs = self._segs(device)
        last_layer = device.layout.model.num_layers - 1
        if segs is None:
            (torch_gather if to_rows else torch_scatter)(device, idx, staging_slot)
            _record(layer_events, 0, last_layer)
            return
        from kvtier.transfer.cuda_kernels import launch_segment, launch_segments

        n = idx.numel()
        ar = torch.arange(n, dtype=torch.int64, device=self.device)
        rows_w = staging_slot.view(-1).view(torch.int32)
        row_words = staging_slot.shape[1] // 4
        programs = self.config.gather_programs or self._sm_count
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
                self._table_error = repr(exc)
                self._tables.clear()
            else:
                _record(layer_events, 0, last_layer)
                return
        done_upto = 0
        for seg in segs:
            launch_segment(seg, rows_w, row_words, idx, ar, to_rows=to_rows, programs=programs)
            done_upto = _record(layer_events, done_upto, seg.last_layer)

    def _table(
        self, device: DeviceStorage, segs: list[Segment], lane_key: bool
    ) -> torch.Tensor | None:
        """Device addresses of ``segs`` for the one-launch kernel, or None when it does not fit
        (unequal strides, or the kernel failed to compile once).

        Built on the current (lane) stream with fill kernels, not an H2D copy: a pageable copy
        would synchronise the stream, and a pinned one could stall the whole device. Each lane
        has its own table, so it is only ever read on the stream that wrote it.
        """
        if self._table_error is not None:
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

    def _enqueue_dma(
        self,
        lane: _Lane,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        dids: tuple[int, ...],
        hids: tuple[int, ...],
        gate: torch.cuda.Event | None,
        handle: CudaCopyHandle,
    ) -> None:
        staging, slot_rows = self._staging(lane, host.block_bytes)
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
        layer_events = [_new_event() for _ in range(nl)]
        released = _new_event()
        n = len(dids)
        for start, end in chunk_bounds(n, slot_rows):
            last = end == n
            slot = lane.next_slot
            lane.next_slot ^= 1
            stg = staging[slot]
            free = lane.slot_free[slot]
            idx = didx_all[start:end]
            runs = self._host_runs(host, hids[start:end], 0)
            if to_host:
                if free is not None:
                    ks.wait_event(free)
                with torch.cuda.stream(ks):
                    self._move_rows(device, idx, stg, to_rows=True, layer_events=None)
                    gathered = _new_event()
                    gathered.record()
                    if last:
                        released.record()
                for d in dss:
                    d.wait_event(gathered)
                self._dma(dss, runs, host.rows, stg, to_host=True)
                self._join(dss)
                with torch.cuda.stream(ds):
                    freed = _new_event()
                    freed.record()
                    if last:
                        _record(layer_events, 0, nl - 1)
            else:
                if free is not None:
                    for d in dss:
                        d.wait_event(free)
                self._dma(dss, runs, host.rows, stg, to_host=False)
                self._join(dss)
                with torch.cuda.stream(ds):
                    landed = _new_event()
                    landed.record()
                    if last:
                        released.record()
                ks.wait_event(landed)
                with torch.cuda.stream(ks):
                    self._move_rows(
                        device, idx, stg, to_rows=False, layer_events=layer_events if last else None
                    )
                    freed = _new_event()
                    freed.record()
            lane.slot_free[slot] = freed
        handle._set(layer_events, released, keep)

    def _dma(
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
        for s_i, stream in enumerate(streams):
            mine = runs[s_i::k]
            if not mine:
                continue
            if self._batcher is not None:
                hp, sp = host_rows.data_ptr(), staging.data_ptr()
                hs = [hp + h * rb for h, _, _ in mine]
                ss = [sp + j * rb for _, j, _ in mine]
                sizes = [c * rb for _, _, c in mine]
                pair = (hs, ss) if to_host else (ss, hs)
                if self._batcher.copy(stream, pair[0], pair[1], sizes):
                    continue
                self._batch_error = self._batcher.error
                self._batcher = None
            with torch.cuda.stream(stream):
                for h, j, c in mine:
                    hv = host_rows[h] if c == 1 else host_rows[h : h + c]
                    sv = staging[j] if c == 1 else staging[j : j + c]
                    if to_host:
                        hv.copy_(sv, non_blocking=True)
                    else:
                        sv.copy_(hv, non_blocking=True)

    @staticmethod
    def _join(streams: list[torch.cuda.Stream]) -> None:
        """Make ``streams[0]`` wait for everything enqueued so far on the others."""
        for other in streams[1:]:
            ev = _new_event()
            ev.record(other)
            streams[0].wait_event(ev)

    def _enqueue_kernel(
        self,
        lane: _Lane,
        to_host: bool,
        device: DeviceStorage,
        host: HostStorage,
        dids: tuple[int, ...],
        hids: tuple[int, ...],
        gate: torch.cuda.Event | None,
        handle: CudaCopyHandle,
    ) -> None:
        from kvtier.transfer.cuda_kernels import launch_segment

        segs = self._segs(device)
        assert segs is not None
        ks = lane.kernel_stream
        didx = lane.ids.upload(dids, ks)
        hidx = lane.ids.upload(hids, ks)
        if gate is not None:
            ks.wait_event(gate)
        layer_events = [_new_event() for _ in range(handle.num_layers)]
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
                done_upto = _record(layer_events, done_upto, seg.last_layer)
        released = layer_events[-1]
        handle._set(layer_events, released, [])
