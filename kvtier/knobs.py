"""The knob table: every user-facing knob once, with its three spellings, parser and doc.

Why apart from ``kvtier.settings`` (which resolves them, and whose names these import from too):
the table is data, and the reference table in the docs is generated from it. Adding a knob: a
field on ``KvTierSettings`` and a ``Knob`` row here naming that field. No torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KNOBS", "MAX_CACHE_GB", "Knob"]


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
    Knob("io_threads", _parse_positive, "Threads doing G3 disk reads and writes in each worker."),
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
        str,
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
        _parse_gb,  # same rules for MB: a finite number >= 0
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
