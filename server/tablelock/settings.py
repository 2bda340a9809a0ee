"""How one broker process is configured: flags, else TABLELOCK_* variables, else defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "memory"
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
    max_connections: int = 50_000
    max_connections_per_store: int = 5_000
    max_connections_per_terminal: int = 16
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
            raw = env.get(f"TABLELOCK_{spec.name.upper()}")
            if spec.name == "secrets":
                raw = env.get("TABLELOCK_SECRET", raw)
            if raw is None:
                continue
            current = getattr(settings, spec.name)
            if isinstance(current, list):
                value: object = [item for item in raw.split(",") if item]
            else:
                value = type(current)(raw)
            setattr(settings, spec.name, value)
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings
