"""The plain-data jobs of the data plane: what the scheduler half tells the workers each step
(``StepPlan``), and what the workers report back (``WorkerReport``), G4 parts included.

Why this exists: in vLLM the scheduler and the workers may live in different processes, and vLLM
pickles these objects between them. They are therefore plain data only (ints, strs and lists of
them in frozen dataclasses): nothing that runs code when loaded, nothing that refers to live
objects. The scheduler half decides everything (which G2 slot or G3 file, which GPU block); the
worker half only moves bytes and reports completions and failures. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from kvtier.storage.breaker import BreakerState


@dataclass
class RemoteFigures:
    """The G4 fetch and write figures a ``RemoteReport`` and the scheduler half's
    ``RemoteCounters`` share (summed as they come: ``add_figures``)."""

    fetched_blocks: int = 0
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0
    fetch_missing: int = 0
    fetch_corrupt: int = 0
    fetch_failed: int = 0
    written_bytes: int = 0
    write_seconds: float = 0.0
    write_dropped: int = 0
    write_failed: int = 0


FIGURES = tuple(f.name for f in fields(RemoteFigures))
FETCH_FIGURES = tuple(name for name in FIGURES if name.startswith("fetch"))


def add_figures(total: object, part: object, names: Sequence[str]) -> None:
    """Add ``part``'s figures ``names`` to ``total``'s (reports and counters share the names)."""
    for name in names:
        setattr(total, name, getattr(total, name) + getattr(part, name))


@dataclass(frozen=True)
class RemoteLoad:
    """The G4 part of a ``LoadJob``: fetch ``hashes[i]`` into GPU block ``gpu_blocks[i]`` and keep
    a copy in G2 slot ``host_slots[i]`` (-1: no G2 slot was free; the block is only onboarded)."""

    hashes: list[int] = field(default_factory=list)
    gpu_blocks: list[int] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.hashes) == len(self.gpu_blocks) == len(self.host_slots):
            raise ValueError("RemoteLoad: hashes, gpu_blocks and host_slots differ in length")


@dataclass(frozen=True)
class RemoteWrites:
    """Blocks of this step's G2 stores to write behind to G4, read from their G2 slots once the
    store landed (same order as the three lists)."""

    hashes: list[int] = field(default_factory=list)
    parents: list[int | None] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)


@dataclass
class RemoteReport(RemoteFigures):
    """One worker's G4 figures since its last report (plain data, inside ``WorkerReport``)."""

    namespace: str | None = None
    """This rank's key namespace (first report only)."""
    written: list[int] = field(default_factory=list)
    """Sequence hashes written to G4 (for KV events with medium REMOTE)."""
    written_parents: list[int | None] = field(default_factory=list)
    """The parent hash of each ``written`` block (same order)."""
    bad: list[int] = field(default_factory=list)
    """Sequence hashes a fetch found missing, corrupt or failed (not matched again until
    written again: vLLM recomputes them, and the engine stores them again)."""
    breaker_state: str = BreakerState.CLOSED

    @property
    def is_empty(self) -> bool:
        return self.namespace is None and not (
            self.written
            or self.bad
            or self.fetched_blocks
            or self.fetch_missing
            or self.fetch_corrupt
            or self.fetch_failed
            or self.write_dropped
            or self.write_failed
        )


@dataclass(frozen=True)
class LoadJob:
    """Onboard blocks of one request into its GPU blocks.

    ``host_slots[i]`` -> ``host_gpu_blocks[i]`` (G2 -> G1) and ``disk_hashes[i]`` ->
    ``disk_gpu_blocks[i]`` (G3 -> G1). ``is_async``: the request waits outside the forward pass
    and is reported in ``get_finished``; otherwise the load runs inside this step's forward pass,
    layer by layer.
    """

    job_id: int
    req_id: str
    is_async: bool
    host_slots: list[int] = field(default_factory=list)
    host_gpu_blocks: list[int] = field(default_factory=list)
    disk_hashes: list[int] = field(default_factory=list)
    disk_gpu_blocks: list[int] = field(default_factory=list)
    remote: RemoteLoad | None = None
    """The G4 part of the load (blocks past the G2/G3 hit), or None."""

    def __post_init__(self) -> None:
        if len(self.host_slots) != len(self.host_gpu_blocks):
            raise ValueError("LoadJob: host_slots and host_gpu_blocks differ in length")
        if len(self.disk_hashes) != len(self.disk_gpu_blocks):
            raise ValueError("LoadJob: disk_hashes and disk_gpu_blocks differ in length")

    @property
    def gpu_blocks(self) -> list[int]:
        remote = self.remote.gpu_blocks if self.remote is not None else []
        return self.host_gpu_blocks + self.disk_gpu_blocks + remote


