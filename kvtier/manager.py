"""``KvBlockManager``: the one facade over the G1/G2/G3 tiers and the transfers between them.

Why this exists: an engine integration (the vLLM connector, a benchmark, a demo) should not wire
pools, storages, copy engines and queues together itself. It builds one ``KvBlockManager`` from one
``KvTierConfig``, registers its KV tensors, and then only offloads, matches, onboards and polls.

Threading rule: every method here is called from ONE thread (the owner's). Copies and disk I/O run
on worker threads, but their results reach the pools only inside ``poll()`` on the owner's thread,
so the control-plane metadata needs no locks. The only thread-safe calls are the data-level waits
on a handle (``TransferHandle.wait_layer`` / ``wait_data``), which layer-wise onboarding uses
from the forward pass.

Life cycle: ``KvBlockManager(config)`` (no side effects) -> ``register_device_kv(tensors)`` (or let
``start()`` allocate ``config.device_blocks`` itself) -> ``start()`` -> offload / match / onboard /
poll ... -> ``close()``. Also a context manager.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

import torch

from kvtier.config import KvTierConfig
from kvtier.storage.layout import KvLayout, LayoutKind
from kvtier.transfer.engine import CopyEngine

__all__ = ["KvBlockManager"]


class KvBlockManager:
    """Tiered KV block manager: G1 device, G2 host, G3 disk, with polled asynchronous transfers.

    Public surface (all on the owner's thread unless noted):

    - ``register_device_kv(tensors, kind=None) -> KvLayout``: adopt the engine's G1 tensors (one
      tensor = fully contiguous, dict layer_name -> tensor = layer-separate; layout detected).
    - ``start()`` / ``close()`` / ``with``.
    - ``layout``, ``device_pool``, ``host_pool``, ``disk_pool`` (None when a tier is absent).
    - ``offload(device_block_ids, sequence_hashes, *, parent_sequence_hashes=None, priority=0,
      gate=None) -> TransferHandle``: copy device blocks to G2 (or G3 when there is no G2) and
      register them there when the copy lands. Blocks the target already holds, or that do not fit
      because the target is full of blocks in use, are skipped (``handle.skipped``).
    - ``match(sequence_hashes) -> TierMatch``: the longest prefix held by G2, then G3 from where G2
      stopped; holds a reference on every matched block until released or onboarded.
    - ``onboard(match, device_block_ids, *, gate=None) -> TransferHandle``: copy a match (or its
      first ``len(device_block_ids)`` blocks) into the given device blocks; takes over the match's
      references and releases them when the handle finishes. ``handle.wait_layer(l)`` (thread-safe)
      returns when layer ``l`` landed (layer-wise onboarding).
    - ``poll() -> list[TransferHandle]``: progress the queues, apply finished transfers to the
      pools (register offloaded blocks, roll back failed ones, release onboard refs, queue the
      G2 -> G3 cascade); returns the handles that finished in this call.
    - ``wait(handle, timeout=None)`` / ``wait_all(timeout=None)``: poll until finished.
    - ``stats() -> KvTierStats``: blocks, bytes, seconds and failures per path; hits and misses for
      G2 and G3.
    - ``drain_events()``: the registry's Store/Remove events since the last call.
    """

    def __init__(self, config: KvTierConfig, *, copy_engine: CopyEngine | None = None) -> None:
        """Record the config; allocate nothing, start nothing (see ``start``).

        ``copy_engine`` overrides the default (``TorchCopyEngine``; the CUDA engine when the device
        tensors live on a GPU and ``kvtier.transfer.cuda`` is importable).
        """
        raise NotImplementedError("being written (issue 3)")

    def register_device_kv(
        self,
        tensors: Mapping[str, torch.Tensor] | torch.Tensor,
        *,
        kind: LayoutKind | None = None,
    ) -> KvLayout:
        """Adopt engine-owned G1 tensors and return their detected layout. Call before ``start``."""
        raise NotImplementedError("being written (issue 3)")

    def start(self) -> None:
        """Allocate host memory, open the disk tier (restoring its index), start worker threads."""
        raise NotImplementedError("being written (issue 3)")

    def close(self) -> None:
        """Finish or fail in-flight work, leave the disk tier consistent, stop threads."""
        raise NotImplementedError("being written (issue 3)")

    def __enter__(self) -> KvBlockManager:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def offload(
        self,
        device_block_ids: Sequence[int],
        sequence_hashes: Sequence[int],
        *,
        parent_sequence_hashes: Sequence[int | None] | None = None,
        priority: int = 0,
        gate: object | None = None,
    ) -> object:
        """Offload device blocks; see the class docstring. ``parent_sequence_hashes`` defaults to
        the chain within the call (block i's parent is block i-1's hash; the first has none)."""
        raise NotImplementedError("being written (issue 3)")

    def match(self, sequence_hashes: Sequence[int]) -> object:
        """Cross-tier prefix match; see the class docstring."""
        raise NotImplementedError("being written (issue 3)")

    def onboard(
        self, match: object, device_block_ids: Sequence[int], *, gate: object | None = None
    ) -> object:
        """Onboard a match into the given device blocks; see the class docstring."""
        raise NotImplementedError("being written (issue 3)")

    def poll(self) -> list[object]:
        """Progress queues and apply finished transfers; see the class docstring."""
        raise NotImplementedError("being written (issue 3)")
