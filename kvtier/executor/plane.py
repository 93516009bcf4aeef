"""One rank's data plane: G1 view, copy engine, G2 rows (+ pinner), G3 files, disk threads, loader.

Why this exists: ``KvBlockManager`` and the vLLM worker half need the same pieces wired the same
way around one rank's KV tensors; ``RankDataPlane`` wires them once and its owner decides what
moves when. ``open`` wraps (or allocates) G1, picks the engine (``TorchCopyEngine`` on CPU,
``CudaCopyEngine`` on CUDA), allocates G2 (pinned in chunks by a ``ChunkedPinner`` when the engine
tracks them, else allocated pinned), opens G3 in the model's namespace, starts ``DiskIo`` and the
one disk -> device loader. ``close`` stops the engine first (it fails copies whose gate never
opened, so the loader never waits forever), then the loader, the disk threads (every block file
is then complete or absent), G3, the pinner, and drops G2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Protocol, Self, TypeVar

import torch

from kvtier.config import KvTierConfig, require_count, require_tiers
from kvtier.storage.device import DeviceStorage
from kvtier.storage.disk import DiskStorage, StoredBlock
from kvtier.storage.host import HostStorage
from kvtier.storage.identity import ModelIdentity
from kvtier.storage.layout import KvLayout
from kvtier.storage.pinned import ChunkedPinner
from kvtier.transfer.copy_api import CopyEngine
from kvtier.transfer.cuda.config import CudaCopyConfig
from kvtier.transfer.disk_io import DiskIo
from kvtier.transfer.disk_load import DiskLoadConfig, DiskToDeviceLoader
from kvtier.transfer.engine import TorchCopyEngine

__all__ = ["DataPlaneConfig", "RankDataPlane"]

_T = TypeVar("_T")


class _Closes(Protocol):
    def close(self) -> None: ...


def _opened(part: _T | None) -> _T:
    if part is None:
        raise RuntimeError("the data plane is not open")
    return part


@dataclass(frozen=True, kw_only=True)
class DataPlaneConfig:
    """What one rank's data plane is built from: the fields of the one configuration root that
    the bytes need (see ``KvTierConfig``), and ``cuda_copy``, the CUDA engine's configuration
    when the plane picks it."""

    rank: int = 0
    host_blocks: int = 0
    disk_blocks: int = 0
    disk_dir: str | None = None
    disk_o_direct: bool = True
    disk_fsync: bool = False
    io_threads: int = 4
    model_identity: ModelIdentity | None = None  # G3 namespace (kvtier.storage.identity)
    disk_group: str | None = None
    host_pinned: bool | None = None
    device: str = "cpu"
    staging_blocks: int = 64
    cuda_copy: CudaCopyConfig = field(default_factory=CudaCopyConfig)

    def __post_init__(self) -> None:
        require_count("rank", self.rank)
        require_tiers(self.host_blocks, self.disk_blocks, self.disk_dir)
        for name in ("io_threads", "staging_blocks"):
            require_count(name, getattr(self, name), low=1)

    @classmethod
    def from_config(cls, config: KvTierConfig) -> Self:
        """This rank's share of the one configuration root: its fields of the same names (all
        but ``cuda_copy``, which the root does not set)."""
        names = [f.name for f in fields(cls) if f.name != "cuda_copy"]
        return cls(**{name: getattr(config, name) for name in names})


class RankDataPlane:
    """One rank's storages, engine, disk threads and loader (see the module docstring).

    After ``open``: ``layout``, ``device``, ``engine`` (started), ``host`` / ``pinner`` /
    ``disk`` / ``disk_io`` / ``loader`` (None when the tier is absent), ``found`` (the G3 blocks
    ``DiskStorage.open`` listed; empty when it read names only: files are then the index).
    ``engine`` given to the constructor replaces the plane's choice; it is started and closed
    here too.
    """

    def __init__(self, config: DataPlaneConfig, engine: CopyEngine | None = None) -> None:
        self.config = config
        self._engine_given = engine
        self._layout: KvLayout | None = None
        self._device: DeviceStorage | None = None
        self._engine: CopyEngine | None = None
        self.host: HostStorage | None = None
        self.pinner: ChunkedPinner | None = None
        self.disk: DiskStorage | None = None
        self.disk_io: DiskIo | None = None
        self.loader: DiskToDeviceLoader | None = None
        self.found: list[StoredBlock] = []

    @property
    def layout(self) -> KvLayout:
        return _opened(self._layout)

    @property
    def device(self) -> DeviceStorage:
        return _opened(self._device)

    @property
    def engine(self) -> CopyEngine:
        return _opened(self._engine)

    @property
    def on_cuda(self) -> bool:
        return self.device.device.type == "cuda"

    @property
    def namespace(self) -> int:
        """G3's (and G4's) key space: the model identity over the layout, or the layout alone."""
        ident = self.config.model_identity
        return ident.namespace(self.layout.fingerprint) if ident else self.layout.fingerprint

    def open(
        self, layout: KvLayout, tensors: Mapping[str, torch.Tensor] | torch.Tensor | None = None
    ) -> None:
        """Wrap ``tensors`` (or allocate ``layout`` on ``config.device``), start the engine,
        allocate G2, open G3 and start its threads."""
        if self._layout is not None:
            raise RuntimeError("the data plane is already open")
        self._layout = layout
        try:
            self._open(layout, tensors)
        except BaseException:
            self.close()  # nothing half-started stays behind; open may be called again
            raise

    def _open(
        self, layout: KvLayout, tensors: Mapping[str, torch.Tensor] | torch.Tensor | None
    ) -> None:
        cfg = self.config
        if tensors is None:
            self._device = DeviceStorage.allocate(layout, cfg.device)
        else:
            self._device = DeviceStorage(layout, tensors)
        on_cuda = self.on_cuda
        self._engine = self._engine_given or self._default_engine()
        self._engine.start()
        if cfg.host_blocks:
            self._open_host(cfg.host_pinned if cfg.host_pinned is not None else on_cuda)
        if cfg.disk_blocks:
            assert cfg.disk_dir is not None
            ident = cfg.model_identity
            self.disk = DiskStorage(
                cfg.disk_dir,
                self.namespace,
                layout.block_bytes,
                o_direct=cfg.disk_o_direct,
                fsync=cfg.disk_fsync,
                capacity=cfg.disk_blocks,
                group=cfg.disk_group,
                identity=ident.describe(layout.fingerprint) if ident else None,
            )
            found = self.disk.open()
            self.found = [] if self.disk.names_only else found
            self.disk_io = DiskIo(self.disk, cfg.io_threads)
            self.disk_io.start()
            load = DiskLoadConfig.for_staging(cfg.staging_blocks)
            self.loader = DiskToDeviceLoader(self.disk_io, self._engine, load, pin_memory=on_cuda)
            self.loader.start()

    def _default_engine(self) -> CopyEngine:
        if self.on_cuda:
            from kvtier.transfer.cuda.engine import CudaCopyEngine

            return CudaCopyEngine(self.config.cuda_copy, device=self.device.device)
        return TorchCopyEngine()

    def _open_host(self, pinned: bool) -> None:
        """G2 rows; pinned in chunks on a thread when the engine tracks chunks (first rows usable
        at once; the CUDA engine refuses rows not pinned yet, so an early copy fails, never
        degrades), else allocated pinned up front."""
        assert self._layout is not None
        attach = getattr(self._engine, "attach_pinner", None)
        up_front = pinned and attach is None
        host = HostStorage(self.config.host_blocks, self._layout.block_bytes, pin_memory=up_front)
        with torch.inference_mode(False):  # rows written outside vLLM's inference mode
            host.allocate()
        self.host = host
        if pinned and attach is not None:
            self.pinner = ChunkedPinner(host.rows)
            self.pinner.start()
            attach(host, self.pinner)

    def close(self) -> None:
        """Stop everything ``open`` started, in this order (module docstring); idempotent."""
        parts: list[_Closes | None] = [self._engine, self.loader, self.disk_io, self.disk]
        parts.append(self.pinner)
        for part in parts:
            if part is not None:
                part.close()
        if self.host is not None:
            self.host.release()
        self._engine = self.loader = self.disk_io = self.disk = self.pinner = self.host = None
        self._device, self._layout, self.found = None, None, []
