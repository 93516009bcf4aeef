"""Throwaway local ``redis-server`` processes: one node, or a cluster of N masters.

Why this exists: G4's tests and benchmarks run against real servers, started on free localhost
ports in a private directory and stopped afterwards, never a system service. ``LocalRedis`` is one
server (``kill()`` and ``start()`` again on the same port simulate a crash and a restart);
``LocalRedisCluster`` starts N cluster-enabled nodes and joins them with
``redis-cli --cluster create``. Both bind 127.0.0.1 only and persist nothing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from kvtier.lifecycle import Lifecycle

__all__ = ["LocalRedis", "LocalRedisCluster", "free_port", "redis_available"]


def redis_available() -> str | None:
    """None if redis-server and redis-cli are installed, else why not (a skip reason)."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install redis-server)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (and its cluster bus port + 10000 too, if possible)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.stdout.strip()


class LocalRedis(Lifecycle):
    """One ``redis-server`` on ``port`` (a free one if None), data in a temporary directory."""

    def __init__(
        self,
        port: int | None = None,
        *,
        maxmemory_mb: int = 512,
        policy: str = "allkeys-lru",
        cluster: bool = False,
        password: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.port = port
        self.maxmemory_mb = maxmemory_mb
        self.policy = policy
        self.cluster = cluster
        self.password = password
        self._workdir = workdir
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        if self.port is None:
            self.port = free_port()
        if self._workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="kvtier-redis-")
            self._workdir = Path(self._own_dir.name)
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self._workdir),
            "--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", self.policy,
            "--enable-debug-command", "local", "--daemonize", "no",
            "--logfile", str(self._workdir / f"redis-{self.port}.log"),
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.cluster:
            conf = self._workdir / f"nodes-{self.port}.conf"
            conf.unlink(missing_ok=True)
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(conf)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def cli(self, *args: str) -> str:
        """Run ``redis-cli`` against this server (with its password)."""
        assert self.port is not None
        auth = ("-a", self.password, "--no-auth-warning") if self.password else ()
        return _cli(self.port, *auth, *args)

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def sleep(self, seconds: float) -> threading.Thread:
        """Make the server unresponsive for ``seconds`` (``DEBUG SLEEP`` on a thread); returns
        once it is asleep (a PING no longer answers within 20 ms). Join the thread after."""
        assert self.port is not None
        thread = threading.Thread(target=self.cli, args=("DEBUG", "SLEEP", str(seconds)))
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.settimeout(0.02)
                s.sendall(b"PING\r\n")
                try:
                    s.recv(16)
                except TimeoutError:
                    return thread
            time.sleep(0.01)
        raise RuntimeError("DEBUG SLEEP did not take effect")

    def kill(self) -> None:
        """SIGKILL the server (a crash); ``start()`` brings it back on the same port, empty."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None
            self._workdir = None


class LocalRedisCluster(Lifecycle):
    """``masters`` cluster-enabled servers joined into one cluster (no replicas)."""

    def __init__(self, masters: int = 3, *, maxmemory_mb: int = 256) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.nodes = [LocalRedis(maxmemory_mb=maxmemory_mb, cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> LocalRedisCluster:
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            out = subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                 "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            deadline = time.monotonic() + 30
            while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
