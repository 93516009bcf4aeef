"""kvtier's one configuration root: the KV geometry of a model and the tiers to build.

Why this exists: every part of kvtier (layouts, pools, disk files, transfers, the connector's two
halves) derives its sizes and policy from one description. ``KvBlockManager`` takes a
``KvTierConfig``; the vLLM connector builds one from the knobs (``KvTierConfig.from_settings``) and
derives its scheduler and worker configs from it (``SchedulerConfig.from_config``,
``WorkerConfig.from_config``). Both classes are frozen and validated on construction, each rule
written once here, so a bad value fails at once with a message that names the field (or, through
``from_settings``, the knob), never later inside a copy. This module imports no torch: the
connector's scheduler half (control plane) builds a ``KvTierConfig`` too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kvtier.core.onboard_cost import OnboardCostConfig
from kvtier.storage.identity import ModelIdentity
from kvtier.storage.remote import RemoteConfig

if TYPE_CHECKING:
    from kvtier.settings import KvTierSettings

__all__ = [
    "DEVICE_LAYOUTS",
    "DTYPE_SIZES",
    "ConfigError",
    "KvTierConfig",
    "ModelConfig",
    "blocks_in",
    "physical_memory_bytes",
    "require_count",
    "require_tiers",
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


class ConfigError(ValueError):
    """A refused configuration value; ``field`` names the field, so ``KvTierConfig.from_settings``
    can name the knob that set it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def require_count(name: str, value: int, *, low: int = 0) -> None:
    """The rule of every count (``low`` 0 or 1): ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "positive" if low == 1 else "non-negative"
        raise ConfigError(name, f"{name} must be a {kind} int, got {value!r}")


def require_tiers(host_blocks: int, disk_blocks: int, disk_dir: str | None) -> None:
    """The rule of the G2/G3 sizes, shared by ``KvTierConfig`` and the connector's halves."""
    require_count("host_blocks", host_blocks)
    require_count("disk_blocks", disk_blocks)
    if disk_dir is not None and not isinstance(disk_dir, str):
        raise TypeError(f"disk_dir must be a str path, got {type(disk_dir).__name__}")
    if disk_blocks > 0 and not disk_dir:
        raise ConfigError("disk_dir", "disk_blocks > 0 needs disk_dir (the G3 directory)")


