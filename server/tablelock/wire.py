"""Writing frames without a coroutine per frame, where the server allows it.

Sending through ASGI costs a coroutine, a message dict and, for text, a str that
the server encodes again, for every frame and every subscriber. Frames here stay
the bytes they were encoded to, and are framed once per fan-out. uvicorn's
`websockets-sansio` protocol (the one `tablelock serve` runs) can take a text
frame synchronously whenever its transport is writable: `direct_writer` returns
a function that does exactly that and says whether it could. When it can't (the
socket is paused, or another server runs the app), the hub queues the frame and a
task sends it through ASGI as usual, so order is kept either way.

None of what this reads of uvicorn's protocol is public API. pyproject.toml pins the
uvicorn range it was measured with; tests/test_wire_canary.py fails loudly when these
internals change, and a protocol without them gets the ASGI path (tested too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from websockets.protocol import State

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIO,
    )
except ImportError:  # pragma: no cover - another uvicorn
    _SansIO = None  # type: ignore[assignment,misc]

DirectWriter = Callable[[bytes, bytes | None], bool]

# The attributes of uvicorn's WebSocketsSansIOProtocol that this module reads or clears.
SANSIO_ATTRIBUTES: tuple[str, ...] = (
    "conn", "writable", "transport", "close_sent", "disconnected", "handshake_complete",
    "request", "response",
)


def sansio_protocol(send: Callable[..., Any]) -> _SansIO | None:
    """The uvicorn websockets-sansio protocol behind an ASGI `send` (a bound method of it),
    if it has every attribute this module relies on; else None: the ASGI path."""
    protocol = getattr(send, "__self__", None)
    if _SansIO is None or not isinstance(protocol, _SansIO):
        return None
    if not all(hasattr(protocol, name) for name in SANSIO_ATTRIBUTES):
        return None
    return protocol


def text_frame(payload: bytes) -> bytes:
    """A server's WebSocket text frame: unmasked and uncompressed, so the same bytes serve
    every subscriber of a fan-out (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


def shed_handshake(send: Callable[..., Any]) -> None:
    """uvicorn keeps the handshake's request and response for the connection's whole life
    (about 4 KiB); nothing reads them once the socket is open."""
    protocol = sansio_protocol(send)
    if protocol is not None and protocol.handshake_complete:
        # uvicorn types them as always set; it never reads them again after the handshake.
        protocol.request = None  # type: ignore[assignment]
        protocol.response = None  # type: ignore[assignment]


def direct_writer(send: Callable[..., Any]) -> DirectWriter | None:
    """A synchronous text-frame writer for this connection, or None: send through ASGI."""
    protocol = sansio_protocol(send)
    if protocol is None:
        return None
    conn, writable = protocol.conn, protocol.writable

    def write(frame: bytes, framed: bytes | None) -> bool:
        # Anything but an open, writable socket goes the slow way, which knows how to fail.
        if (conn.state is not State.OPEN or not writable.is_set() or protocol.close_sent
                or protocol.disconnected or not protocol.handshake_complete):
            return False
        # Straight to the transport: the protocol's own output buffer is always drained
        # (uvicorn writes it out after every operation), so no frame can jump a queue.
        protocol.transport.write(framed if framed is not None else text_frame(frame))
        return True

    return write
