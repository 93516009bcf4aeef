"""A Redis server behind a slow link, made slow for real: a network namespace, a veth pair
shaped with ``tc tbf``, and a delaying TCP proxy (this kernel has no ``netem``).

Why this exists: the cost-aware onboarding benchmark needs a G4 tier whose bandwidth and latency
are those of a network, not a sleep inside kvtier. Needs root (``ip netns``, ``tc``) and
``redis-server``. Everything it creates (namespace, veth pair, processes) is removed on exit.

The proxy (``python benchmarks/netshape.py proxy LISTEN_PORT HOST PORT``) forwards each chunk it
reads after ``delay`` seconds in each direction without holding the next chunk back (latency,
not throughput); SIGUSR1 sets the delay to the value given at start, SIGUSR2 to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

NS = "kvt13"
HOST_IF, NS_IF = "kvt13a", "kvt13b"
HOST_IP, NS_IP = "10.213.13.1", "10.213.13.2"


def _sh(*args: str, ns: bool = False) -> None:
    cmd = (["ip", "netns", "exec", NS] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class ShapedRedis:
    """A running Redis in ``NS`` and the proxy in front of it: connect to ``url``."""

    url: str
    rate_mbit: int
    delay_ms: float
    proxy: subprocess.Popen[bytes]
    shaped: bool = False

    def shape(self, on: bool) -> None:
        """Turn the link shaping (rate both ways, proxy delay) on or off."""
        for dev, ns in ((NS_IF, True), (HOST_IF, False)):
            with contextlib.suppress(subprocess.CalledProcessError):
                _sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns)
            if on:
                rate = f"{self.rate_mbit}mbit"
                _sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "64kb", "latency", "400ms", ns=ns)  # fmt: skip
        self.proxy.send_signal(signal.SIGUSR1 if on else signal.SIGUSR2)
        self.shaped = on
        time.sleep(0.1)


@contextlib.contextmanager
def shaped_redis(rate_mbit: int, delay_ms: float) -> Iterator[ShapedRedis]:
    """Namespace + veth + redis-server + proxy; torn down on exit."""
    if os.geteuid() != 0 or not shutil.which("redis-server") or not shutil.which("tc"):
        raise SystemExit("netshape: needs root, tc and redis-server")
    with contextlib.suppress(subprocess.CalledProcessError):
        _sh("ip", "netns", "del", NS)  # a leftover of a killed run
    redis: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None
    try:
        _sh("ip", "netns", "add", NS)
        _sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        _sh("ip", "link", "set", NS_IF, "netns", NS)
        _sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        _sh("ip", "link", "set", HOST_IF, "up")
        _sh("ip", "addr", "add", f"{NS_IP}/30", "dev", NS_IF, ns=True)
        _sh("ip", "link", "set", NS_IF, "up", ns=True)
        _sh("ip", "link", "set", "lo", "up", ns=True)
        port = 6390
        redis = subprocess.Popen(
            ["ip", "netns", "exec", NS, "redis-server", "--port", str(port), "--bind", NS_IP,
             "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(NS_IP, port)
        listen = _free_port()
        proxy = subprocess.Popen(
            [sys.executable, __file__, "proxy", str(listen), NS_IP, str(port), str(delay_ms)]
        )
        _wait_port("127.0.0.1", listen)
        yield ShapedRedis(f"redis://127.0.0.1:{listen}/0", rate_mbit, delay_ms, proxy)
    finally:
        for p in (proxy, redis):
            if p is not None and p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        with contextlib.suppress(subprocess.CalledProcessError):
            _sh("ip", "netns", "del", NS)  # removes the veth pair with it


# -- the delaying proxy (a child process) ---------------------------------------------------------


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: list[float]
) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(send())
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(1 << 20):
            queue.put_nowait((loop.time() + delay[0], data))
    finally:
        queue.put_nowait((0.0, b""))
        await task


async def _proxy(listen: int, host: str, port: int, delay_s: float) -> None:
    delay = [0.0]
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: delay.__setitem__(0, delay_s))
    loop.add_signal_handler(signal.SIGUSR2, lambda: delay.__setitem__(0, 0.0))

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(host, port)
        for s in (cw, sw):
            sock = s.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(ConnectionError):
            await asyncio.gather(_pump(cr, sw, delay), _pump(sr, cw, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "proxy":
    asyncio.run(_proxy(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) / 1e3))
