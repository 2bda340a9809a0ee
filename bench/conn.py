"""One load-generator connection: a LeanSocket, its dialect, replies and what it is for."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .codec import PING, Codec, Msg
from .wire import LeanSocket, open_socket

if TYPE_CHECKING:
    from .actors import Actor
    from .stats import Stats

_now = time.perf_counter


class Conn:
    __slots__ = ("_futures", "_next_id", "actor", "codec", "fetch_answerer", "sock", "stats")

    def __init__(self, codec: Codec, stats: Stats) -> None:
        self.codec = codec
        self.stats = stats
        self.sock: LeanSocket | None = None
        self.actor: Actor | None = None
        self.fetch_answerer = False
        self._futures: dict[int, asyncio.Future[Msg]] = {}
        self._next_id = 0

    async def open(self, url: str, timeout: float = 60.0) -> None:
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.sock = await open_socket(host, port, self.codec.path, self.codec.subprotocol,
                                      self.on_text, timeout)
        self.sock.closed.add_done_callback(self._on_closed)

    def _on_closed(self, _: asyncio.Future[int | None]) -> None:
        sock = self.sock
        if sock is not None and not sock.closing:
            self.stats.error(f"closed:{sock.close_code}")
        for future in self._futures.values():
            if not future.done():
                future.set_exception(ConnectionError("closed"))
        self._futures.clear()

    # --- requests ---------------------------------------------------------------------------

    def send(self, type_: str, params: dict[str, Any]) -> int:
        """Send a request without waiting (the fast path: the actor gets the reply)."""
        self._next_id += 1
        assert self.sock is not None
        self.sock.send(self.codec.request(self._next_id, type_, params))
        return self._next_id

    async def call(self, type_: str, timeout: float = 60.0, **params: Any) -> Msg:
        """Send a request and wait for its reply (set-up only)."""
        request_id = self.send(type_, params)
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        async with asyncio.timeout(timeout):
            return await future

    # --- frames -------------------------------------------------------------------------------

    def on_text(self, payload: bytes) -> None:
        now = _now()
        stats = self.stats
        stats.frames += 1
        try:
            msg = self.codec.decode(payload)
        except Exception:
            stats.error("undecodable")
            return
        kind = msg.type
        if kind == "event":
            stats.on_event(msg, now)
        elif msg.id is not None:
            future = self._futures.pop(msg.id, None) if self._futures else None
            if future is not None:
                if not future.done():
                    future.set_result(msg)
            elif self.actor is not None:
                self.actor.on_reply(msg, now)
        elif kind == "rpc":
            self._answer_fetch(msg)
        elif msg is PING:
            pong = self.codec.pong()
            if pong is not None and self.sock is not None:
                self.sock.send(pong)
        elif kind == "" and not msg.ok:
            stats.error(msg.error.code if msg.error else "error")

    def _answer_fetch(self, msg: Msg) -> None:
        """An erp_main answering `order.fetch` with the order the id names (s<i>t<j>o<k>)."""
        if not self.fetch_answerer or self.sock is None:
            return
        order_id = (msg.params or {}).get("order_id", "")
        table_id = order_id.rsplit("o", 1)[0]
        order = {"order_id": order_id, "table_id": table_id, "version": 1,
                 "amount_cents": 4200, "items": [{"sku": "rice", "qty": 2}], "status": "open"}
        self.sock.send(self.codec.raw({"type": "rpc.result", "rid": msg.rid, "ok": True,
                                       "result": {"order": order}}))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
