"""Device -> disk, first stage: copy device blocks into fresh host rows that disk writes read.

Why this exists: a block file is written from host memory (``DiskIo`` on ``os.pwritev``), so a
block that goes from the device straight to disk (no G2 copy to write from) first crosses into
staging rows. The vLLM worker and the transfer manager both stage through this one function; each
then queues the writes (``DiskIo.write``) once the copy landed, in its own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.transfer.copy_api import CopyEngine, CopyHandle

__all__ = ["stage_blocks"]


def stage_blocks(
    engine: CopyEngine,
    device: DeviceStorage,
    device_ids: Sequence[int],
    gate: object | None = None,
    *,
    pin_memory: bool = False,
) -> tuple[HostStorage, CopyHandle]:
    """Rows for ``device_ids`` (row i holds ``device_ids[i]``; page-locked with ``pin_memory``,
    which the CUDA engine needs) and the copy into them, ordered after ``gate``."""
    rows = HostStorage(len(device_ids), device.layout.block_bytes, pin_memory=pin_memory)
    with torch.inference_mode(False):  # the copy thread runs outside vLLM's inference mode
        rows.allocate()
    ids = list(range(len(device_ids)))
    return rows, engine.device_to_host(device, rows, device_ids, ids, gate)
