"""Logging: one JSON object per line for machines, plain lines on a terminal.

Significant events (connections, grants, releases, forces, expiries, payments,
refused payments) are logged with `store`, `order`, `terminal` and `request_id`
as extra fields; the JSON form carries them as keys.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import msgspec

_FIELDS = ("store", "order", "terminal", "role", "request_id", "kind", "token", "code",
           "reason", "operator", "payment_ref", "close_code")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{name}={record.__dict__[name]}" for name in _FIELDS
                          if record.__dict__.get(name) is not None)
        base = super().format(record)
        return f"{base} {extras}" if extras else base


def setup(level: str | None = None, fmt: str | None = None) -> None:
    """JSON unless stderr is a terminal; TABLELOCK_LOG_FORMAT=json|text overrides."""
    fmt = fmt or os.environ.get("TABLELOCK_LOG_FORMAT") or (
        "text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tablelock")
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("TABLELOCK_LOG_LEVEL", "INFO"))
    root.propagate = False
