"""The worker's HTTP endpoints on `bind` (aiohttp): /metrics, /healthz and /readyz.

- ``/metrics``: the worker's registry in the Prometheus text format, or OpenMetrics when
  the scraper asks for it (Prometheus does).
- ``/healthz`` (liveness): 200 while the event loop keeps its heartbeat and every poll
  loop that should run is running; 503 naming what is wrong otherwise.
- ``/readyz`` (readiness): 200 only while the worker polls and is not draining. It turns
  503 the moment SIGTERM arrives, before the poll loops have stopped, so a load balancer
  or a rollout sees the pod leave at once; the body names the state.

    async with serve(worker, "0.0.0.0:9464") as (host, port):
        ...
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from cpworker.config import parse_bind
from cpworker.errors import CpWorkerError

if TYPE_CHECKING:
    from cpworker.worker import Worker

__all__ = ["serve"]

log = logging.getLogger("cpworker.endpoints")


Route = Callable[[web.Request], Awaitable[web.Response]]


def _metrics(registry: CollectorRegistry) -> Route:
    async def handle(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    return handle


def _probe(check: Callable[[], tuple[bool, str]]) -> Route:
    async def handle(request: web.Request) -> web.Response:
        ok, reason = check()
        return web.Response(status=200 if ok else 503, text=reason + "\n")

    return handle


@asynccontextmanager
async def serve(worker: Worker, bind: str) -> AsyncIterator[tuple[str, int]]:
    """Serve the endpoints of `worker` on `bind` for the block; yields the bound address."""
    host, port = parse_bind(bind)
    app = web.Application()
    app.router.add_get("/metrics", _metrics(worker.metrics.registry))
    app.router.add_get("/healthz", _probe(worker.health))
    app.router.add_get("/readyz", _probe(worker.readiness))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise CpWorkerError(
                f"bind = {bind!r}: cannot listen there ({exc.strerror or exc}); choose a free "
                "port, or set bind = '' to serve no endpoints"
            ) from None
        bound_host, bound_port = runner.addresses[0][:2]
        log.info(
            "serving /metrics, /healthz and /readyz on %s:%d",
            bound_host,
            bound_port,
            extra={"event": "endpoints_listening"},
        )
        yield bound_host, bound_port
    finally:
        await runner.cleanup()
