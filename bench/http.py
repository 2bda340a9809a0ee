"""The two HTTP calls the benchmark makes: readiness, and a store's config."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def get_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def put_config(base: str, store: str, token: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`PUT /v1/stores/{store}/config` with a manager token; raises on a refusal."""
    request = urllib.request.Request(f"{base}/v1/stores/{store}/config", method="PUT",
                                     data=json.dumps(fields).encode())
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result
