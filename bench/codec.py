"""What the load generator reads of a frame, and how it writes requests, per wire dialect.

`tablelock`: one JSON object per WebSocket message (PROTOCOL.md section 4); the raw-websockets
and Starlette baselines speak it too. `socketio`: the same objects carried in Engine.IO v4 /
Socket.IO v5 packets, spoken by hand (no python-socketio client): `40{auth}` connects the
namespace (our `hello`), `42<id>["<type>",{params}]` is a request whose ack `43<id>[{reply}]`
is the reply, and `42["event",{event}]` an event. The server's Engine.IO ping `2` is
answered with `3`.
"""

from __future__ import annotations

from typing import Any

import msgspec


class LockRef(msgspec.Struct, gc=False):
    order_id: str = ""
    token: int = 0
    expires_at: int = 0


class ErrorRef(msgspec.Struct, gc=False):
    code: str = ""


class Msg(msgspec.Struct, gc=False):
    """The fields of any server frame the load generator looks at; the rest is skipped."""

    type: str = ""
    id: int | None = None
    ok: bool = True
    event: str = ""
    lock: LockRef | None = None
    error: ErrorRef | None = None
    rid: str = ""
    params: dict[str, str] | None = None
    server_time: int = 0


_msg = msgspec.json.Decoder(Msg)
_event_packet = msgspec.json.Decoder(tuple[str, Msg])
_ack_packet = msgspec.json.Decoder(list[Msg])
_encode = msgspec.json.Encoder().encode

PING = Msg(type="ping")  # an Engine.IO ping: answer with pong()
IGNORED = Msg(type="ignored")


class Codec:
    name = "tablelock"
    path = "/ws"
    subprotocol: str | None = "tablelock.v1"

    def request(self, request_id: int, type_: str, params: dict[str, Any]) -> bytes:
        return _encode({"id": request_id, "type": type_, **params})

    def raw(self, obj: dict[str, Any]) -> bytes:
        """A frame that is not a request (an `rpc.result`)."""
        return _encode(obj)

    def decode(self, payload: bytes) -> Msg:
        return _msg.decode(payload)

    def pong(self) -> bytes | None:
        return None


class SocketIoCodec(Codec):
    name = "socketio"
    path = "/socket.io/?EIO=4&transport=websocket"
    subprotocol = None

    def __init__(self) -> None:
        self._hello_id: int | None = None

    def request(self, request_id: int, type_: str, params: dict[str, Any]) -> bytes:
        if type_ == "hello":  # the namespace connect, with the token as its auth payload
            self._hello_id = request_id
            return b"40" + _encode({"token": params["token"]})
        return b"42" + str(request_id).encode() + _encode([type_, params])

    def raw(self, obj: dict[str, Any]) -> bytes:
        return b"42" + _encode(["rpc.result", obj])

    def decode(self, payload: bytes) -> Msg:
        kind = payload[:2]
        if kind == b"42":
            return _event_packet.decode(payload[2:])[1]
        if kind == b"43":
            start = payload.index(b"[")
            msg = _ack_packet.decode(payload[start:])[0]
            msg.id = int(payload[2:start])
            return msg
        if kind == b"40":
            return Msg(id=self._hello_id, ok=True)
        if kind == b"44":
            return Msg(id=self._hello_id, ok=False, error=ErrorRef("AUTH_FAILED"))
        if payload[:1] == b"2":
            return PING
        return IGNORED  # the Engine.IO open packet `0{...}`, a pong, a noop

    def pong(self) -> bytes | None:
        return b"3"


def codec_for(dialect: str) -> Codec:
    return SocketIoCodec() if dialect == "socketio" else Codec()
