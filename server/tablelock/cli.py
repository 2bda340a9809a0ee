"""`tablelock serve | token | demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any

import uvicorn

from .auth import Tokens, parse_ttl, short_secrets, silence_key_length_warnings
from .gateway import Gateway
from .rules import ROLES
from .settings import Settings, SettingsError, check_port

log = logging.getLogger("tablelock.cli")


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """The server options the broker is measured with (see bench/README.md)."""
    from .protocol import MAX_FRAME_BYTES
    from .transport import http_protocol, websocket_protocol

    return {
        "host": settings.host,
        "port": settings.port,
        # websockets-sansio (the fastest of uvicorn's implementations here, and small), with
        # control frames on a budget and reads paused while writes are (transport.py).
        "ws": websocket_protocol(settings),
        # Per-message compression costs 50-300 KiB per connection for tiny frames.
        "ws_per_message_deflate": False,
        "ws_max_size": MAX_FRAME_BYTES,
        "ws_ping_interval": settings.heartbeat_ms / 1000,
        "ws_ping_timeout": settings.heartbeat_ms / 1000,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        # The upgrade request's head: a deadline, and a size limit (h11's own, or counted).
        "http": http_protocol(settings),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # The broker reads no client address: no proxy-headers middleware, whose frame
        # every connection would otherwise hold.
        "proxy_headers": False,
        "lifespan": "on",
        "interface": "asgi3",  # Broker.__call__ returns the awaitable: say so, don't guess
        "log_level": "warning",
        "timeout_graceful_shutdown": 3,
    }


def serve_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env(host=args.host, port=args.port, backend=args.backend,
                                 data=getattr(args, "data", None))
    if args.secret:
        settings.secrets = [s for s in args.secret.split(",") if s]
    if not settings.secrets:
        generated = secrets.token_urlsafe(32)
        settings.secrets = [generated]
        print(f"No secret given: generated one for this process. Tokens die with it.\n"
              f"  TABLELOCK_SECRET={generated}", flush=True)
    return settings


def run_broker(settings: Settings, announce: Callable[[str], None],
               background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()) -> None:
    """Serve until a signal; `announce` gets the broker's base address (http://host:port,
    with the port really bound) once it serves."""
    from . import logs
    from .app import create_app

    logs.setup()
    for warning in short_secrets(settings.secrets):
        log.warning(warning)
    silence_key_length_warnings()
    app = create_app(settings, background)  # refuses an unknown backend before listening
    listener = listen(settings.host, settings.port)
    settings.port = listener.getsockname()[1]  # port 0: the one the system chose
    # log_config None: uvicorn's loggers keep the handler logs.setup gave them.
    options = {**uvicorn_options(settings), "log_config": None}
    config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server = DrainingServer(config, app.state.gateway, settings.drain_window_s,
                            lambda: announce(f"http://{host}:{settings.port}"))
    server.run(sockets=[listener])


def listen(host: str, port: int) -> socket.socket:
    """The broker's socket, bound here so that a port in use is one clear error before
    anything claims to listen (uvicorn listens on it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise SettingsError(f"cannot listen on {host}:{port}: {reason.lower()}") from None
    return sock


def serve(args: argparse.Namespace) -> None:
    settings = serve_settings(args)

    def announce(base: str) -> None:
        from .app import backend_label

        ws = base.replace("http://", "ws://", 1)
        print(f"tablelock listening on {ws}/ws (backend: {backend_label(settings.backend)}; "
              f"health: {base}/healthz)", flush=True)

    run_broker(settings, announce)


def demo(args: argparse.Namespace) -> None:
    """A broker, a simulated store playing the races that matter, and the dashboard."""
    settings = serve_settings(args)
    settings.demo_store = args.store
    tokens = Tokens(settings.secrets)

    async def play() -> None:
        from tablelock_demo.simulation import simulate

        await simulate(f"ws://{settings.host}:{settings.port}/ws", tokens, args.store,
                       seed=args.seed, tables=args.tables)

    def announce(base: str) -> None:
        print(f"tablelock demo: store {args.store!r}, seed {args.seed}\n"
              f"  dashboard     {base}/app/dashboard.html\n"
              f"  ERP terminal  {base}/app/erp.html\n"
              f"  H5 page       {base}/app/h5.html?table=T01\n"
              f"  metrics       {base}/metrics", flush=True)

    run_broker(settings, announce, [play] if not args.no_simulation else [])


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or SIGINT drains before it stops: clients are
    told to reconnect (1012) spread over the window, then the process exits. A second
    signal stops at once. State survives on Redis; the in-memory backend's dies here."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, window_s: float,
                 serving: Callable[[], None]) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.window_s = window_s
        self.serving = serving
        self.stopping = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.serving()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.stopping:
            # At once, whatever the stop still waits for (a connection, the backend): the
            # signal's own default action ends the process, so the line is said here.
            log.info("%s again: stopping at once", name)
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
        self.stopping = True
        # This runs between two bytecodes of the loop's thread: log from the loop.
        loop = asyncio.get_event_loop()
        if self.window_s <= 0:
            loop.call_soon_threadsafe(
                log.info, "%s: stopping; a second SIGTERM or Ctrl-C stops it at once", name)
            super().handle_exit(sig, frame)
            return
        loop.call_soon_threadsafe(
            log.info, "%s: draining: clients are told to reconnect (1012) over %g s "
            "(connections: %d), then the broker stops; a second SIGTERM or Ctrl-C stops it "
            "at once", name, self.window_s, len(self.gateway.hub.connections))
        loop.call_soon_threadsafe(self.gateway.drain, self.window_s)
        loop.call_soon_threadsafe(loop.call_later, self.window_s + 0.5,
                                  super().handle_exit, sig, frame)


