"""How one broker process is configured: flags, else TABLELOCK_* variables, else defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


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
    audit_size: int = 10_000

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        settings = cls(
            host=env.get("TABLELOCK_HOST", cls.host),
            port=int(env.get("TABLELOCK_PORT", cls.port)),
            backend=env.get("TABLELOCK_BACKEND", cls.backend),
            secrets=[s for s in env.get("TABLELOCK_SECRET", "").split(",") if s],
        )
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings
