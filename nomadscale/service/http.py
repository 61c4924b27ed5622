"""The service's HTTP endpoints: ``/metrics`` (Prometheus), ``/status`` (JSON), ``/healthz``.

``create_app`` takes extra routes so other parts (e.g. the healing webhooks) can be mounted
on the same server. ``HttpServer`` runs uvicorn in a thread (loopback by default).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from nomadscale.core.errors import ConfigError

log = logging.getLogger(__name__)


def create_app(
    *,
    registry: CollectorRegistry,
    status: Callable[[], dict[str, Any]],
    healthy: Callable[[], bool] = lambda: True,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    # status(), healthy() and the rollout metrics (service.ops_metrics.DeployCollector) read
    # Consul: run them in the thread pool so a slow or frozen Consul never stalls the event
    # loop (and with it the other endpoints and the webhooks).
    async def metrics(_req: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def status_ep(_req: Request) -> Response:
        return JSONResponse(await run_in_threadpool(status))

    async def healthz(_req: Request) -> Response:
        ok = await run_in_threadpool(healthy)
        return PlainTextResponse("ok\n" if ok else "unhealthy\n", status_code=200 if ok else 503)

    routes: list[BaseRoute] = [
        Route("/metrics", metrics),
        Route("/status", status_ep),
        Route("/healthz", healthz),
        *extra_routes,
    ]
    return Starlette(routes=routes)


class HttpServer:
    """uvicorn in a background thread; ``stop()`` asks it to exit and waits (bounded)."""

    def __init__(self, app: Starlette, *, host: str, port: int, grace_s: float = 5.0) -> None:
        # grace_s: requests still running at stop() are cancelled after that. log_config=None:
        # uvicorn's lines go through nomadscale's handler (JSON logs, secret redaction)
        # instead of uvicorn's own plain-text handlers
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                log_config=None,
                                timeout_graceful_shutdown=max(1, round(grace_s)))  # fmt: skip
        self.grace_s = grace_s
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.host, self.port = host, port
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as e:  # uvicorn exits (SystemExit) or raises when it cannot bind
            self._failure = e

    def start(self, *, timeout_s: float = 10.0) -> HttpServer:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"NOMADSCALE_HTTP_PORT: {self.port} is not a TCP port (0-65535)")
        self._thread.start()
        waited = threading.Event()
        for _ in range(int(timeout_s / 0.05)):
            if self._server.started or not self._thread.is_alive():
                break
            waited.wait(0.05)
        if not self._server.started:
            self.stop()
            why = "address in use or not permitted"
            if self._failure is not None and not isinstance(self._failure, SystemExit):
                why = str(self._failure) or type(self._failure).__name__
            raise ConfigError(
                f"NOMADSCALE_HTTP_HOST/PORT: cannot serve HTTP on {self.host}:{self.port} ({why})"
            )
        if self.port == 0:  # the operator asked for any free port: say which one
            with contextlib.suppress(AttributeError, IndexError, OSError):
                self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        log.info("http: serving on %s:%s", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self.grace_s + 2.0)
        if self._thread.is_alive():  # a stuck request or a stuck loop: do not wait for it
            log.warning("http: server still stopping after %.0fs: forcing it", self.grace_s + 2)
            self._server.force_exit = True
            self._thread.join(timeout=2.0)
