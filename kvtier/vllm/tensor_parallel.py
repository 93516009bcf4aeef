"""Tensor parallelism: what makes one rank's stored KV differ from another's. No torch.

Why this exists: with tensor parallelism (TP) every worker holds its own shard of each KV block
(its ``num_kv_heads / tp_size`` heads), so rank 0's bytes of a block are not rank 1's, although
both have the same geometry, hence the same layout fingerprint. Served to the wrong rank they
would pass every checksum and be silently wrong KV. The connector gives each rank its own G3
folder (``<disk_dir>/rank<N>``), and on top of that each rank's G3 namespace (the fingerprint in
the folder name and in every file header, which ``DiskStorage`` checks on every read) includes
the rank and the world size: a file of another rank or of another TP size, moved or copied into a
rank's folder, is a load error (vLLM recomputes), never served.

A single worker (world size 1) keeps the plain layout fingerprint, so caches written before
tensor parallelism was supported stay valid.
"""

from __future__ import annotations

import json

import xxhash

__all__ = ["rank_fingerprint"]


def rank_fingerprint(layout_fingerprint: int, rank: int, world_size: int) -> int:
    """The G3 namespace of ``rank`` of ``world_size`` workers storing blocks of one layout."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"rank_fingerprint: {name} must be an int >= 0, got {value!r}")
    if world_size == 0 or rank >= world_size:
        raise ValueError(f"rank_fingerprint: rank {rank} is not a rank of {world_size} workers")
    if world_size == 1:
        return layout_fingerprint
    desc = {"layout": layout_fingerprint, "rank": rank, "world_size": world_size}
    return xxhash.xxh3_64_intdigest(json.dumps(desc, separators=(",", ":")).encode(), 0)
