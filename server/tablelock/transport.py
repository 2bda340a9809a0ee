"""The socket before it is a terminal: uvicorn's protocols, bounded for the open internet.

uvicorn leaves these doors open to a peer with no token at all (docs/security.md):
- a request head has no deadline, and with httptools no size limit either: one endless
  header line is held in memory, growing, and stalled every store for seconds;
- how many heads may be in progress at once is not bounded either, and a body still
  trickling in after the answer keeps the connection open for good;
- a WebSocket PING is answered by a PONG written straight to the transport, whatever the
  transport already holds: a peer that floods PINGs and never reads grows memory at will;
- nothing bounds how many control frames a connection may send.

The classes here are uvicorn's own protocols with those doors shut (see each class), built
from the settings by `http_protocol` and `websocket_protocol`, which `uvicorn_options`
passes to uvicorn. Past `hello` the gateway and the hub take over.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import Close
from .settings import Settings

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIO,
    )
    from websockets.protocol import State
except ImportError:  # pragma: no cover - a uvicorn without it: see websocket_protocol
    _SansIO = None  # type: ignore[assignment,misc]

# What GuardedWebSocket overrides or reads of uvicorn's class: another uvicorn without them
# gets the fallback rather than a guard that silently does nothing.
_SANSIO_HOOKS = ("connection_made", "handle_ping", "handle_pong", "pause_writing",
                 "resume_writing", "receive", "send")
if _SansIO is not None and not all(hasattr(_SansIO, hook) for hook in _SANSIO_HOOKS):
    _SansIO = None  # type: ignore[assignment,misc]  # pragma: no cover

# How long a socket the broker closes waits for the peer's close reply (uvicorn: 10 s). Every
# evicted silent socket would otherwise be held that long, its peer answering or not.
CLOSE_GRACE_S = 2.0
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                  b"connection: close\r\ncontent-length: 0\r\n\r\n")


class _HeadDeadline:
    """Mixed into uvicorn's HTTP protocols: a request head (the WebSocket upgrade request
    included) must be complete within `head_timeout_s` of the connection or of its first
    byte, else 408 and close; and at most `max_open_heads` heads are in progress at once,
    past which the oldest gets its 408 at once (a complete head takes one round trip, so
    that is a slow-loris, not a terminal). The subclass says when a head begins and ends.
    Once a request is answered, a body still coming in is not read on (uvicorn would, and
    each byte of a trickle would keep the connection open for good): the connection closes.
    No route answers before it has read the body it needs."""

    head_timeout_s = 5.0
    max_open_heads = 1_000
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._head_begins()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_ends()
        super().connection_lost(exc)  # type: ignore[misc]

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # From here the WebSocket protocol owns the socket (and gateway's hello deadline).
        self._head_ends()
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _head_begins(self) -> None:
        if self._head_timer is not None:
            return
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)
        _open_heads[self] = None
        if len(_open_heads) > self.max_open_heads:
            next(iter(_open_heads))._head_overdue()

    def _head_ends(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
            del _open_heads[self]

    def _head_overdue(self) -> None:
        self._head_ends()
        self._refuse(REQUEST_TIMEOUT)

    def _refuse(self, response: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


# The request heads in progress in this process, oldest first.
_open_heads: dict[_HeadDeadline, None] = {}


class GuardedH11(_HeadDeadline, H11Protocol):
    """h11 bounds the head's size itself (`h11_max_incomplete_event_size`, answered 400);
    this adds the deadline. A head has ended once h11 has read a request out of it."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head_ends()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # see _HeadDeadline: answered, so the rest is not read
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._head_begins()  # kept alive: the next head has the same deadline


