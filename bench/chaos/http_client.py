"""A tiny asyncio HTTP/1.1 client on 127.0.0.1: no threads, no dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


async def http(method: str, port: int, path: str, token: str | None = None, body: Any = None,
               timeout: float = 5.0) -> tuple[int, Any]:
    """A tiny HTTP/1.1 client on 127.0.0.1 (no threads, no dependencies)."""
    async def go() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = b"" if body is None else json.dumps(body).encode()
            head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                    "Connection: close", f"Content-Length: {len(data)}"]
            if token:
                head.append(f"Authorization: Bearer {token}")
            if data:
                head.append("Content-Type: application/json")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        header, _, payload = raw.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in header.lower():
            payload = _dechunk(payload)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")
    return await asyncio.wait_for(go(), timeout)


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)

