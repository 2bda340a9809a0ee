"""Writing frames without a coroutine per frame, where the server allows it.

Sending through ASGI costs a coroutine, a message dict and, for text, a str that
the server encodes again, for every frame and every subscriber. Frames here stay
the bytes they were encoded to, once per fan-out. uvicorn's
`websockets-sansio` protocol (the one `tablelock serve` runs) can take a text
frame synchronously whenever its transport is writable: `direct_writer` returns
a function that does exactly that and says whether it could. When it can't (the
socket is paused, or another server runs the app), the hub queues the frame and a
task sends it through ASGI as usual, so order is kept either way.
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

DirectWriter = Callable[[bytes], bool]


def direct_writer(send: Callable[..., Any]) -> DirectWriter | None:
    protocol = getattr(send, "__self__", None)
    if _SansIO is None or not isinstance(protocol, _SansIO):
        return None
    conn, writable = protocol.conn, protocol.writable

    def write(frame: bytes) -> bool:
        # Anything but an open, writable socket goes the slow way, which knows how to fail.
        if (conn.state is not State.OPEN or not writable.is_set() or protocol.close_sent
                or protocol.disconnected or not protocol.handshake_complete):
            return False
        conn.send_text(frame)
        protocol.transport.write(b"".join(conn.data_to_send()))
        return True

    return write
