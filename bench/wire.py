"""A lean WebSocket client: the HTTP upgrade by hand, then frames read from an asyncio Protocol.

The stock `websockets` client costs about 14 µs of Python per received frame, enough to make
the load generator the bottleneck. This one parses unmasked server frames straight out of
`data_received` and hands each text payload (bytes) to a callback; client frames are masked
here (RFC 6455 5.3) with a fresh key per frame. No extensions are offered, so no
per-message compression.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

OnText = Callable[[bytes], None]
_urandom = os.urandom
_from_bytes = int.from_bytes


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR the payload with the repeated 4-byte key, as one big-integer operation."""
    n = len(payload)
    if n == 0:
        return payload
    keystream = (key * ((n >> 2) + 1))[:n]
    return (_from_bytes(payload, "little") ^ _from_bytes(keystream, "little")).to_bytes(
        n, "little")


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    key = _urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + mask(payload, key)


class HandshakeError(ConnectionError):
    pass


class LeanSocket(asyncio.Protocol):
    """One client connection. `on_text` gets every text (or binary) message's payload."""

    def __init__(self, host: str, port: int, path: str, subprotocol: str | None,
                 on_text: OnText) -> None:
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closing = False  # we asked for the close: it is no error
        self._buf = b""
        self._upgraded = False
        self._fragments: list[bytes] = []
        key = base64.b64encode(_urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key.decode()}",
                 "Sec-WebSocket-Version: 13"]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode()

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            self._check_upgrade(buf[:end])
            buf = buf[end + 4:]
            if not self._upgraded:
                return
        self._buf = self._frames(buf)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    # --- frames ---------------------------------------------------------------------------

    def _check_upgrade(self, head: bytes) -> None:
        status, *headers = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in headers)}
        if self.opened.done():  # the opener gave up waiting (timed out)
            self.abort()
            return
        if " 101 " not in status + " " or fields.get("sec-websocket-accept") != \
                self._accept.decode():
            self.opened.set_exception(HandshakeError(f"upgrade refused: {status}"))
            self.abort()
            return
        self._upgraded = True
        self.opened.set_result(None)

    def _frames(self, buf: bytes) -> bytes:
        """Parse every whole frame in `buf`; return the unparsed rest."""
        pos, size, on_text = 0, len(buf), self.on_text
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = _from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:  # a server must not mask; accept it anyway
                key = buf[start:start + 4]
                start += 4
                end = start + n
                if end > size:
                    break
                payload = mask(buf[start:end], key)
            else:
                end = start + n
                if end > size:
                    break
                payload = buf[start:end]
            pos = end
            opcode = b0 & 0x0F
            if b0 & 0x80 and opcode in (OP_TEXT, OP_BINARY):
                on_text(payload)
            else:
                self._control(b0, opcode, payload)
        return buf[pos:] if pos < size else b""

    def _control(self, b0: int, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):  # a fragmented message
            self._fragments.append(payload)
            if b0 & 0x80:
                whole = b"".join(self._fragments)
                self._fragments.clear()
                self.on_text(whole)
        elif opcode == OP_PING:
            self._write(client_frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            self.close_code = _from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.closing:
                self.closing = True
                self._write(client_frame(payload[:2], OP_CLOSE))
            if self.transport is not None:
                self.transport.close()

    # --- sending ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def send(self, payload: bytes) -> None:
        """Send one text message (payload: UTF-8 bytes)."""
        transport = self.transport
        if transport is not None:
            transport.write(client_frame(payload))

    def close(self, code: int = 1000) -> None:
        if self.transport is None:
            return
        if not self.closing:
            self.closing = True
            self._write(client_frame(struct.pack("!H", code), OP_CLOSE))

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


async def open_socket(host: str, port: int, path: str, subprotocol: str | None,
                      on_text: OnText, timeout: float = 10.0) -> LeanSocket:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, proto = await loop.create_connection(
            lambda: LeanSocket(host, port, path, subprotocol, on_text), host, port)
        await proto.opened
    return proto
