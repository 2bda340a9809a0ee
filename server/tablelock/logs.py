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

from .settings import SettingsError

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


_FORMATS = ("json", "text")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def setup(level: str | None = None, fmt: str | None = None) -> None:
    """JSON unless stderr is a terminal; TABLELOCK_LOG_FORMAT=json|text overrides.

    uvicorn's loggers and Python's warnings (PyJWT's, for one) go through the same handler,
    so that a JSON log stays JSON on every line."""
    fmt = fmt or os.environ.get("TABLELOCK_LOG_FORMAT") or (
        "text" if sys.stderr.isatty() else "json")
    if fmt not in _FORMATS:
        raise SettingsError(f"TABLELOCK_LOG_FORMAT={fmt!r}: use json or text")
    level = level or os.environ.get("TABLELOCK_LOG_LEVEL", "INFO")
    if level.upper() not in _LEVELS:
        raise SettingsError(f"TABLELOCK_LOG_LEVEL={level!r}: use one of {', '.join(_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tablelock")
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # uvicorn's levels are its own (uvicorn_options); only where its lines go is set here.
    for name in ("tablelock", "uvicorn", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
