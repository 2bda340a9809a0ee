"""The ceiling of the stack tablelock uses: the minimal broker written directly on uvicorn's
sans-I/O WebSocket protocol (`websockets-sansio`), with no ASGI app, task or queue per message.

    python -m bench.baselines.uvicorn_direct --port P --secret S

uvicorn's HTTP protocol (httptools) reads the upgrade request and hands the socket to
`DirectProtocol`, uvicorn's own `WebSocketsSansIOProtocol` with two hooks replaced: the
handshake is answered in place (no `run_asgi` task), and each complete text message is
handled by a plain call as `data_received` parses it. Every frame is built once (unmasked,
uncompressed: the same bytes for every subscriber) and written straight to the transport, as
tablelock does; the store workload is `MiniBroker`'s, the same as raw_ws.py's.
"""

from __future__ import annotations

import argparse
import struct
from typing import Any

import msgspec
import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from tablelock.cli import uvicorn_options
from tablelock.settings import Settings

from .core import MiniBroker

decode, encode = msgspec.json.decode, msgspec.json.Encoder().encode
SUBPROTOCOL = "tablelock.v1"


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final TEXT frame (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


class DirectProtocol(WebSocketsSansIOProtocol):
    broker: MiniBroker  # set once at start-up, shared by every connection

    who: dict[str, Any] | None = None
    channels: list[str] | None = None

    def handle_connect(self, event: Request) -> None:
        response = self.conn.accept(event)
        self.handshake_initiated = self.handshake_complete = True
        if response.status_code == 101 and SUBPROTOCOL in event.headers.get(
                "Sec-WebSocket-Protocol", ""):
            response.headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        if response.status_code != 101:
            self.close_sent = True
            self.transport.close()
            return
        self.start_keepalive()

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if not self.close_sent:
            self.on_message(decode(data))

    def on_message(self, msg: dict[str, Any]) -> None:
        broker = self.broker
        if self.who is None:
            self.who = broker.hello(msg.get("token")) if msg.get("type") == "hello" else None
            if self.who is None:
                self.conn.send_close(4003, "auth failed")
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.close_sent = True
                self.transport.close()
                return
            self.write(text_frame(encode({"id": msg.get("id"), "ok": True})))
            return
        reply, events = broker.handle(self, self.who, msg)
        if msg.get("type") == "subscribe":
            if self.channels is None:
                self.channels = []
            self.channels.append(msg["channel"])
        for channel, event in events:
            frame = text_frame(encode(event))
            for peer in broker.rooms.get(channel, ()):
                peer.write(frame)  # type: ignore[attr-defined]
        self.write(text_frame(encode(reply)))

    def write(self, frame: bytes) -> None:
        if self.conn.state is State.OPEN and not self.close_sent:
            self.transport.write(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channels:
            self.broker.leave(self, self.channels)
        super().connection_lost(exc)


async def no_http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Every WebSocket is handled by DirectProtocol; plain HTTP gets a 404."""
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    DirectProtocol.broker = MiniBroker(args.secret)
    options = uvicorn_options(Settings(port=args.port))
    options.update(ws=DirectProtocol, http="httptools", lifespan="off")
    uvicorn.run(no_http, **options)  # type: ignore[arg-type]
