"""Every user-facing knob of kvtier, parsed in one place from one table.

Why this exists: users configure kvtier through vLLM's ``kv_connector_extra_config``, through
``KVTIER_*`` environment variables, or (when they switch from NVIDIA Dynamo) through the
``DYN_KVBM_*`` names they already use. One table (``KNOBS``) lists each knob once with its three
spellings, its parser and its documentation; ``load_settings`` resolves them all and refuses a bad
value at start with a message that names the knob and where the value came from. The reference
table in the docs is generated from ``KNOBS``.

Precedence, highest first: ``kv_connector_extra_config`` key, ``KVTIER_*`` variable, ``DYN_KVBM_*``
variable, the default. Sizes in blocks override sizes in GB, whichever source each came from.
Unknown ``kv_connector_extra_config`` keys are refused (a typo must not silently do nothing).
The knobs themselves are the table ``KNOBS`` in ``kvtier.knobs``. This module imports no torch.

The tier knobs become ``KvTierConfig.from_settings`` (which re-raises a refused field as a
``SettingsError`` naming the knob as given); what is not tier configuration is read from the
settings directly: vLLM-facing switches (``load_failure_policy``, ``cross_layer_blocks``) and
telemetry (``metrics*``, ``events*``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtier.config import blocks_in, require_count
from kvtier.knobs import KNOBS as KNOBS

__all__ = ["KNOBS", "KvTierSettings", "SettingsError", "load_settings"]


class SettingsError(ValueError):
    """A knob has a bad value; the message names the knob and its source."""


@dataclass(frozen=True)
class KvTierSettings:
    """Resolved knobs (see ``KNOBS`` for each one's meaning and spellings)."""

    cpu_cache_gb: float = 0.0
    cpu_cache_blocks: int | None = None
    disk_cache_gb: float = 0.0
    disk_cache_blocks: int | None = None
    disk_dir: str | None = None
    disk_o_direct: bool = True
    disk_filter: bool = True
    layerwise_onboard: bool = False
    cross_layer_blocks: bool = False
    load_failure_policy: str = "recompute"
    io_threads: int = 4
    metrics: bool = False
    metrics_port: int = 6880
    metrics_host: str = "127.0.0.1"
    events: bool = False
    events_endpoint: str = "tcp://127.0.0.1:5557"
    events_replay_endpoint: str | None = None
    events_topic: str = ""
    model_id: str | None = None
    disk_group: str | None = None
    remote_url: str | None = None
    remote_password: str | None = field(default=None, repr=False)
    remote_ttl_s: int = 0
    remote_timeout_ms: int = 100
    remote_max_write_queue_mb: float = 256.0
    onboard_cost_aware: bool = False
    onboard_cost_bias: float = 1.0

    def __post_init__(self) -> None:
        disk_wanted = self.disk_cache_blocks != 0 and (
            self.disk_cache_blocks is not None or self.disk_cache_gb > 0
        )
        if disk_wanted and self.disk_dir is None:
            raise SettingsError(
                "disk_dir (KVTIER_DISK_DIR / DYN_KVBM_DISK_CACHE_DIR) must be set when a disk "
                "cache size is given (disk_cache_gb / disk_cache_blocks)"
            )

    def host_blocks(self, block_bytes: int) -> int:
        """G2 capacity in blocks: the block count if given, else the GB size (decimal GB)."""
        return _blocks(self.cpu_cache_blocks, self.cpu_cache_gb, block_bytes, "cpu_cache")

    def disk_blocks(self, block_bytes: int) -> int:
        """G3 capacity in blocks: the block count if given, else the GB size (decimal GB)."""
        return _blocks(self.disk_cache_blocks, self.disk_cache_gb, block_bytes, "disk_cache")

    def knob_error(self, field: str, problem: str) -> ValueError:
        """``problem`` with the ``KvTierConfig`` field ``field`` as a ``SettingsError`` that names
        the knob which set it, as given (a size: its block count, else its GB knob); a plain
        ``ValueError`` when no knob sets that field (a fact read from vLLM)."""
        size = _SIZE_KNOBS.get(field)
        name = field
        if size is not None:
            name = f"{size}_blocks" if getattr(self, f"{size}_blocks") is not None else f"{size}_gb"
        knob = next((k for k in KNOBS if k.field == name), None)
        if knob is None:
            return ValueError(problem)
        names = " / ".join(n for n in (knob.extra_key, knob.env, knob.dynamo_env) if n)
        verb = "asks for" if size is not None else "is refused:"
        return SettingsError(f"{name}={getattr(self, name)!r} {verb} {problem}; change {names}")


_SIZE_KNOBS = {"host_blocks": "cpu_cache", "disk_blocks": "disk_cache"}
"""The ``KvTierConfig`` sizes and the knob pair (``*_blocks`` over ``*_gb``) that sets each."""


def _blocks(count: int | None, gigabytes: float, block_bytes: int, knob: str) -> int:
    require_count("block_bytes", block_bytes, low=1)
    if count is not None:
        return count
    try:
        return blocks_in(gigabytes, block_bytes)
    except ValueError as exc:
        raise SettingsError(f"{knob}_gb={gigabytes:g}: {exc}") from None


def load_settings(
    extra_config: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> KvTierSettings:
    """Resolve every knob (see the module docstring for precedence); raise ``SettingsError``."""
    env = os.environ if environ is None else environ
    extra = dict(extra_config or {})
    known = {k.extra_key for k in KNOBS}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise SettingsError(
            f"unknown kv_connector_extra_config key(s) {unknown}; known keys: {sorted(known)}"
        )
    values: dict[str, Any] = {}
    for knob in KNOBS:
        invert = False
        if knob.extra_key in extra:
            source, raw = f"kv_connector_extra_config[{knob.extra_key!r}]", extra[knob.extra_key]
        elif env.get(knob.env, "") != "":
            source, raw = knob.env, env[knob.env]
        elif knob.dynamo_env is not None and env.get(knob.dynamo_env, "") != "":
            source, raw, invert = knob.dynamo_env, env[knob.dynamo_env], knob.dynamo_inverted
        else:
            continue
        try:
            value = knob.parse(raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"bad value for {source} ({knob.field}): {exc}") from None
        values[knob.field] = (not value) if invert else value
    return KvTierSettings(**values)
