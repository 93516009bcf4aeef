"""``KvTierConnector``: kvtier as a vLLM V1 KV connector (``KVConnectorBase_V1``).

Why this exists: this is how people use kvtier. vLLM builds this class once with role SCHEDULER
(in the engine-core process) and once per worker with role WORKER (in the same process for the
in-process engine, in separate processes for the multi-process one). Each role delegates to its
half: ``KvTierScheduler`` (no torch; owns the G2/G3 index and plans every copy) or
``KvTierWorker`` (owns the bytes; executes the plan). They talk only through vLLM's channels: the
connector metadata (scheduler -> workers, a ``StepPlan``) and the worker metadata / finished sets /
load errors (workers -> scheduler), so the design is the same in both process models.

Load it with::

    --kv-transfer-config '{"kv_connector":"KvTierConnector",
      "kv_connector_module_path":"kvtier.vllm","kv_role":"kv_both","kv_connector_extra_config":{"cpu_cache_gb":4,"disk_cache_gb":100,
      "disk_dir":"/path"}}'

Knobs: ``kvtier.settings`` (extra-config keys, ``KVTIER_*`` and Dynamo ``DYN_KVBM_*`` variables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

try:  # vLLM >= 0.32; 0.26 has no cache hit sources (and never asks for them)
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - exercised on the GPU build (vLLM 0.26)
    CacheHitSource = None  # type: ignore[assignment,misc]

from kvtier.config import KvTierConfig, ModelConfig
from kvtier.executor.jobs import StepPlan, WorkerReport
from kvtier.settings import KvTierSettings, load_settings
from kvtier.storage.identity import ModelIdentity
from kvtier.vllm.onboard import OnboardAdvisor
from kvtier.vllm.remote_plan import RemotePlanner
from kvtier.vllm.scheduler import KvTierScheduler, SchedulerConfig
from kvtier.vllm.telemetry import ConnectorTelemetry

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvtier.vllm.worker import KvTierWorker

__all__ = ["KvTierConnector", "KvTierConnectorMetadata", "KvTierWorkerMetadata"]


class KvTierConnectorMetadata(KVConnectorMetadata):
    """vLLM's wrapper around one step's ``StepPlan`` (plain data)."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KvTierWorkerMetadata(KVConnectorWorkerMetadata):
    """vLLM's wrapper around the workers' ``WorkerReport``s of one step (plain data), with the
    id of the step they ran (-1: none bound), so the scheduler half times that step."""

    def __init__(self, reports: list[WorkerReport], step: int = -1) -> None:
        self.reports = reports
        self.step = step

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, KvTierWorkerMetadata):
            raise TypeError(f"cannot aggregate kvtier worker metadata with {type(other).__name__}")
        return KvTierWorkerMetadata(self.reports + other.reports, max(self.step, other.step))


