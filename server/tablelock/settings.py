"""How one broker process is configured: flags, else TABLELOCK_* variables, else defaults."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

PORTS = range(0, 65536)  # 0: any free port, which the broker prints once it listens
_PORT_RANGE = "use 0 to 65535 (0: any free port)"
_YES, _NO = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting the broker cannot run with; the message names it and says what would do."""


def check_port(port: int) -> int:
    if port not in PORTS:
        raise SettingsError(f"{port} is not a port: {_PORT_RANGE}")
    return port


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "memory"
    # The memory backend's write-ahead SQLite file ("": none, state dies with the process).
    data: str = ""
    secrets: list[str] = field(default_factory=list)
    hello_timeout_s: float = 10.0
    heartbeat_ms: int = 20_000
    max_subscriptions: int = 200
    max_queue_messages: int = 2_000
    max_queue_bytes: int = 4 * 1024 * 1024
    history_size: int = 512
    audit_size: int = 5_000
    # Requests per second per connection, sustained and in a burst; a busy ERP does ~100.
    rate_per_s: float = 300.0
    rate_burst: float = 600.0
    # Amplification and growth bounds (docs/security.md): a holder hears of the same
    # requester refused on the same lock at most once per window; a terminal triggers at
    # most `fetch_burst` order pulls from the ERP at once, refilled at `fetch_rate_per_s`;
    # a phone that reconnects within the linger is not said offline and online again; a
    # terminal keeps at most `max_unhandled_per_terminal` payment rejections unhandled.
    contended_window_ms: int = 2_000
    fetch_rate_per_s: float = 1.0
    fetch_burst: int = 20
    h5_presence_linger_ms: int = 3_000
    max_unhandled_per_terminal: int = 100
    # Redis: seqs given to subscribers of orders not seen yet, kept per store (10 min at most).
    max_unknown_order_seqs: int = 10_000
    # Redis: acknowledge a grant or a payment only once WAIT saw it on this many replicas
    # (0: don't wait); past the timeout the reply is UNAVAILABLE with outcome unknown.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1_000
    max_connections: int = 50_000
    max_connections_per_store: int = 5_000
    max_connections_per_terminal: int = 16
    # Before hello (docs/security.md). The HTTP parser was chosen by measurement (bench/README.md).
    http_parser: str = "httptools"
    max_header_bytes: int = 16 * 1024
    upgrade_timeout_s: float = 5.0
    # Request heads in progress, and upgraded sockets not yet past hello, each at most this
    # many: past it the oldest is closed (HTTP 408, WebSocket 4008).
    max_anonymous_connections: int = 1_000
    # WebSocket control frames (ping, pong) per second per connection; past it: close 4008.
    control_rate_per_s: float = 2.0
    control_burst: float = 20.0
    # Browser Origins allowed besides the broker's own ("*": any). No Origin: not a browser.
    allowed_origins: list[str] = field(default_factory=list)
    # On SIGTERM, clients are told to reconnect (1012) spread over this window.
    drain_window_s: float = 5.0
    # `tablelock demo`: the store whose pages may ask /demo/token for tokens ("": none).
    demo_store: str = ""

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then TABLELOCK_<FIELD> variables, then the given overrides."""
        env = os.environ
        settings = cls()
        for spec in fields(cls):
            variable = f"TABLELOCK_{spec.name.upper()}"
            if spec.name == "secrets" and "TABLELOCK_SECRET" in env:
                variable = "TABLELOCK_SECRET"
            raw = env.get(variable)
            if raw is None:
                continue
            value = parse_env_value(variable, raw, getattr(settings, spec.name))
            if spec.name == "port" and value not in PORTS:
                raise SettingsError(f"{variable}={raw} is not a port: {_PORT_RANGE}")
            setattr(settings, spec.name, value)
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings


def parse_env_value(variable: str, raw: str, default: object) -> object:
    """An environment value read as the type of its default, or an error that names it."""
    if isinstance(default, list):
        return [item for item in raw.split(",") if item]
    if isinstance(default, str):
        return raw
    if isinstance(default, bool):  # before the numbers: bool("false") would be True
        if raw.lower() in _YES | _NO:
            return raw.lower() in _YES
        raise SettingsError(f"{variable}={raw!r}: use true or false")
    if isinstance(default, int | float):
        kind = type(default)
        try:
            number = kind(raw)
        except ValueError:
            wanted = "a whole number" if kind is int else "a number"
            raise SettingsError(f"{variable}={raw!r} is not {wanted}") from None
        if not math.isfinite(number) or number < 0:
            raise SettingsError(f"{variable}={raw!r}: use a number of 0 or more")
        return number
    raise TypeError(f"no parser for {variable} ({type(default).__name__})")
