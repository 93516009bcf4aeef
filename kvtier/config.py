"""Frozen configuration of the data plane: the KV geometry of a model and the tiers to build.

Why this exists: every part of the data plane (layouts, pools, disk files, transfers) derives its
sizes from one description of the model's KV cache, and the facade is built from one config object.
Both are frozen and validated on construction, so a bad value fails at once with a message that
names the field, never later inside a copy. This module imports no torch: the connector's scheduler
half (control plane) may build a ``KvTierConfig`` too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from kvtier.storage.identity import ModelIdentity

__all__ = [
    "DEVICE_LAYOUTS",
    "DTYPE_SIZES",
    "KvTierConfig",
    "ModelConfig",
    "physical_memory_bytes",
]

DEVICE_LAYOUTS: tuple[str, ...] = ("fully_contiguous", "block_first", "outer_first")
"""Names of the G1 layouts (values of ``kvtier.storage.layout.LayoutKind``)."""

DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
"""Element size in bytes of every KV dtype kvtier accepts (names as torch spells them)."""


def physical_memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _flag(name: str, value: object, *, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """KV geometry of one model (one rank).

    ``outer_dim`` is 2 for separate K and V, 1 for MLA (one latent per token). ``block_size`` is the
    number of tokens per block (vLLM's page size). A block's bytes are ``num_layers`` equal layer
    pieces of ``layer_block_bytes`` each.
    """

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    outer_dim: int = 2

    def __post_init__(self) -> None:
        _positive("num_layers", self.num_layers)
        _positive("block_size", self.block_size)
        _positive("num_kv_heads", self.num_kv_heads)
        _positive("head_dim", self.head_dim)
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")
        if self.outer_dim not in (1, 2):
            raise ValueError(f"outer_dim must be 2 (K and V) or 1 (MLA), got {self.outer_dim!r}")

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``dtype``."""
        return DTYPE_SIZES[self.dtype]

    @property
    def inner_elems(self) -> int:
        """Elements of one (block, layer, outer index): tokens x heads x head_dim."""
        return self.block_size * self.num_kv_heads * self.head_dim

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one block in one layer (all outer indices)."""
        return self.outer_dim * self.inner_elems * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return self.num_layers * self.layer_block_bytes


@dataclass(frozen=True)
class KvTierConfig:
    """Everything ``KvBlockManager`` needs to build its tiers.

    - ``device_blocks``: size of a G1 pool kvtier allocates itself; 0 when the engine registers its
      own KV tensors with ``register_device_kv``.
    - ``host_blocks``: G2 capacity (0 = no host tier; offloads then go device -> disk).
    - ``disk_blocks`` / ``disk_dir``: G3 capacity and directory (0 / None = no disk tier).
    - ``disk_o_direct``: write and read block files with O_DIRECT where the filesystem allows it.
    - ``disk_filter``: G2 -> G3 cascade only for blocks seen twice (the frequency filter).
    - ``io_threads``: disk I/O threads (``os.preadv``/``os.pwritev`` release the GIL).
    - ``max_inflight_blocks``: bound on blocks being moved at once across all paths.
    - ``staging_blocks``: host bounce rows for disk <-> device transfers.
    - ``device``: torch device of a self-allocated G1 (``"cpu"`` or ``"cuda:N"``).
    - ``host_pinned``: pin G2 memory; None = pin when CUDA is available.
    - ``disk_fsync``: fsync each block file before it is renamed into place (durable, slower).
    - ``device_layout``: layout of a self-allocated G1: ``fully_contiguous``, ``block_first`` or
      ``outer_first``.
    - ``model_identity``: what separates this model's G3 blocks from another's of the same
      layout (``kvtier.storage.identity``); None keys G3 by the layout alone.
    - ``disk_group``: a group name: G3 files and folders group read-write (else owner-only).
    """

    model: ModelConfig
    device_blocks: int = 0
    host_blocks: int = 0
    disk_blocks: int = 0
    disk_dir: str | None = None
    disk_o_direct: bool = True
    disk_filter: bool = True
    io_threads: int = 4
    max_inflight_blocks: int = 512
    staging_blocks: int = 64
    device: str = "cpu"
    host_pinned: bool | None = None
    disk_fsync: bool = False
    device_layout: str = "fully_contiguous"
    model_identity: ModelIdentity | None = None
    disk_group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}")
        _non_negative("device_blocks", self.device_blocks)
        _non_negative("host_blocks", self.host_blocks)
        _non_negative("disk_blocks", self.disk_blocks)
        _positive("io_threads", self.io_threads)
        _positive("max_inflight_blocks", self.max_inflight_blocks)
        _positive("staging_blocks", self.staging_blocks)
        _flag("disk_o_direct", self.disk_o_direct)
        _flag("disk_filter", self.disk_filter)
        _flag("disk_fsync", self.disk_fsync)
        _flag("host_pinned", self.host_pinned, optional=True)
        if self.device_layout not in DEVICE_LAYOUTS:
            raise ValueError(
                f"device_layout must be one of {DEVICE_LAYOUTS}, got {self.device_layout!r}"
            )
        ram = physical_memory_bytes()
        host_bytes = self.host_blocks * self.model.block_bytes
        if ram is not None and host_bytes > ram:
            raise ValueError(
                f"host_blocks={self.host_blocks} ({host_bytes / 1e9:.3g} GB of G2 host memory) is "
                f"more than this machine's memory ({ram / 1e9:.3g} GB); lower host_blocks"
            )
        if self.disk_blocks > 0 and not self.disk_dir:
            raise ValueError("disk_blocks > 0 needs disk_dir (the G3 directory)")
        if self.model_identity is not None and not isinstance(self.model_identity, ModelIdentity):
            raise TypeError("model_identity must be a kvtier.storage.identity.ModelIdentity")
        if self.disk_group is not None and (
            not isinstance(self.disk_group, str) or not self.disk_group
        ):
            raise TypeError("disk_group must be a non-empty group name or None")
        if self.disk_dir is not None and not isinstance(self.disk_dir, str):
            raise TypeError(f"disk_dir must be a str path, got {type(self.disk_dir).__name__}")
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device.startswith("cuda")
        ):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @staticmethod
    def blocks_for_bytes(model: ModelConfig, gigabytes: float) -> int:
        """Blocks that fit in ``gigabytes`` decimal GB (how ``DYN_KVBM_*_CACHE_GB`` is read)."""
        if not math.isfinite(gigabytes) or gigabytes < 0:
            raise ValueError(f"cache size must be a finite number of GB >= 0, got {gigabytes!r}")
        if not math.isfinite(gigabytes * 1e9):
            raise ValueError(f"cache size of {gigabytes:g} GB is too large (it overflows)")
        return int(gigabytes * 1e9) // model.block_bytes