def _flag(name: str, value: object, *, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {value!r}")


def blocks_in(gigabytes: float, block_bytes: int) -> int:
    """Blocks of ``block_bytes`` that fit in ``gigabytes`` decimal GB (how every ``*_cache_gb``
    knob is read)."""
    require_count("block_bytes", block_bytes, low=1)
    if not math.isfinite(gigabytes) or gigabytes < 0:
        raise ValueError(f"cache size must be a finite number of GB >= 0, got {gigabytes!r}")
    if not math.isfinite(gigabytes * 1e9):
        raise ValueError(f"cache size of {gigabytes:g} GB is too large (it overflows)")
    return int(gigabytes * 1e9) // block_bytes


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
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            require_count(name, getattr(self, name), low=1)
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
    """Everything kvtier needs to build one rank's tiers: ``KvBlockManager`` takes it, and the
    vLLM connector builds it once (``from_settings``) and derives its halves' configs from it.

    - ``device_blocks``: size of a G1 pool kvtier allocates itself; 0 when the engine registers its
      own KV tensors with ``register_device_kv``.
    - ``host_blocks``: G2 capacity (0 = no host tier; offloads then go device -> disk).
    - ``disk_blocks`` / ``disk_dir``: G3 capacity and directory (0 / None = no disk tier).
    - ``disk_o_direct``: write and read block files with O_DIRECT where the filesystem allows it.
    - ``disk_filter``: G2 -> G3 cascade only for blocks seen twice (the frequency filter).
    - ``io_threads``: disk I/O threads (``os.preadv``/``os.pwritev`` release the GIL).
    - ``max_inflight_blocks``: bound on blocks being moved at once across all paths.
    - ``staging_blocks``: host bounce rows for disk <-> device transfers.
    - ``device``: where G1 lives (``"cpu"`` or ``"cuda:N"``): a self-allocated G1 is put there.
    - ``host_pinned``: pin G2 memory; None = pin when CUDA is available.
    - ``disk_fsync``: fsync each block file before it is renamed into place (durable, slower).
    - ``device_layout``: layout of a self-allocated G1: ``fully_contiguous``, ``block_first`` or
      ``outer_first``.
    - ``model_identity``: what separates this model's G3 blocks from another's of the same
      layout (``kvtier.storage.identity``); None keys G3 by the layout alone.
    - ``disk_group``: a group name: G3 files and folders group read-write (else owner-only).
    - connector only: ``rank`` of ``num_workers`` tensor-parallel ranks (each holds its shard of
      every tier), ``layerwise_onboard`` (load inside the forward pass), ``async_scheduling`` (the
      engine schedules a step ahead: G3 then loads before the pass), ``onboard_cost_aware`` /
      ``onboard_cost_bias`` (``onboard_cost``), ``remote`` (G4) and its write-behind bound.
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
    rank: int = 0
    num_workers: int = 1
    layerwise_onboard: bool = False
    async_scheduling: bool = False
    onboard_cost_aware: bool = False
    onboard_cost_bias: float = 1.0
    remote: RemoteConfig | None = None
    remote_write_queue_bytes: int = 256_000_000

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}")
        require_count("device_blocks", self.device_blocks)
        require_tiers(self.host_blocks, self.disk_blocks, self.disk_dir)
        for name in ("io_threads", "max_inflight_blocks", "staging_blocks", "num_workers"):
            require_count(name, getattr(self, name), low=1)
        require_count("remote_write_queue_bytes", self.remote_write_queue_bytes)
        require_count("rank", self.rank)
        if self.rank >= self.num_workers:
            raise ConfigError("rank", f"rank {self.rank} must be < num_workers {self.num_workers}")
        for f in fields(self):  # every ``bool`` field (annotations are strings here)
            if f.type == "bool":
                _flag(f.name, getattr(self, f.name))
        _flag("host_pinned", self.host_pinned, optional=True)
        if self.device_layout not in DEVICE_LAYOUTS:
            raise ConfigError(
                "device_layout",
                f"device_layout must be one of {DEVICE_LAYOUTS}, got {self.device_layout!r}",
            )
        ram = physical_memory_bytes()
        host_bytes = self.host_blocks * self.model.block_bytes
        if ram is not None and host_bytes > ram:
            raise ConfigError(
                "host_blocks",
                f"host_blocks={self.host_blocks} ({host_bytes / 1e9:.3g} GB of G2 host memory), "
                f"more than this machine's memory ({ram / 1e9:.3g} GB)",
            )
        if self.model_identity is not None and not isinstance(self.model_identity, ModelIdentity):
            raise TypeError("model_identity must be a kvtier.storage.identity.ModelIdentity")
        if self.disk_group is not None and (
            not isinstance(self.disk_group, str) or not self.disk_group
        ):
            raise TypeError("disk_group must be a non-empty group name or None")
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device.startswith("cuda")
        ):
            raise ConfigError("device", f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.remote is not None and not isinstance(self.remote, RemoteConfig):
            raise TypeError("remote must be a kvtier.storage.remote.RemoteConfig or None")
        self.onboard_cost  # noqa: B018 - validates the bias (OnboardCostConfig's rule)

    @property
    def onboard_cost(self) -> OnboardCostConfig:
        """The cost-aware onboarding model's configuration (``kvtier.core.onboard_cost``)."""
        return OnboardCostConfig(block_bytes=self.model.block_bytes, bias=self.onboard_cost_bias)

    @classmethod
    def from_settings(
        cls,
        settings: KvTierSettings,
        model: ModelConfig,
        *,
        num_workers: int = 1,
        rank: int = 0,
        on_cuda: bool = False,
        async_scheduling: bool = False,
        model_identity: ModelIdentity | None = None,
    ) -> KvTierConfig:
        """The configuration the knobs (``kvtier.settings``) ask for, for one rank of an engine
        with this KV geometry: sizes in blocks (a block count knob wins over its GB knob), G3 in
        ``<disk_dir>/rank<N>`` when there are several ranks. A refused value raises
        ``SettingsError`` naming the knob that set it."""
        disk_dir = settings.disk_dir
        if disk_dir is not None and num_workers > 1:
            disk_dir = os.path.join(disk_dir, f"rank{rank}")  # each rank its own G3 shard
        remote = None
        if settings.remote_url is not None:
            remote = RemoteConfig(
                url=settings.remote_url,
                password=settings.remote_password,
                ttl_s=settings.remote_ttl_s,
                timeout_ms=settings.remote_timeout_ms,
            )
        try:
            return cls(
                model=model,
                host_blocks=settings.host_blocks(model.block_bytes),
                disk_blocks=settings.disk_blocks(model.block_bytes),
                disk_dir=disk_dir,
                disk_o_direct=settings.disk_o_direct,
                disk_filter=settings.disk_filter,
                io_threads=settings.io_threads,
                device="cuda" if on_cuda else "cpu",
                model_identity=model_identity,
                disk_group=settings.disk_group,
                rank=rank,
                num_workers=num_workers,
                layerwise_onboard=settings.layerwise_onboard,
                async_scheduling=async_scheduling,
                onboard_cost_aware=settings.onboard_cost_aware,
                onboard_cost_bias=settings.onboard_cost_bias,
                remote=remote,
                remote_write_queue_bytes=int(settings.remote_max_write_queue_mb * 1e6),
            )
        except ConfigError as exc:
            raise settings.knob_error(exc.field, str(exc)) from None
