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

Adding a knob: add a field to ``KvTierSettings`` and a ``Knob`` row to ``KNOBS`` naming that field.
This module imports no torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtier.config import blocks_in, require_count

__all__ = [
    "KNOBS",
    "Knob",
    "KvTierSettings",
    "SettingsError",
    "load_settings",
]


class SettingsError(ValueError):
    """A knob has a bad value; the message names the knob and its source."""


def _parse_gb(text: object) -> float:
    if isinstance(text, bool):
        raise ValueError("expected a number of GB, got a boolean")
    value = float(text) if isinstance(text, int | float) else float(str(text).strip())
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a finite number of GB >= 0, got {text!r}")
    if value > MAX_CACHE_GB:
        raise ValueError(f"{text!r} GB is more than any machine holds (at most {MAX_CACHE_GB:g})")
    return value


MAX_CACHE_GB = 1e9
"""Largest cache size a GB knob accepts (an exabyte): anything above is a typo or an overflow."""


def _parse_count(text: object) -> int:
    if isinstance(text, bool):
        raise ValueError("expected a whole number, got a boolean")
    if isinstance(text, float):
        if not text.is_integer():
            raise ValueError(f"expected a whole number, got {text!r}")
        text = int(text)
    value = text if isinstance(text, int) else int(str(text).strip())
    if value < 0:
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return value


def _parse_positive(text: object) -> int:
    value = _parse_count(text)
    if value == 0:
        raise ValueError("expected a whole number >= 1, got 0")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(text: object) -> bool:
    if isinstance(text, bool):
        return text
    if isinstance(text, int) and text in (0, 1):
        return bool(text)
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected one of 1/0, true/false, yes/no, on/off, got {text!r}")


def _parse_dir(text: object) -> str:
    if not isinstance(text, str | os.PathLike):
        raise ValueError(f"expected a directory path, got {type(text).__name__}")
    path = os.fspath(text).strip()
    if not path:
        raise ValueError("expected a directory path, got an empty string")
    return path


def _parse_name(text: object) -> str:
    """A non-empty name on one line (a model id, a group name)."""
    if not isinstance(text, str) or not text.strip() or "\n" in text:
        raise ValueError(f"expected a non-empty name on one line, got {text!r}")
    return text.strip()


def _parse_policy(text: object) -> str:
    word = str(text).strip().lower()
    if word not in ("recompute", "fail"):
        raise ValueError(f"expected 'recompute' or 'fail', got {text!r}")
    return word


def _parse_port(text: object) -> int:
    value = _parse_count(text)
    if value > 65535:
        raise ValueError(f"expected a TCP port 0..65535, got {text!r}")
    return value


def _parse_host(text: object) -> str:
    host = str(text).strip()
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"expected a host name or IP address, got {text!r}")
    return host


def _parse_zmq_endpoint(text: object) -> str:
    url = str(text).strip()
    if not url.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"expected a tcp://, ipc:// or inproc:// ZMQ endpoint, got {text!r}")
    return url


def _parse_topic(text: object) -> str:
    return str(text)


# -- G4 (remote tier) knobs -----------------------------------------------------------------------


def _parse_remote_url(text: object) -> str:
    from kvtier.storage.remote import parse_remote_url  # imported here: settings loads no redis

    url = str(text).strip()
    parse_remote_url(url)
    return url


def _parse_secret(text: object) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    return text


def _parse_mb(text: object) -> float:
    return _parse_gb(text)  # same rules: a finite number >= 0


# -- cost-aware onboarding knobs (kvtier.core.onboard_cost) ---------------------------------------


def _parse_bias(text: object) -> float:
    if isinstance(text, bool):
        raise ValueError("expected a positive number, got a boolean")
    value = float(text) if isinstance(text, int | float) else float(str(text).strip())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a finite number > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class Knob:
    """One knob: the settings field it fills and its three spellings (the field's name as the
    extra-config key, ``KVTIER_<FIELD>``, and Dynamo's name where it has one).

    ``dynamo_inverted``: the Dynamo variable means the opposite (``DYN_KVBM_DISABLE_...=1`` sets
    the kvtier knob to False).
    """

    field: str
    parse: Callable[[object], Any]
    doc: str
    dynamo_env: str | None = None
    dynamo_inverted: bool = False

    @property
    def extra_key(self) -> str:
        """Its ``kv_connector_extra_config`` key: the field's name."""
        return self.field

    @property
    def env(self) -> str:
        """Its environment variable: ``KVTIER_`` and the field's name in capitals."""
        return "KVTIER_" + self.field.upper()


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


