"""Run the frontend app under uvicorn on a loopback port, in a background thread or in the foreground."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from orchestrator.core.types import TandemError


class ServerStartError(TandemError):
    """The HTTP server did not come up (port taken, app failed to start)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on host (racy by nature; fine for tests and demos on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """uvicorn in a daemon thread with its own event loop. `start()` returns once it accepts."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                      lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._server.serve())

    def start(self, timeout_s: float = 20.0) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="tandem-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError(f"HTTP server did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
