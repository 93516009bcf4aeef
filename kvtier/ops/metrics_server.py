"""``MetricsServer``: one ``KvTierMetrics`` over HTTP (``GET /metrics``), and ``MetricsConfig``.

Why apart: serving is a life cycle (``start()`` binds, ``close()`` frees the port); what is
measured is ``kvtier.ops.metrics``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from kvtier.lifecycle import Lifecycle

if TYPE_CHECKING:
    from kvtier.ops.metrics import KvTierMetrics


@dataclass(frozen=True)
class MetricsConfig:
    """Whether and where metrics are served.

    ``host`` defaults to localhost: exposing the endpoint beyond the machine is a deliberate
    choice (``0.0.0.0``). ``port`` 0 picks a free port (see :attr:`MetricsServer.port`).
    ``hit_rate_window_s`` is the span of the sliding window behind ``kvtier_hit_rate``.
    """

    enabled: bool = False
    port: int = 6880
    host: str = "127.0.0.1"
    hit_rate_window_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"metrics port must be an int, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.port}")
        if not self.host:
            raise ValueError("metrics host must not be empty")
        if not self.hit_rate_window_s > 0:
            raise ValueError(f"hit_rate_window_s must be > 0, got {self.hit_rate_window_s!r}")


class MetricsServer(Lifecycle):
    """Serves one :class:`KvTierMetrics` over HTTP (``GET /metrics``) on a background thread."""

    def __init__(self, metrics: KvTierMetrics, config: MetricsConfig) -> None:
        self._metrics = metrics
        self._config = config
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when the configured port was 0)."""
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Where to scrape."""
        return f"http://{self._config.host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Bind and serve. Raises OSError naming the address when the port is taken."""
        if self._server is not None:
            raise RuntimeError("MetricsServer is already started")
        try:
            server, thread = start_http_server(
                self._config.port, addr=self._config.host, registry=self._metrics.registry
            )
        except OSError as exc:
            raise OSError(
                f"cannot serve kvtier metrics on {self._config.host}:{self._config.port}: {exc}"
            ) from exc
        self._server, self._thread = server, thread
        return self

    def close(self) -> None:
        """Stop serving and free the port. Safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None
