"""Assembles one broker: backend, hub, relay, gateway and HTTP routes in a Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from . import metrics
from .auth import Tokens
from .backends.base import Backend
from .gateway import Gateway
from .http import http_routes, page_routes
from .hub import Hub
from .relay import Relay
from .settings import Settings, SettingsError

log = logging.getLogger("tablelock.app")


REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://", "unix://")


def make_backend(settings: Settings) -> Backend:
    if settings.data and settings.backend != "memory":
        raise SettingsError("--data keeps the memory backend's state: Redis keeps its own")
    if settings.backend == "memory":
        from .backends.durable import Journal
        from .backends.memory import MemoryBackend

        return MemoryBackend(settings.history_size, settings.audit_size,
                             settings.h5_presence_linger_ms, settings.max_unhandled_per_terminal,
                             Journal(settings.data) if settings.data else None)
    if settings.backend.startswith(REDIS_SCHEMES):
        try:
            from .backends.redis import RedisBackend
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.partition(".")[0] != "hiredis":
                raise
            raise SettingsError(f"backend {backend_label(settings.backend)} needs the Redis "
                                f"client, which is not installed: "
                                f"pip install 'tablelock[redis]'") from None
        return RedisBackend(settings.backend, settings.history_size, settings.audit_size,
                            max_unclaimed_seqs=settings.max_unknown_order_seqs,
                            h5_presence_linger_ms=settings.h5_presence_linger_ms,
                            max_unhandled_per_terminal=settings.max_unhandled_per_terminal,
                            wait_replicas=settings.redis_wait_replicas,
                            wait_timeout_ms=settings.redis_wait_timeout_ms)
    raise SettingsError(f"unknown backend {settings.backend!r} (--backend, TABLELOCK_BACKEND): "
                        f"use memory or a Redis URL ({', '.join(REDIS_SCHEMES)})")


def backend_label(url: str) -> str:
    """The backend as it may be printed: a Redis URL without its password."""
    parsed = urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return urlunsplit(parsed._replace(netloc=netloc))


def create_app(settings: Settings,
               background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()) -> Broker:
    """The broker; `background` jobs (the demo's simulated store) run while it serves."""
    backend = make_backend(settings)
    hub = Hub(settings.max_queue_messages, settings.max_queue_bytes, settings.rate_per_s,
              settings.rate_burst, settings.contended_window_ms)
    hub.on_channel_idle = backend.channel_idle
    metrics.watch_queues(hub.queue_depths)
    relay = Relay(hub, backend, settings.fetch_rate_per_s, settings.fetch_burst)
    tokens = Tokens(settings.secrets)
    gateway = Gateway(backend, hub, relay, tokens, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.start(hub)
        if not await backend.ready():
            # The backend keeps trying to reach its server; until then locks are refused.
            log.warning("backend %s does not answer: lock requests are refused UNAVAILABLE "
                        "and /readyz answers 503 until it does; retrying",
                        backend_label(settings.backend))
        # What start-up allocated lives for the whole process: keep it out of the
        # collector's generations so that its pauses stay short under load.
        gc.collect()
        gc.freeze()
        # Requests allocate short-lived objects by the dozen: collect the young generation
        # less often, and the old one (every connection's state) far less often still.
        gc.set_threshold(20_000, 50, 50)
        jobs = [asyncio.create_task(job()) for job in (hub.expire_tokens, *background)]
        try:
            yield
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await backend.close()

    routes = [*http_routes(backend, tokens, lambda: gateway.draining),
              *page_routes(tokens, settings.demo_store)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.backend = backend
    app.state.hub = hub
    app.state.tokens = tokens
    app.state.gateway = gateway
    return Broker(gateway, app)


class Broker:
    """The ASGI entry: `/ws` goes straight to the gateway, with the server's own `send`
    (Starlette's exception middleware would wrap every frame in another coroutine, and
    hide the protocol that wire.direct_writer writes to); the rest is Starlette's."""

    def __init__(self, gateway: Gateway, app: Starlette) -> None:
        self.gateway = gateway
        self.app = app
        self.state = app.state

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: one frame less held by every open connection.
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            return self.gateway(scope, receive, send)  # type: ignore[arg-type]
        return self.app(scope, receive, send)
