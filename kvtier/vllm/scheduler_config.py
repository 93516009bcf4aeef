"""``SchedulerConfig``: the scheduler half's geometry and policy, derived from the config root.

Why apart: tests and the connector build it (``from_config``); the scheduler only reads it. Its
tier sizes and worker count are checked by the planner's own rules (``PlannerConfig``). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.config import KvTierConfig, require_count
from kvtier.plan.planner import PlannerConfig


@dataclass(frozen=True)
class SchedulerConfig:
    """Geometry and policy of the scheduler half."""

    block_size: int
    host_blocks: int
    disk_blocks: int
    disk_filter: bool = True
    layerwise_onboard: bool = False
    num_workers: int = 1
    async_store_reads: bool = False
    """True when workers may still read a store's GPU blocks after the step that planned it
    (an asynchronous copy stream); then ``request_finished`` keeps the blocks until the workers
    confirm. kvtier's CPU worker finishes those reads inside the step (``wait_for_save``), so
    vLLM may free a finished request's blocks at once; its CUDA worker does not."""
    layerwise_disk: bool = True
    """With ``layerwise_onboard``, whether matches with G3 blocks load inside the forward pass
    too. False sends them through the asynchronous path: vLLM with asynchronous scheduling (its
    GPU default) has already scheduled the next step when an in-pass load fails, so it would emit
    one token computed from the missing block; a G3 read can fail (a corrupt file), a G2 copy
    cannot once issued."""
    pinned_host_rows: bool = False
    """True when workers pin G2 in chunks after start-up (CUDA): G2 slots are handed out only
    below the smallest pinned-row count every worker has reported (``WorkerReport``)."""
    record_events: bool = False
    """Keep the planner's Store/Remove events for the telemetry's KV events (events on)."""

    def __post_init__(self) -> None:
        require_count("block_size", self.block_size, low=1)
        self.planner()  # validates the tier sizes and the worker count

    @classmethod
    def from_config(cls, config: KvTierConfig, *, record_events: bool = False) -> SchedulerConfig:
        """The scheduler half's share of the one configuration root. CUDA workers store
        asynchronously and pin G2 in chunks (``kvtier.vllm.gpu_path``); with asynchronous
        scheduling G3 loads run before the forward pass. ``record_events``: KV events are on."""
        return cls(
            block_size=config.model.block_size,
            host_blocks=config.host_blocks,
            disk_blocks=config.disk_blocks,
            disk_filter=config.disk_filter,
            layerwise_onboard=config.layerwise_onboard,
            num_workers=config.num_workers,
            async_store_reads=config.device != "cpu",
            pinned_host_rows=config.device != "cpu",
            layerwise_disk=not config.async_scheduling,
            record_events=record_events,
        )

    def planner(self) -> PlannerConfig:
        """The planner's share of this configuration."""
        return PlannerConfig(
            host_blocks=self.host_blocks,
            disk_blocks=self.disk_blocks,
            disk_filter=self.disk_filter,
            num_workers=self.num_workers,
            pinned_host_rows=self.pinned_host_rows,
            record_events=self.record_events,
        )
