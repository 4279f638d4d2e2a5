"""One served cluster spec, start to stop: Ray actors → dispatcher → HTTP frontend on loopback.

    svc = Service(load_config(path), name="demo").start()     # Ray must be initialized
    ... svc.base_url (OpenAI base: svc.base_url + "/v1") ...
    svc.stop()   # graceful: refuse new requests, drain in-flight ones, stop servers and actors

The HTTP server runs in a background thread with its own event loop; the dispatcher lives in that
loop (all of its coroutines run there). `call(coro_fn)` runs a dispatcher coroutine from another thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from orchestrator.config.models import TandemConfig
from orchestrator.runtime.deployment import Deployment
from orchestrator.runtime.dispatcher import RayDispatcher
from orchestrator.runtime.frontend import create_app
from orchestrator.runtime.http_server import BackgroundServer
from orchestrator.runtime.metrics import TandemMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class Service:
    def __init__(self, config: TandemConfig, *, name: str = "tandem", host: str | None = None,
                 port: int | None = None, default_max_tokens: int = 16) -> None:
        self.config = config
        self.name = name
        self.host = host or config.frontend.host
        self.port = config.frontend.port if port is None else port
        self.default_max_tokens = default_max_tokens
        self.deployment: Deployment | None = None
        self.dispatcher: RayDispatcher | None = None
        self.server: BackgroundServer | None = None
        self.metrics = TandemMetrics(config.served_model_name)

    @property
    def base_url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.base_url

    def start(self) -> Service:
        self.deployment = Deployment(self.config, name=self.name).start()
        try:
            self.dispatcher = RayDispatcher(self.config, self.deployment, self.metrics)
            app = create_app(self.dispatcher, self.metrics, self.default_max_tokens)
            self.server = BackgroundServer(app, self.host, self.port).start()
            self.call(self.dispatcher.poll_once)
        except BaseException:
            self.deployment.shutdown()
            raise
        return self

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 60.0) -> T:
        """Run a coroutine in the server's event loop and wait for its result."""
        assert self.server is not None and self.server.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.server.loop).result(timeout_s)

    def check_leaks(self) -> list[str]:
        """What any worker still holds ([] when every KV block is free and nothing is tracked)."""
        assert self.deployment is not None
        return self.deployment.check_leaks()

    def stop(self, drain_timeout_s: float = 30.0) -> int:
        """Graceful shutdown; returns how many in-flight requests had to be cancelled."""
        cancelled = 0
        if self.dispatcher is not None and self.server is not None and self.server.loop is not None:
            try:
                disp = self.dispatcher
                cancelled = self.call(lambda: disp.drain_and_close(drain_timeout_s), drain_timeout_s + 30)
            except Exception as e:
                log.warning("drain of %s failed: %s", self.name, e)
        if self.server is not None:
            self.server.stop()
        if self.deployment is not None:
            self.deployment.shutdown()
        self.server = self.dispatcher = self.deployment = None
        return cancelled
