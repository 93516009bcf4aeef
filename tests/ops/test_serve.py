"""``kvtier serve``: vLLM's OpenAI server with kvtier, on localhost, driven over plain HTTP.

Two servers run the same tiny model: vLLM alone with a G1 big enough for everything (the
reference: it reuses its own cached KV for every repeated prefix), and ``kvtier serve`` with a G1
of one request, so every repeated prefix must come back from kvtier (G2 or G3). The greedy
outputs must be identical token for token, both must report the same cached tokens, and the
metrics of both (kvtier's endpoint, vLLM's /metrics) are scraped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.ops.serve import serve_command
from kvtier.ops.tinymodel import build_tiny_llama

BLOCK = 128
TINY_BLOCK_BYTES = BLOCK * 2 * 2 * 2 * 32 * 4  # tokens x layers x K/V x kv heads x dim x fp32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31 + (i * i) % 97 + seed * i) % 1000 + 3 for i in range(length)]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def _complete(port: int, prompt: list[int]) -> tuple[list[int], int]:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        got = json.loads(resp.read())
    details = got["usage"].get("prompt_tokens_details") or {}
    return list(got["choices"][0]["token_ids"]), int(details.get("cached_tokens") or 0)


def _samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k in ("tier", "path")}
            key = s.name + "".join(f"[{v}]" for v in labels.values())
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


class _Server:
    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port, self.log_path = port, log
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                _get(f"http://127.0.0.1:{self.port}/health")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise AssertionError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[_Server, _Server, int]]:
    model = build_tiny_llama(tmp_path / "model")
    common = ["--served-model-name", "tiny", "--skip-tokenizer-init", "--enforce-eager"]
    common += ["--dtype", "float32", "--seed", "0", "--max-model-len", "768", "--host", "127.0.0.1"]
    common += ["--enable-prompt-tokens-details", "--max-num-seqs", "4"]
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    ref_port, kv_port, metrics_port = _free_port(), _free_port(), _free_port()
    ref_argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    ref_argv += [*common, "--port", str(ref_port)]
    ref_argv += ["--kv-cache-memory-bytes", str(64 * TINY_BLOCK_BYTES)]
    knobs = json.dumps({"metrics": True, "metrics_port": metrics_port, "disk_filter": False})
    kv_argv = [sys.executable, "-m", "kvtier.ops.cli", "serve", str(model), *common]
    kv_argv += ["--port", str(kv_port), "--kv-cache-memory-bytes", str(7 * TINY_BLOCK_BYTES)]
    kv_argv += ["--cpu-cache-gb", "0.0008", "--disk-cache-gb", "0.05", "--disk-dir"]
    kv_argv += [str(tmp_path / "g3"), "--kvtier-config", knobs]
    ref = _Server(ref_argv, env, ref_port, tmp_path / "ref.log")
    kv = _Server(kv_argv, env, kv_port, tmp_path / "kvtier.log")
    try:
        deadline = time.monotonic() + 400
        ref.wait_ready(deadline)
        kv.wait_ready(deadline)
        yield ref, kv, metrics_port
    finally:
        kv.stop()
        ref.stop()


@pytest.mark.vllm
@pytest.mark.slow
def test_kvtier_serve_outputs_equal_vllm_alone_and_metrics_are_scraped(
    servers: tuple[_Server, _Server, int],
) -> None:
    ref, kv, metrics_port = servers
    docs = [_prompt(s, 3 * BLOCK) for s in range(3)]
    requests = [d + _prompt(50 + i, 40) for i, d in enumerate(docs)]
    requests += [d + _prompt(90 + i, 70) for i, d in enumerate(docs)]  # same documents again
    for n, prompt in enumerate(requests):
        want, ref_cached = _complete(ref.port, prompt)
        got, kv_cached = _complete(kv.port, prompt)
        assert got == want, f"request {n}: kvtier {got} != vLLM alone {want}"
        assert kv_cached == ref_cached == (3 * BLOCK if n >= 3 else 0), n
    kvtier = _samples(_get(f"http://127.0.0.1:{metrics_port}/metrics"))
    vllm = _samples(_get(f"http://127.0.0.1:{kv.port}/metrics"))
    matched = (
        kvtier["kvtier_matched_tokens_total[host]"] + kvtier["kvtier_matched_tokens_total[disk]"]
    )
    assert matched == 3 * 3 * BLOCK  # every repeated document came back from kvtier
    assert kvtier["kvtier_blocks_total[device_to_host]"] >= 9
    assert vllm["vllm:external_prefix_cache_hits_total"] == matched
    looked = kvtier["kvtier_lookup_tokens_total"]
    assert looked == vllm["vllm:external_prefix_cache_queries_total"]


def test_serve_command_for_either_build(tmp_path: Path) -> None:
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": ""}
    cpu = serve_command(
        "m", ["--port", "9", "--cpu-cache-gb=2"], env, vllm_cli=False, cpu_build=True
    )
    assert cpu.argv[1:5] == ("-m", "vllm.entrypoints.openai.api_server", "--model", "m")
    assert cpu.env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    kv = json.loads(cpu.argv[cpu.argv.index("--kv-transfer-config") + 1])
    assert (
        kv["kv_connector"] == "KvTierConnector" and kv["kv_connector_module_path"] == "kvtier.vllm"
    )
    assert kv["kv_connector_extra_config"] == {"cpu_cache_gb": "2"}
    assert cpu.argv[-2:] == ("--port", "9")
    gpu = serve_command(
        "m", ["--cpu-cache-gb", "2", "-tp", "2"], {}, vllm_cli=True, cpu_build=False
    )
    assert gpu.argv[1:5] == ("-m", "vllm.entrypoints.cli.main", "serve", "m") and gpu.env == {}
    tp = serve_command(
        "m", ["--cpu-cache-gb", "2", "--tensor-parallel-size=2"], {}, vllm_cli=True, cpu_build=True
    )
    assert tp.env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}
    kept = serve_command(
        "m",
        ["--cpu-cache-gb", "2"],
        {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
        vllm_cli=False,
        cpu_build=True,
    )
    assert kept.env == {}  # the user's own setting wins


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], "no kvtier tier is sized"),
        (["--cpu-cache-gb", "1e300"], "cpu_cache_gb"),
        (["--disk-cache-gb", "1"], "disk_dir"),
        (["--cpu-cache-gb"], "needs a value"),
        (["--kvtier-config", "{oops"], "not JSON"),
        (["--kvtier-config", '{"cpu_cache_gbs": 1}'], "cpu_cache_gbs"),
        (["--cpu-cache-gb", "1", "--kv-transfer-config", "{}"], "writes --kv-transfer-config"),
    ],
)
def test_serve_refuses_bad_input_before_starting_anything(args: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        serve_command("m", args, {}, vllm_cli=False, cpu_build=True)