class GuardedHttpTools(_HeadDeadline, HttpToolsProtocol):
    """httptools has no limit on a head's size and keeps a partial header line to itself
    until it ends: count what arrives until the head is complete, and refuse (431) a head
    still incomplete past `max_head_bytes`."""

    max_head_bytes = 16 * 1024
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begins()

    def on_headers_complete(self) -> None:
        self._head_ends()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        if self.cycle.more_body:
            self.transport.close()  # see _HeadDeadline: answered, so the rest is not read
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is None:
            self._head_bytes = 0
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._head_ends()
            self._refuse(HEAD_TOO_LARGE)


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """The HTTP protocol class `settings.http_parser` names, with the settings' bounds."""
    bases: dict[str, type[_HeadDeadline]] = {"h11": GuardedH11, "httptools": GuardedHttpTools}
    base = bases.get(settings.http_parser)
    if base is None:
        raise ValueError(f"unknown http_parser {settings.http_parser!r}: use h11 or httptools")
    return type(base.__name__, (base,), {"head_timeout_s": settings.upgrade_timeout_s,
                                         "max_head_bytes": settings.max_header_bytes,
                                         "max_open_heads": settings.max_anonymous_connections})


if _SansIO is not None:
    class GuardedWebSocket(_SansIO):
        """uvicorn's websockets-sansio protocol, with control frames on a budget and reading
        tied to writing: while the transport's outgoing buffer is above its high-water mark,
        nothing more is read, so a peer that does not read cannot make the broker write."""

        control_rate_per_s = 2.0
        control_burst = 20.0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.close_timeout = CLOSE_GRACE_S
            self._control_budget = self.control_burst
            self._control_stamp = self.loop.time()
            self._flooded = False

        def handle_ping(self) -> None:
            if self._control_frame_allowed():
                super().handle_ping()

        def handle_pong(self, event: Any) -> None:
            if self._control_frame_allowed():
                super().handle_pong(event)

        def _control_frame_allowed(self) -> bool:
            """Spend one control frame from the budget; past it, close 4008 (at once, without
            a close frame, if the peer is not even reading what it is sent)."""
            if self.close_sent:
                return False
            now = self.loop.time()
            self._control_budget = min(
                self.control_burst,
                self._control_budget + (now - self._control_stamp) * self.control_rate_per_s)
            self._control_stamp = now
            self._control_budget -= 1
            if self._control_budget >= 0:
                return True
            self.close_sent = self._flooded = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": Close.POLICY,
                                   "reason": "control frame flood"})
            if self.writable.is_set() and self.conn.state is State.OPEN:
                # Say why, stop reading, and hang up CLOSE_GRACE_S later: closing at once
                # would reset a socket that still sends, and the peer could lose the close frame.
                self.conn.fail(Close.POLICY, "control frame flood")
                self.transport.write(b"".join(self.conn.data_to_send()))
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                self.transport.pause_reading()
                self.close_timer = self.loop.call_later(CLOSE_GRACE_S, self.transport.abort)
            else:
                self.transport.abort()
            return False

        async def send(self, message: Any) -> None:
            await super().send(message)
            if message["type"] == "websocket.accept" and self.handshake_complete:
                self._shed_handshake()

        def _shed_handshake(self) -> None:
            """Nothing reads the handshake once the socket is open, but it lives as long as
            the connection: websockets' parser keeps the request (a local of its generator)
            and the scope keeps a copy of its headers. Emptied, they free about 3 KiB."""
            self.request.headers.clear()
            self.scope["headers"] = []

        def pause_writing(self) -> None:
            super().pause_writing()
            self.transport.pause_reading()

        def resume_writing(self) -> None:
            super().resume_writing()
            if not (self.read_paused or self._flooded or self.transport.is_closing()):
                self.transport.resume_reading()

        async def receive(self) -> Any:
            # uvicorn's receive, except that reading resumes only if writing may go on too.
            message = await self.queue.get()
            if self.read_paused and self.queue.empty():
                self.read_paused = False
                if self.writable.is_set() and not self._flooded:
                    self.transport.resume_reading()
            return message


def websocket_protocol(settings: Settings) -> type[asyncio.Protocol] | str:
    """The guarded protocol class with the settings' control-frame budget. Without
    uvicorn's websockets-sansio, its `websockets` implementation, whose library answers
    pings through its own write flow control (it waits for the buffer to drain)."""
    if _SansIO is None:  # pragma: no cover
        return "websockets"
    return type("GuardedWebSocket", (GuardedWebSocket,),
                {"control_rate_per_s": settings.control_rate_per_s,
                 "control_burst": settings.control_burst})
