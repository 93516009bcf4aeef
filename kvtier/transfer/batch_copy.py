"""Synchronous batch copies between device storage and host rows, layer by layer.

Why apart from the engine: ``TorchCopyEngine`` runs them on its thread, and the connector's CPU
worker calls ``copy_batch`` inline (its stores read memory within the step that planned them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvtier.storage.device import DeviceStorage
from kvtier.storage.host import HostStorage
from kvtier.storage.layout import LayoutKind
from kvtier.transfer.copy_api import CopyFuture

__all__ = ["copy_batch", "runs"]


def runs(device_ids: Sequence[int], host_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group id pairs into runs ``(first device id, first host id, length)`` where both sides
    are consecutive, so that each run is one copy per layer instead of one per block."""
    out: list[tuple[int, int, int]] = []
    for d, h in zip(device_ids, host_ids, strict=True):
        if out:
            d0, h0, k = out[-1]
            if d == d0 + k and h == h0 + k:
                out[-1] = (d0, h0, k + 1)
                continue
        out.append((d, h, 1))
    return out


def copy_batch(
    to_host: bool,
    device: DeviceStorage,
    host: HostStorage,
    device_ids: Sequence[int],
    host_ids: Sequence[int],
    future: CopyFuture | None = None,
) -> None:
    """Copy a batch synchronously, layer by layer, marking each layer in ``future`` as it lands.

    CPU device: one numpy slice assignment per (layer, run of consecutive ids), a plain memcpy
    (torch's per-call overhead on small CPU copies is ~10x numpy's). Other devices: one gather
    (``index_select``) and one scatter (``index_copy_``) per layer.
    """
    if device.device.type == "cpu":
        _copy_batch_cpu(to_host, device, host, device_ids, host_ids, future)
        return
    layout = device.layout
    lbb = layout.layer_block_bytes
    nl = layout.model.num_layers
    dev = device.device
    didx = torch.tensor(device_ids, dtype=torch.long, device=dev)
    hidx = torch.tensor(host_ids, dtype=torch.long)
    rows = host.rows.view(host.num_blocks, nl, lbb)
    outer_first = layout.kind is LayoutKind.OUTER_FIRST
    for layer in range(nl):
        view = device.layer_bytes(layer)
        host_layer = rows[:, layer]
        if to_host:
            if outer_first:
                gathered = view.index_select(1, didx).transpose(0, 1).reshape(len(didx), lbb)
            else:
                gathered = view.index_select(0, didx)
            host_layer.index_copy_(0, hidx, gathered.to("cpu"))
        else:
            pieces = host_layer.index_select(0, hidx).to(dev, non_blocking=dev.type == "cuda")
            if outer_first:
                outer = view.shape[0]
                view.index_copy_(1, didx, pieces.view(len(didx), outer, -1).transpose(0, 1))
            else:
                view.index_copy_(0, didx, pieces)
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        if future is not None:
            future.complete_layer(layer)


def _copy_batch_cpu(
    to_host: bool,
    device: DeviceStorage,
    host: HostStorage,
    device_ids: Sequence[int],
    host_ids: Sequence[int],
    future: CopyFuture | None,
) -> None:
    layout = device.layout
    nl = layout.model.num_layers
    outer = layout.model.outer_dim
    outer_first = layout.kind is LayoutKind.OUTER_FIRST
    flat = device.byte_layers()
    if flat is not None and len(device_ids) <= 8 and host.rows.is_contiguous():
        # A few blocks (a decode step's): one memoryview slice copy per (layer, block).
        hmv = host.rows.numpy().data.cast("B")
        lbb, rb = layout.layer_block_bytes, host.block_bytes
        pairs = list(zip(device_ids, host_ids, strict=True))
        for layer in range(nl):
            src, off = flat[layer], layer * lbb
            for d, h in pairs:
                ho, do = h * rb + off, d * lbb
                if to_host:
                    hmv[ho : ho + lbb] = src[do : do + lbb]
                else:
                    src[do : do + lbb] = hmv[ho : ho + lbb]
            if future is not None:
                future.complete_layer(layer)
        return
    # host rows are contiguous, so these reshapes are views; device views are never reshaped
    shape = (host.num_blocks, nl, outer, -1) if outer_first else (host.num_blocks, nl, -1)
    rows = host.rows.numpy().reshape(shape)
    spans = runs(device_ids, host_ids)
    views = device.numpy_layers()  # outer-first: [nb, outer, inner], a strided view
    if len(spans) > 2:  # scattered ids (decode): one indexed copy per layer, not one per run
        didx = np.asarray(device_ids, dtype=np.intp)
        hidx = np.asarray(host_ids, dtype=np.intp)
        for layer in range(nl):
            if to_host:
                rows[hidx, layer] = views[layer][didx]
            else:
                views[layer][didx] = rows[hidx, layer]
            if future is not None:
                future.complete_layer(layer)
        return
    for layer in range(nl):
        view = views[layer]
        for d, h, k in spans:
            if to_host:
                rows[h : h + k, layer] = view[d : d + k]
            else:
                view[d : d + k] = rows[h : h + k, layer]
        if future is not None:
            future.complete_layer(layer)
