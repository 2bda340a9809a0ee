"""A simulated terminal's connection: one WebSocket at a time, kept up with backoff (through
nginx, or straight to a broker), `resume` when it can, else `subscribe` with `since`; its
requests and replies, and its mirrors of the channels it follows. What a screen does with
it lives in screen.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .mirror import Mirror, snapshot_view, view_diff
from .settings import Frame
from .store import StoreSim

if TYPE_CHECKING:
    from .run import Run

# Requests that write: a Redis pause waits for one of them to be sent.
WRITES = frozenset({"lock.acquire", "lock.release", "payment.complete", "order.publish"})


@dataclass
class Link:
    """One WebSocket connection of a terminal."""

    ws: ClientConnection
    broker: int | None  # None: through nginx, to whichever broker it chose
    pending: dict[int, tuple[asyncio.Future[Frame], Callable[[Frame], None] | None]] = field(
        default_factory=dict)
    ready: bool = False
    closed: bool = False
    resumed: bool = False
    broken: bool = False  # a gap was seen: nothing more is read from it
    opened: float = field(default_factory=time.monotonic)
    online: bool = False  # hello answered and subscriptions made: counted as connected
    reader: asyncio.Task[None] | None = None



class Connection:
    """A terminal's socket (one at a time) and its mirrors; `learn` and `forget_lock` are
    what the terminal does with an event beyond its mirror (nothing, for a checker)."""

    def __init__(self, run: Run, store: StoreSim, role: str, sub: str, home: int,
                 table: str | None = None) -> None:
        self.run = run
        self.store = store
        self.role = role
        self.sub = sub
        self.home = home
        self.table = table
        self.rng = random.Random(run.rng.getrandbits(64))
        self.token = run.mint(store.store_id, role, sub, table)
        self.link: Link | None = None
        self.session_id: str | None = None
        self.no_resume = False
        self.mirrors: dict[str, Mirror] = {}
        self.ever_connected = False
        self.counted = True  # in the reconnect figures (the final checkers are not)
        self.online: list[list[float]] = []  # [hello answered, socket gone] in epoch ms
        self._ids = itertools.count(1)
        self._loop: asyncio.Task[None] | None = None

    @property
    def store_channel(self) -> str:
        return f"store:{self.store.store_id}"

    def order_channel(self, order_id: str) -> str:
        return f"order:{self.store.store_id}:{order_id}"

    @property
    def ready(self) -> bool:
        return self.link is not None and self.link.ready and not self.link.closed

    @property
    def synced(self) -> bool:
        return self.ready and all(m.seq is not None for m in self.mirrors.values())

    def start(self) -> None:
        self._loop = self.run.spawn(self.keep_connected())

    async def keep_connected(self) -> None:
        attempt = 0
        while not self.run.stopping:
            broker: int | None = None  # through nginx
            if self.run.front is None:
                broker = self.home if attempt == 0 else self.rng.randrange(len(self.run.brokers))
            try:
                link = await self.connect(broker)
                attempt = 0
                assert link.reader is not None
                await asyncio.shield(link.reader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.run.stats.connect_failures[type(exc).__name__] += 1
                attempt += 1
            finally:
                self._drop_link()
            if self.run.stopping:
                return
            delay = min(3.0, 0.1 * 2 ** min(attempt, 5)) * (0.5 + self.rng.random())
            await asyncio.sleep(delay)

    def _drop_link(self) -> None:
        link = self.link
        if link is not None:
            link.ready = False
            if not link.closed:
                with contextlib.suppress(Exception):
                    link.ws.transport.abort()
        self.link = None

    def abort(self, resume: bool = True) -> None:
        """Drop the socket at once, as a lost network would; the loop reconnects."""
        if not resume:
            self.no_resume = True
        link = self.link
        if link is not None and not link.closed:
            link.ws.transport.abort()

    async def close_gracefully(self) -> None:
        link = self.link
        if link is not None and not link.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.ws.close(), 2)

    async def connect(self, broker: int | None) -> Link:
        """A new socket to broker `broker` (None: through nginx), said hello to, with every
        channel subscribed."""
        front = self.run.front
        url = front.url if broker is None and front is not None else self.run.brokers[
            broker or 0].url
        ws = await connect(url, subprotocols=[Subprotocol("tablelock.v1")], compression=None,
                           open_timeout=5, close_timeout=1, max_size=2**22)
        link = Link(ws, broker)
        self.link = link
        link.reader = asyncio.create_task(self._read(link))
        resume = self.session_id if self.session_id and not self.no_resume else None
        self.no_resume = False
        hello: Frame = {"token": self.token, "protocol": 1, "locale": "en",
                        "client": {"name": "chaos", "version": "1"}}
        if resume:
            hello["resume"] = resume
            # What this client has read: frames that died in flight with the old socket are
            # replayed too (docs/protocol.md, "Seq numbering and recovery").
            hello["seen"] = {channel: mirror.seq for channel, mirror in self.mirrors.items()
                             if mirror.seq is not None}
        reply = await self.call(link, "hello", hello, timeout=5)
        if reply is None or not reply.get("ok"):
            code = "LOST" if reply is None else reply["error"]["code"]
            raise ConnectionError(f"hello {code}")
        self.session_id = reply["session_id"]
        link.resumed = bool(reply["resumed"])
        if link.resumed:
            self.run.stats.resumed += 1
            again = set(reply.get("resubscribe") or [])
            channels = [c for c, m in self.mirrors.items() if c in again or m.seq is None]
        else:
            channels = list(self.mirrors)
        for _ in range(4):  # and any channel a screen started to follow meanwhile
            for channel in channels:
                if channel not in self.mirrors:
                    continue
                sub = await self.subscribe(link, channel)
                if sub is None or not sub.get("ok"):
                    raise ConnectionError("subscribe " + ("LOST" if sub is None
                                                          else sub["error"]["code"]))
            channels = [c for c, m in self.mirrors.items() if m.seq is None]
            if not channels:
                break
        else:
            raise ConnectionError("subscriptions did not settle")
        link.ready = True  # no await since the check above: nothing slipped in between
        link.online = True
        self.online.append([time.time() * 1000, math.inf])
        if self.counted:
            self.run.stats.connects += 1
            if self.ever_connected:
                self.run.stats.reconnects += 1
        self.ever_connected = True
        return link

    async def subscribe(self, link: Link, channel: str) -> Frame | None:
        mirror = self.mirrors.get(channel)
        params: Frame = {"channel": channel}
        since = mirror.seq if mirror is not None else None
        if since is not None:
            params["since"] = since

        def install(reply: Frame) -> None:  # runs in the reader, before any later frame
            target = self.mirrors.get(channel)
            if not reply.get("ok") or target is None:
                return
            self._install(target, reply, since)

        return await self.call(link, "subscribe", params, timeout=5, on_reply=install)

    def _install(self, mirror: Mirror, reply: Frame, since: int | None) -> None:
        seq, snapshot = reply["seq"], reply["snapshot"]
        if since is None or mirror.seq is None:
            mirror.load(snapshot, seq)
            return
        if not reply.get("recovered"):
            self.run.stats.snapshot_fallbacks += 1
            mirror.load(snapshot, seq)
            return
        self.run.stats.since_recovered += 1
        for frame in reply.get("missed") or []:
            self.run.record_event(frame)
            assert mirror.seq is not None
            if frame["seq"] <= mirror.seq:
                continue
            if frame["seq"] != mirror.seq + 1:
                self.run.checks["recovery"].fail(
                    f"{mirror.channel}: missed jumps from {mirror.seq} to {frame['seq']}")
                mirror.load(snapshot, seq)
                return
            mirror.apply(frame)
        truth = snapshot_view(mirror.channel, snapshot)
        if mirror.seq != seq:
            self.run.checks["recovery"].fail(
                f"{mirror.channel}: since={since} recovered to seq {mirror.seq}, snapshot at {seq}")
        else:
            diff = view_diff(mirror.view(), truth)
            if diff:
                self.run.checks["recovery"].fail(f"{self.sub} {mirror.channel}@{seq}: {diff}")
        mirror.load(snapshot, seq)

    async def call(self, link: Link, type_: str, params: Frame, timeout: float = 5.0,
                    on_reply: Callable[[Frame], None] | None = None) -> Frame | None:
        """One request on this link: its reply, or None when the link died or it timed out."""
        if link.closed:
            return None
        request_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        link.pending[request_id] = (future, on_reply)
        try:
            message = {"id": request_id, "type": type_, **params}
            self.run.trace(self, link, "out", message)
            await link.ws.send(json.dumps(message))
            if type_ in WRITES:
                self.run.write_sent(f"{type_} of {self.store.store_id}/{self.sub}")
            return await asyncio.wait_for(future, timeout)
        except (websockets.ConnectionClosed, ConnectionError, TimeoutError, OSError):
            return None
        finally:
            link.pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by the reader while the send failed: seen

    async def req(self, type_: str, timeout: float = 5.0, **params: Any) -> Frame | None:
        """A request on the current connection, tallied by outcome."""
        link = self.link
        if link is None or not link.ready:
            self.run.stats.requests[(type_, "OFFLINE")] += 1
            return None
        sent = time.monotonic()  # (not elapsed(): its origin moves once setup is done)
        reply = await self.call(link, type_, params, timeout)
        self.run.history.record(self.store.store_id, self.sub, type_, params, sent,
                                time.monotonic(), reply)
        code = "LOST" if reply is None else "OK" if reply.get("ok") else reply["error"]["code"]
        self.run.stats.requests[(type_, code)] += 1
        return reply

    async def _read(self, link: Link) -> None:
        try:
            async for raw in link.ws:
                if link.broken:
                    continue
                frame = json.loads(raw)
                self.run.trace(self, link, "in", frame)
                kind = frame.get("type")
                try:
                    if kind == "event":
                        self._on_event(link, frame)
                    elif kind == "rpc":
                        self._on_rpc(link, frame)
                    else:
                        entry = link.pending.pop(frame.get("id"), None)
                        if entry is not None:
                            future, on_reply = entry
                            if on_reply is not None:
                                on_reply(frame)
                            if not future.done():
                                future.set_result(frame)
                except Exception as exc:  # a bug of this script: shown, never hidden
                    if len(self.run.stats.reader_errors) < 5:
                        self.run.stats.reader_errors.append(f"{type(exc).__name__}: {exc}")
        except websockets.ConnectionClosed:
            pass
        finally:
            if link.online and self.online and self.online[-1][1] == math.inf:
                self.online[-1][1] = time.time() * 1000
            link.closed = True
            link.ready = False
            for future, _ in link.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("closed"))
            link.pending.clear()

    def _on_event(self, link: Link, frame: Frame) -> None:
        if frame.get("direct"):
            if frame["event"] == "lock.contended":
                self.run.stats.contended += 1
            else:
                self.forget_lock(frame.get("lock"))
            return
        self.run.record_event(frame)
        mirror = self.mirrors.get(frame["channel"])
        if mirror is None or mirror.seq is None:
            return
        seq = frame["seq"]
        if seq <= mirror.seq:
            self.run.checks["delivery"].fail(
                f"t={self.run.elapsed():.1f}s {self.store.store_id}/{self.sub} "
                f"{frame['channel']}: seq {seq} after {mirror.seq} "
                f"({'resumed' if link.resumed else 'fresh'} connection)")
            return
        if seq != mirror.seq + 1:
            self.run.checks["delivery"].fail(
                f"t={self.run.elapsed():.1f}s {self.store.store_id}/{self.sub} "
                f"{frame['channel']}: gap {mirror.seq} -> {seq} on broker "
                f"{self.run.broker_name(link.broker)}, "
                f"{'resumed' if link.resumed else 'fresh'} connection "
                f"{time.monotonic() - link.opened:.1f}s old")
            self.run.stats.gap_resyncs += 1
            if link.resumed:
                self.run.stats.gaps_after_resume += 1
            link.broken = True
            self.abort(resume=False)  # a gap: the client must take a snapshot again
            return
        oddity = mirror.apply(frame)
        if oddity:
            self.run.checks["views"].fail(f"{self.sub}: {oddity}")
        self.learn(frame)

    def learn(self, frame: Frame) -> None:
        """An event, once its mirror took it: a screen acts on it (screen.py)."""

    def forget_lock(self, lock: Frame | None) -> None:
        """A lock of this terminal ended: a screen stops counting it as held (screen.py)."""

    def _on_rpc(self, link: Link, frame: Frame) -> None:
        """order.fetch: the erp_main answers from the store's book."""
        params = frame.get("params") or {}
        order_id = params.get("order_id") or self.store.current.get(params.get("table_id", ""))
        order = self.store.book.get(order_id or "")
        if order is None:
            answer: Frame = {"ok": False, "error": {"code": "NOT_FOUND", "message": "no order"}}
        else:
            answer = {"ok": True, "result": {"order": order}}
        text = json.dumps({"type": "rpc.result", "rid": frame["rid"], **answer})
        self.run.spawn(self._send_quietly(link, text))

    @staticmethod
    async def _send_quietly(link: Link, text: str) -> None:
        with contextlib.suppress(Exception):
            await link.ws.send(text)
