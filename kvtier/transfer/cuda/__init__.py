"""The CUDA copy engine: the ``CopyEngine`` protocol on CUDA streams, events and gather kernels.

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
  offers it (``batch``); ``source_released()`` turns true after the gather, before PCIe;
- host->device: the ``gate`` orders the whole copy (e.g. after pending writes to the target
  blocks); DMA into staging, then the scatter; layer events complete together at the end (use
  ``mode="kernel"`` for layer-by-layer landing);
- block ids reach the device through a pinned ring (``IdRing``): the submit path never allocates
  pinned memory or synchronises a stream, so it never waits on the model;
- completion is polled with ``event.query()``; nothing calls back into the caller's metadata.

Host rows must be page-locked: either the storage was allocated pinned, or a ``ChunkedPinner`` was
attached with ``attach_pinner``. Any other row fails the copy with ``PinningError``; kvtier never
falls back to a pageable copy silently.

Modules: ``engine`` (``CudaCopyEngine``: life cycle and the order of events on its streams),
``config`` (knobs, no torch), ``handle`` (the polled handle), ``lane`` (a direction's streams and
staging slots, ``chunk_bounds``), ``gather`` (device gather/scatter), ``dma`` (pinned host-row runs
over PCIe), ``events`` (typed event/stream calls), ``ids`` (the pinned id ring), ``plan`` /
``kernels`` (segments and Triton kernels), ``batch`` (``cuMemcpyBatchAsync``). Disk -> device runs
on this engine through the engine-generic ``kvtier.transfer.disk_load.DiskToDeviceLoader``.

Importing this package imports no torch; the names below load their module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.transfer.cuda.config import CudaCopyConfig
    from kvtier.transfer.cuda.engine import CudaCopyEngine
    from kvtier.transfer.cuda.handle import CudaCopyHandle
    from kvtier.transfer.cuda.lane import chunk_bounds

__all__ = ["CudaCopyConfig", "CudaCopyEngine", "CudaCopyHandle", "chunk_bounds"]

_HOMES = {
    "CudaCopyConfig": "kvtier.transfer.cuda.config",
    "CudaCopyEngine": "kvtier.transfer.cuda.engine",
    "CudaCopyHandle": "kvtier.transfer.cuda.handle",
    "chunk_bounds": "kvtier.transfer.cuda.lane",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kvtier.transfer.cuda' has no attribute {name!r}")