def token(args: argparse.Namespace) -> None:
    secret = args.secret or ",".join(Settings.from_env().secrets)
    if not secret:
        sys.exit("tablelock token: give --secret or set TABLELOCK_SECRET")
    signing = secret.split(",")
    for warning in short_secrets(signing[:1]):
        print(f"tablelock token: warning: {warning}", file=sys.stderr)
    silence_key_length_warnings()
    try:
        minted = Tokens(signing).mint(store=args.store, role=args.role, sub=args.sub,
                                      table=args.table, ttl_s=args.ttl, name=args.name)
    except ValueError as exc:
        sys.exit(f"tablelock token: {exc}")
    print(minted)


def port_flag(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    try:
        return check_port(port)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ttl_flag(text: str) -> int:
    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tablelock", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    p_serve = commands.add_parser("serve", help="run the broker")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=port_flag, help="0 to 65535; 0: any free port")
    p_serve.add_argument("--backend", help="memory (default) or a redis:// URL")
    p_serve.add_argument("--secret", help="token secret(s), comma-separated; first signs")
    p_serve.add_argument("--data", help="memory backend: keep its state in this SQLite file")
    p_serve.set_defaults(run=serve)

    p_demo = commands.add_parser("demo", help="a broker, a simulated store and the dashboard")
    p_demo.add_argument("--host")
    p_demo.add_argument("--port", type=port_flag, help="0 to 65535; 0: any free port")
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
    p_token.add_argument("--ttl", type=ttl_flag, default="12h",
                         help="lifetime with its unit: 90s, 30m, 12h, 7d")
    p_token.add_argument("--secret", help="defaults to TABLELOCK_SECRET")
    p_token.set_defaults(run=token)

    args = parser.parse_args(argv)
    if args.command is None:  # `tablelock` alone serves, as `tablelock serve` does
        args = parser.parse_args(["serve", *(argv or [])])
    try:
        args.run(args)
    except SettingsError as exc:
        sys.exit(f"tablelock {args.command}: {exc}")
    except KeyboardInterrupt:  # Ctrl-C before the server handles signals, or after it
        sys.exit(130)


if __name__ == "__main__":
    main()
