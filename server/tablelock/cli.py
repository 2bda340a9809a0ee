"""`tablelock serve | token | demo`."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any

import uvicorn

from .auth import Tokens, parse_ttl
from .gateway import Gateway
from .rules import ROLES
from .settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """The server options the broker is measured with (see bench/README.md)."""
    from .protocol import MAX_FRAME_BYTES

    return {
        "host": settings.host,
        "port": settings.port,
        # websockets-sansio: the fastest of uvicorn's implementations here, and small.
        "ws": "websockets-sansio",
        # Per-message compression costs 50-300 KiB per connection for tiny frames.
        "ws_per_message_deflate": False,
        "ws_max_size": MAX_FRAME_BYTES,
        "ws_ping_interval": settings.heartbeat_ms / 1000,
        "ws_ping_timeout": settings.heartbeat_ms / 1000,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "http": "httptools",
        # The broker reads no client address: no proxy-headers middleware, whose frame
        # every connection would otherwise hold.
        "proxy_headers": False,
        "lifespan": "on",
        "interface": "asgi3",  # Broker.__call__ returns the awaitable: say so, don't guess
        "log_level": "warning",
        "timeout_graceful_shutdown": 3,
    }


def serve_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env(host=args.host, port=args.port, backend=args.backend)
    if args.secret:
        settings.secrets = [s for s in args.secret.split(",") if s]
    if not settings.secrets:
        generated = secrets.token_urlsafe(32)
        settings.secrets = [generated]
        print(f"No secret given: generated one for this process. Tokens die with it.\n"
              f"  TABLELOCK_SECRET={generated}", flush=True)
    return settings


def run_broker(settings: Settings,
               background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()) -> None:
    from . import logs
    from .app import create_app

    logs.setup()
    app = create_app(settings, background)
    config = uvicorn.Config(app, **uvicorn_options(settings))  # type: ignore[arg-type]
    DrainingServer(config, app.state.gateway, settings.drain_window_s).run()


def serve(args: argparse.Namespace) -> None:
    settings = serve_settings(args)
    print(f"tablelock listening on ws://{settings.host}:{settings.port}/ws "
          f"(backend: {settings.backend}; health: http://{settings.host}:{settings.port}/healthz)",
          flush=True)
    run_broker(settings)


def demo(args: argparse.Namespace) -> None:
    """A broker, a simulated store playing the races that matter, and the dashboard."""
    settings = serve_settings(args)
    settings.demo_store = args.store
    base = f"http://{settings.host}:{settings.port}"
    tokens = Tokens(settings.secrets)

    async def play() -> None:
        from tablelock_demo.simulation import simulate

        await simulate(f"ws://{settings.host}:{settings.port}/ws", tokens, args.store,
                       seed=args.seed, tables=args.tables)

    print(f"tablelock demo: store {args.store!r}, seed {args.seed}\n"
          f"  dashboard     {base}/app/dashboard.html\n"
          f"  ERP terminal  {base}/app/erp.html\n"
          f"  H5 page       {base}/app/h5.html?table=T01\n"
          f"  metrics       {base}/metrics", flush=True)
    run_broker(settings, [play] if not args.no_simulation else [])


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or SIGINT drains before it stops: clients are
    told to reconnect (1012) spread over the window, then the process exits. A second
    signal stops at once. State survives on Redis; the in-memory backend's dies here."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, window_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.window_s = window_s
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.window_s <= 0:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self.gateway.drain, self.window_s)
        loop.call_soon_threadsafe(loop.call_later, self.window_s + 0.5,
                                  super().handle_exit, sig, frame)


def token(args: argparse.Namespace) -> None:
    secret = args.secret or ",".join(Settings.from_env().secrets)
    if not secret:
        sys.exit("tablelock token: give --secret or set TABLELOCK_SECRET")
    try:
        minted = Tokens(secret.split(",")).mint(store=args.store, role=args.role, sub=args.sub,
                                                table=args.table, ttl_s=parse_ttl(args.ttl),
                                                name=args.name)
    except ValueError as exc:
        sys.exit(f"tablelock token: {exc}")
    print(minted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tablelock", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    p_serve = commands.add_parser("serve", help="run the broker")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--backend", help="memory (default) or a redis:// URL")
    p_serve.add_argument("--secret", help="token secret(s), comma-separated; first signs")
    p_serve.set_defaults(run=serve)

    p_demo = commands.add_parser("demo", help="a broker, a simulated store and the dashboard")
    p_demo.add_argument("--host")
    p_demo.add_argument("--port", type=int)
    p_demo.add_argument("--backend", help="memory (default) or a redis:// URL")
    p_demo.add_argument("--secret")
    p_demo.add_argument("--store", default="demo", help="the simulated store's id")
    p_demo.add_argument("--seed", type=int, default=1, help="the simulation's random seed")
    p_demo.add_argument("--tables", type=int, default=12)
    p_demo.add_argument("--no-simulation", action="store_true",
                        help="serve the pages without the simulated terminals")
    p_demo.set_defaults(run=demo)

    p_token = commands.add_parser("token", help="mint a terminal token")
    p_token.add_argument("--store", required=True)
    p_token.add_argument("--role", required=True,
                         choices=sorted(ROLES))
    p_token.add_argument("--sub", required=True, help="terminal id")
    p_token.add_argument("--table", help="table id (h5 only)")
    p_token.add_argument("--name", help="display name")
    p_token.add_argument("--ttl", default="12h", help="lifetime, e.g. 90s, 30m, 12h, 7d")
    p_token.add_argument("--secret", help="defaults to TABLELOCK_SECRET")
    p_token.set_defaults(run=token)

    args = parser.parse_args(argv)
    if args.command is None:  # `tablelock` alone serves, as `tablelock serve` does
        args = parser.parse_args(["serve", *(argv or [])])
    args.run(args)


if __name__ == "__main__":
    main()