@dataclass(frozen=True)
class StoreBatch:
    """Copy GPU blocks into G2 slots after this step's forward pass wrote them.

    ``parents[i]`` is the parent sequence hash of ``hashes[i]`` (None for a request's first
    block; empty when not known, else as long as ``hashes``). The workers ignore it; the scheduler
    half's G4 write planning reads it (telemetry's parents come from the planner's registry).
    The blocks' tokens deliberately do not ride along: they would cost a
    block's worth of ints per block, pickled to every worker every step, for nothing a worker
    uses; the scheduler half hands them to the telemetry in its own process instead.
    """

    gpu_blocks: list[int] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    parents: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.gpu_blocks) == len(self.host_slots) == len(self.hashes):
            raise ValueError("StoreBatch: gpu_blocks, host_slots and hashes differ in length")
        got = len(self.parents)
        if got and got != len(self.hashes):
            raise ValueError(f"StoreBatch: parents has {got} entries for {len(self.hashes)} hashes")


@dataclass(frozen=True)
class DiskWrite:
    """Write one block to G3, from a G2 slot (``host_slot >= 0``, read after this step's G2
    stores landed) or straight from a GPU block (``gpu_block >= 0``, when there is no G2 slot)."""

    seq_hash: int
    parent_hash: int | None
    host_slot: int = -1
    gpu_block: int = -1

    def __post_init__(self) -> None:
        if (self.host_slot >= 0) == (self.gpu_block >= 0):
            raise ValueError("DiskWrite needs exactly one source: host_slot or gpu_block")


@dataclass(frozen=True)
class StepPlan:
    """Everything the workers do for kvtier in one engine step."""

    step: int
    loads: list[LoadJob] = field(default_factory=list)
    stores: StoreBatch = field(default_factory=StoreBatch)
    disk_writes: list[DiskWrite] = field(default_factory=list)
    disk_deletes: list[int] = field(default_factory=list)
    delayed_free: list[str] = field(default_factory=list)
    idle: bool = False
    """No forward pass this step: a worker may block briefly on its background work."""
    remote_writes: RemoteWrites | None = None
    """G2 stores of this step to write behind to G4 once they landed (None: none)."""

    @property
    def is_empty(self) -> bool:
        return not (
            self.loads
            or self.stores.gpu_blocks
            or self.disk_writes
            or self.disk_deletes
            or self.delayed_free
            or self.remote_writes is not None
        )


@dataclass
class WorkerReport:
    """One worker's completions since its last report (hashes are sequence hashes).

    ``restored`` is the G3 index found on disk at start (sent once, in the first report; None in
    the others), newest first, with ``restored_parents``. ``stores_read_step``: the last step
    whose stores no longer read GPU memory.
    """

    rank: int
    host_stored: list[int] = field(default_factory=list)
    host_store_failed: list[int] = field(default_factory=list)
    disk_stored: list[int] = field(default_factory=list)
    disk_store_failed: list[int] = field(default_factory=list)
    loads_done: list[int] = field(default_factory=list)
    disk_bad: list[int] = field(default_factory=list)
    host_load_failed: int = 0
    """Blocks of this worker's loads from G2 that failed (vLLM recomputes them)."""
    disk_load_failed: int = 0
    """Blocks of this worker's loads from G3 that failed (missing, corrupt, or the copy failed)."""
    stores_read_step: int = -1
    host_pinned_rows: int = -1
    """G2 rows ``[0, n)`` this worker has page-locked so far (a CUDA worker pins its G2 in chunks
    after start-up); -1: not reported, every row is usable."""
    restored: list[int] | None = None
    restored_parents: list[int | None] = field(default_factory=list)
    """The parent hash of each ``restored`` block, from its file header (same order; empty when
    not known), so the scheduler rebuilds the G3 index with its parent links."""
    disk_folder: str | None = None
    """This worker's G3 namespace folder (sent with ``restored``): where the scheduler half looks
    for blocks other engines wrote while this one runs."""
    remote: RemoteReport | None = None
    """G4 figures of this worker since its last report (None: nothing to say)."""

    @property
    def is_empty(self) -> bool:
        return not (
            self.host_stored
            or self.host_store_failed
            or self.disk_stored
            or self.disk_store_failed
            or self.loads_done
            or self.disk_bad
            or self.load_failed_blocks
            or self.restored is not None
            or self.host_pinned_rows >= 0
            or self.remote is not None
        )

    @property
    def load_failed_blocks(self) -> int:
        """Failed load blocks of both tiers."""
        return self.host_load_failed + self.disk_load_failed