KNOBS: tuple[Knob, ...] = (
    Knob(
        "cpu_cache_gb",
        _parse_gb,
        "G2 host cache size in decimal GB (0 = no host tier).",
        "DYN_KVBM_CPU_CACHE_GB",
    ),
    Knob(
        "cpu_cache_blocks",
        _parse_count,
        "G2 host cache size in blocks; overrides cpu_cache_gb.",
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS",
    ),
    Knob(
        "disk_cache_gb",
        _parse_gb,
        "G3 disk cache size in decimal GB (0 = no disk tier).",
        "DYN_KVBM_DISK_CACHE_GB",
    ),
    Knob(
        "disk_cache_blocks",
        _parse_count,
        "G3 disk cache size in blocks; overrides disk_cache_gb.",
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
    ),
    Knob(
        "disk_dir",
        _parse_dir,
        "Directory of the G3 disk cache (created if missing; reused across restarts).",
        "DYN_KVBM_DISK_CACHE_DIR",
    ),
    Knob(
        "disk_o_direct",
        _parse_bool,
        "Read and write G3 block files with O_DIRECT where the filesystem allows it.",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT",
        dynamo_inverted=True,
    ),
    Knob(
        "disk_filter",
        _parse_bool,
        "Copy a block from G2 to G3 only once it has been seen twice (frequency filter; "
        "protects SSD lifetime). False writes every G2 block through to G3.",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER",
        dynamo_inverted=True,
    ),
    Knob(
        "layerwise_onboard",
        _parse_bool,
        "Onboard inside the forward pass, layer by layer (layer i's attention waits only for "
        "layer i). False: onboard asynchronously before the request is scheduled.",
    ),
    Knob(
        "load_failure_policy",
        _parse_policy,
        "What vLLM does with a block kvtier failed to load: 'recompute' (default; a cache miss "
        "is never fatal) or 'fail' the request. Sets vLLM's kv_load_failure_policy.",
    ),
    Knob(
        "cross_layer_blocks",
        _parse_bool,
        "Ask vLLM (0.26, GPU) for one KV tensor whose blocks span every layer "
        "(prefer_cross_layer_blocks): one DMA per block, but all layers of a load land "
        "together. Ignored by vLLM versions without it.",
    ),
    Knob(
        "io_threads",
        _parse_positive,
        "Threads doing G3 disk reads and writes in each worker.",
    ),
    Knob(
        "metrics",
        _parse_bool,
        "Serve Prometheus metrics over HTTP from the engine-core process (where the scheduler "
        "half and its counters live).",
        "DYN_KVBM_METRICS",
    ),
    Knob(
        "metrics_port",
        _parse_port,
        "TCP port of the metrics endpoint (GET /metrics); 0 picks a free port.",
        "DYN_KVBM_METRICS_PORT",
    ),
    Knob(
        "metrics_host",
        _parse_host,
        "Address the metrics endpoint binds; the default serves this machine only, 0.0.0.0 "
        "serves every interface.",
    ),
    Knob(
        "events",
        _parse_bool,
        "Publish KV events (vLLM's wire format: BlockStored/BlockRemoved, medium CPU for G2 and "
        "DISK for G3) on a ZMQ PUB socket for cache-aware routers.",
    ),
    Knob(
        "events_endpoint",
        _parse_zmq_endpoint,
        "ZMQ endpoint the event publisher binds (localhost only by default; tcp://*:5557 opens "
        "it to other hosts).",
    ),
    Knob(
        "events_replay_endpoint",
        _parse_zmq_endpoint,
        "Optional ZMQ ROUTER endpoint answering replay requests for missed event batches "
        "(unset: no replay).",
    ),
    Knob(
        "events_topic",
        _parse_topic,
        "Topic frame of every published event batch (empty by default, as in vLLM).",
    ),
    Knob(
        "model_id",
        _parse_name,
        "Name of the model's KV key space in G3 (and G4), replacing the model path, revision "
        "and weights digest read from vLLM: engines given the same model_id share blocks, "
        "different ones never do. dtype, layout and tensor-parallel rank/size stay in the key.",
    ),
    Knob(
        "disk_group",
        _parse_name,
        "Unix group that may share the G3 directory: folders 2770 and files 0660 with that "
        "group (unset: owner-only, 0700 / 0600).",
    ),
    Knob(
        "remote_url",
        _parse_remote_url,
        "G4 remote tier shared by a fleet of engines: redis://host:port/db (one Redis/Valkey "
        "server), rediss://... (TLS), redis+cluster://host:port (any node of a cluster; "
        "rediss+cluster:// with TLS). Unset: no G4.",
    ),
    Knob(
        "remote_password",
        _parse_secret,
        "Password (AUTH) of the G4 server; overrides one in remote_url. Never logged.",
    ),
    Knob(
        "remote_ttl_s",
        _parse_count,
        "Expiry of every block written to G4, in seconds (0: none; the server's maxmemory "
        "policy evicts).",
    ),
    Knob(
        "remote_timeout_ms",
        _parse_positive,
        "Socket timeout of every G4 call, and the most one engine step waits for G4 lookups "
        "(all requests together); slower answers are misses. Consecutive failures open a "
        "circuit breaker that skips G4 (G2/G3 keep serving) and probes it again after 2 s.",
    ),
    Knob(
        "remote_max_write_queue_mb",
        _parse_mb,
        "Bytes (decimal MB) of blocks waiting to be written behind to G4 in each worker; a block "
        "that does not fit, or waited longer than 5 s, is dropped and counted, never waited for.",
    ),
    Knob(
        "onboard_cost_aware",
        _parse_bool,
        "Load only the part of a matched prefix that beats recomputing it, from live "
        "measurements of each tier's bandwidth, latency and queue and of the engine's prefill "
        "(kvtier.core.onboard_cost); off: load everything matched. Per request, "
        'kv_transfer_params {"kvtier_onboard": "auto"|"load"|"recompute", '
        '"kvtier_load_tokens": N} overrides it.',
    ),
    Knob(
        "onboard_cost_bias",
        _parse_bias,
        "Factor on every estimated load time in that decision: > 1 leans towards recompute, "
        "< 1 towards loading.",
    ),
)


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
        if knob.extra_key in extra:
            source, raw, invert = (
                f"kv_connector_extra_config[{knob.extra_key!r}]",
                extra[knob.extra_key],
                False,
            )
        elif env.get(knob.env, "") != "":
            source, raw, invert = knob.env, env[knob.env], False
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