def model_config_from(kv_cache_config: KVCacheConfig) -> ModelConfig:
    """The KV geometry of one rank, from vLLM's KV cache config (one attention group only)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"kvtier supports models with one KV cache group (full attention); this model has "
            f"{len(groups)}"
        )
    spec: Any = groups[0].kv_cache_spec
    dtype = str(spec.dtype).removeprefix("torch.")
    outer = 1 if type(spec).__name__ == "MLAAttentionSpec" else 2
    model = ModelConfig(
        num_layers=len(groups[0].layer_names),
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=dtype,
        outer_dim=outer,
    )
    if model.layer_block_bytes != spec.page_size_bytes:
        raise ValueError(
            f"vLLM's KV page is {spec.page_size_bytes} bytes per layer, kvtier computes "
            f"{model.layer_block_bytes} for {model}; padded pages are not supported"
        )
    return model


def _backend_name(vllm_config: Any, kv_caches: dict[str, torch.Tensor]) -> str:
    """The attention backend of the first KV layer, for error messages ("" when unknown)."""
    try:
        ctx = vllm_config.compilation_config.static_forward_context
        layer = ctx[next(iter(kv_caches))]
        return str(layer.attn_backend.get_name())
    except Exception:  # best effort: only used to name the backend in a refusal
        return ""


class KvTierConnector(KVConnectorBase_V1):
    """kvtier's vLLM V1 connector (see the module docstring)."""

    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.settings: KvTierSettings = load_settings(extra)
        world = vllm_config.parallel_config.world_size
        rank, identity = 0, None
        if role != KVConnectorRole.SCHEDULER:
            if world > 1:
                from vllm.distributed.parallel_state import get_world_group

                rank = get_world_group().rank_in_group
            identity = ModelIdentity.from_vllm_config(  # G3 and G4 never serve another model
                vllm_config, tp_rank=rank, tp_size=world, model_id=self.settings.model_id
            )
        self.config = cfg = KvTierConfig.from_settings(
            self.settings,
            model_config_from(kv_cache_config),
            num_workers=world,
            rank=rank,
            on_cuda=str(getattr(vllm_config.device_config, "device_type", "")) == "cuda",
            async_scheduling=bool(getattr(vllm_config.scheduler_config, "async_scheduling", False)),
            model_identity=identity,
        )
        self.model = cfg.model
        self.scheduler: KvTierScheduler | None = None
        self.worker: KvTierWorker | None = None
        self.telemetry: ConnectorTelemetry | None = None
        if role == KVConnectorRole.SCHEDULER:
            # A failed kvtier load is a cache miss: vLLM recomputes unless told to fail.
            self._kv_transfer_config.kv_load_failure_policy = (
                self.settings.load_failure_policy  # type: ignore[assignment]
            )
            # G4: the scheduler half's batched lookups (kvtier.vllm.remote_plan), when configured.
            remote = None
            if cfg.remote is not None:
                remote = RemotePlanner(cfg.remote, num_workers=cfg.num_workers).start()
            self.scheduler = KvTierScheduler(
                SchedulerConfig.from_config(cfg, record_events=self.settings.events),
                remote=remote,
                # Cost-aware onboarding (kvtier.vllm.onboard): always measuring, so per-request
                # overrides work; deciding only when the knob is on.
                onboard=OnboardAdvisor(cfg.onboard_cost, enabled=cfg.onboard_cost_aware),
            )
            # Metrics and KV events: beside the scheduler half, up with the engine (telemetry.py).
            self.telemetry = ConnectorTelemetry(
                self.settings,
                self.scheduler,
                block_bytes=self.model.block_bytes,
                data_parallel_rank=vllm_config.parallel_config.data_parallel_rank,
            ).start()
        else:
            from kvtier.vllm.worker import KvTierWorker, WorkerConfig

            self.worker = KvTierWorker(WorkerConfig.from_config(cfg))

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layer-wise onboarding waits between layers: CUDA graphs must leave those gaps.
        return load_settings(extra_config).layerwise_onboard

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped store is a future miss, never a lost result.
        return False

    # -- worker side ----------------------------------------------------------------------------

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        # vLLM 0.26 (GPU) only: one dense region per block across all layers, when asked for.
        return self.settings.cross_layer_blocks

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker is not None:
            self.worker.register_kv_caches(
                kv_caches, self.model, backend=_backend_name(self._vllm_config, kv_caches)
            )
            self._attach_remote()

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any) -> None:
        """vLLM 0.26: the cross-layer tensor ``(num_blocks, ...)`` in memory order (see
        ``kvtier.storage.layout``), handed over instead of ``register_kv_caches``."""
        if self.worker is not None:
            name = getattr(attn_backend, "get_name", lambda: type(attn_backend).__name__)()
            self.worker.register_kv_caches(kv_cache, self.model, backend=str(name))
            self._attach_remote()

    def _attach_remote(self) -> None:
        """G4 (kvtier.executor.remote), keyed by the layout, when configured."""
        if self.config.remote is not None and self.worker is not None:
            from kvtier.vllm.worker import attach_remote

            attach_remote(self.worker, self.config)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            if not isinstance(connector_metadata, KvTierConnectorMetadata):
                raise TypeError(f"expected kvtier metadata, got {type(connector_metadata)}")
            self.worker.bind(connector_metadata.plan)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self.worker is not None:
            self.worker.clear()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.worker is not None:
            self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Stores copy whole blocks after the pass in wait_for_save (see KvTierWorker).
        return

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        return self.worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker is None:
            return set()
        return self.worker.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.worker is None:
            return None
        report = self.worker.take_report()
        # Sent every step, even empty: vLLM calls update_connector_output only for outputs that
        # carry something, and the scheduler half times each step (kvtier.vllm.onboard).
        meta = getattr(self, "_connector_metadata", None)  # vLLM's base class: the bound plan
        step = meta.plan.step if isinstance(meta, KvTierConnectorMetadata) else -1
        return KvTierWorkerMetadata([] if report is None else [report], step)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.scheduler is not None and self.scheduler.remote is not None:
            self.scheduler.remote.close()

    # -- scheduler side -------------------------------------------------------------------------

    def _sched(self) -> KvTierScheduler:
        if self.scheduler is None:
            raise RuntimeError("KvTierConnector: scheduler-side call on a worker connector")
        return self.scheduler

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else []
        self._sched().update_state_after_alloc(request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        host, disk = self._sched().external_hit_split(request.request_id)
        if host + disk != num_external_tokens:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        out = {CacheHitSource.HOST: host, CacheHitSource.DISK: disk}
        return {k: v for k, v in out.items() if v}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        cached = scheduler_output.scheduled_cached_reqs
        new = [
            (r.req_id, r.block_ids[0] if r.block_ids else [], r.num_computed_tokens)
            for r in scheduler_output.scheduled_new_reqs
        ]
        resumed = cached.resumed_req_ids
        cached_rows = [
            (rid, ids[0] if ids else None, computed, rid in resumed)
            for rid, ids, computed in zip(
                cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
            )
        ]
        # The blocks' tokens (for KV events) stay in this process: the plan goes to every worker.
        tel = self.telemetry
        tokens: dict[int, tuple[int, ...]] | None = {} if tel and tel.wants_tokens else None
        plan = self._sched().build_step_plan(
            new,
            cached_rows,
            scheduler_output.num_scheduled_tokens,
            idle=scheduler_output.total_num_scheduled_tokens == 0,
            block_tokens=tokens,
        )
        if tel is not None:
            tel.on_plan(plan, tokens)
        return KvTierConnectorMetadata(plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        sched = self._sched()
        meta = connector_output.kv_connector_worker_meta
        reports = meta.reports if isinstance(meta, KvTierWorkerMetadata) else []
        if reports:
            sched.process_reports(reports)
        if sched.onboard is not None:
            if isinstance(meta, KvTierWorkerMetadata) and meta.step >= 0:
                sched.onboard.step_done(meta.step)  # that step's output came back
            if self.telemetry is not None:
                self.telemetry.on_onboard(sched.onboard)
        if self.telemetry is not None:
            self.telemetry.on_reports(reports)
        if connector_output.finished_sending:
            sched.finished_sending(connector_output.finished_sending)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request), None

    def reset_cache(self) -> bool | None:
        """vLLM's connector cache reset, called only by ``reset_prefix_cache(reset_connector=True)``
        (a plain ``reset_prefix_cache()`` empties G1 alone, and kvtier keeps G2/G3): drop
        everything G2 and G3 hold. False while kvtier has copies in flight (retry when idle)."""
        if self.scheduler is None:
            return None
        ok = self.scheduler.reset()
        if ok and self.telemetry is not None:
            self.telemetry.on_reset()
        return ok

    def has_pending_push_work(self) -> bool:
        # Keep the engine stepping until in-flight stores and loads have been reported, so the
        # G2/G3 index is current and nothing stays pinned while the engine is idle.
        return self.scheduler is not None and self.scheduler.has_pending_work()
