"""The WebSocket endpoint `/ws`: the ASGI driver of each connection's `Conversation`.

A raw ASGI app (no per-message wrapper objects): it reads frames off the socket and hands
them to the connection's conversation (conversation.py), which decides everything the
protocol says; this performs what comes back (a send, a close, a backend or hub call) and
hands the result back. Events reach the connection through the hub, never from here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from . import metrics
from .auth import Tokens
from .backends.base import Backend, Numbered, Unavailable
from .conversation import (
    Apply,
    Conversation,
    FindOrder,
    Goodbye,
    PullOrder,
    Welcome,
    origin_allowed,
)
from .hub import Connection, Hub
from .model import StoreConfig, Terminal, holder_key
from .protocol import DRAINING, SUBPROTOCOL, Close, Ping, RpcResult, Subscribe, Unsubscribe
from .relay import PullLimited, Relay
from .settings import Settings
from .wire import shed_handshake

log = logging.getLogger("tablelock.gateway")

Receive = Callable[[], Awaitable[Any]]


class Gateway:
    def __init__(self, backend: Backend, hub: Hub, relay: Relay, tokens: Tokens,
                 settings: Settings) -> None:
        self.backend = backend
        self.hub = hub
        self.relay = relay
        self.tokens = tokens
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        # A reconnect storm queues here rather than all at once at the backend, where its
        # calls would time out together and come back, refused, as another storm.
        self._arrivals = asyncio.Semaphore(32)
        # Sockets that have not said hello yet, oldest first (see _admit_anonymous).
        self._anonymous: dict[Connection, None] = {}

    # --- the connection's life ----------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive,
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not origin_allowed(scope, self.settings.allowed_origins):
            await send({"type": "websocket.close", "code": Close.AUTH_FAILED})  # HTTP 403
            return
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept",
                    "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None})
        if self.draining:
            await send({"type": "websocket.close", "code": DRAINING.code,
                        "reason": DRAINING.reason})
            return
        shed_handshake(send)
        conn = self.hub.connection(send)
        self._admit_anonymous(conn)
        talk = Conversation(conn, self.hub, self.tokens, self.settings, self._anonymous)
        try:
            if await self._hello(talk, receive):
                await self._serve(talk, receive)
        finally:
            await self._goodbye(conn)
            await conn.wait_closed()

    async def _hello(self, talk: Conversation, receive: Receive) -> bool:
        conn = talk.conn
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                message = await receive()
        except TimeoutError:
            _say_goodbye(conn, talk.hello_timeout())
            return False
        finally:
            self._anonymous.pop(conn, None)  # whatever it said, it is no longer waiting
        if message["type"] != "websocket.receive":
            return False
        welcome = talk.hello(_payload(message))
        if welcome.__class__ is Goodbye:
            _say_goodbye(conn, welcome)
            return False
        assert isinstance(welcome, Welcome)
        terminal, hello = welcome.terminal, welcome.hello
        refusal = await self._count(talk, welcome)
        if refusal is not None:
            _say_goodbye(conn, refusal)
            return False
        # Attached with no await after the count: from here on `_goodbye` uncounts it.
        session = self.hub.attach(conn, terminal, hello.order_authority)
        metrics.CONNECTIONS.labels(terminal.role).inc()
        log.info("connected", extra={"store": terminal.store_id, "terminal": terminal.terminal_id,
                                     "role": terminal.role})
        try:
            async with self._arrivals:
                config = await self.backend.get_config(terminal.store_id)
                talk.store_read(welcome, config)
                await self.backend.terminal_up(terminal, conn.authority)
                resumed = hello.resume is not None and await self._resume(conn, hello.resume)
                missed: dict[str, list[Numbered]] = {}
                lost: list[str] = []
                if resumed:  # kept as held here (a new session is first kept at subscribe)
                    missed, lost = await self._missed(conn, hello.seen)
                    await self._keep(conn)
                reply = talk.welcomed(welcome, session, resumed, config,
                                      await self.backend.now(), lost)
        except Unavailable as exc:
            _say_goodbye(conn, talk.store_unreadable(welcome, exc))
            return False
        conn.send(reply)
        for channel, events in missed.items():  # then what the session missed, in order
            for seq, frame, table_id in events:
                self.hub.replay(conn, channel, seq, frame, table_id)
            self.hub.end_subscribe(conn, channel)
        return True

    async def _resume(self, conn: Connection, session_id: str) -> bool:
        """Take over the session `resume` named, from the backend (any broker kept it), if
        it is still there, is this terminal's and no connection of this broker holds it."""
        terminal = conn.terminal
        assert terminal is not None
        stored = await self.backend.find_session(terminal.store_id, session_id)
        if (stored is None or stored.holder != holder_key(terminal)
                or self.hub.attached(session_id)):
            return False
        self.hub.restore(conn, session_id, stored)
        return True

    async def _count(self, talk: Conversation, welcome: Welcome) -> Goodbye | None:
        """Count the connection where the store's and the terminal's limits are kept (over
        every broker, on Redis); one past a limit is uncounted and refused."""
        try:
            async with self._arrivals:
                counts = await self.backend.count_connection(welcome.terminal)
        except Unavailable as exc:
            return talk.store_unreadable(welcome, exc)
        refusal = talk.admitted(welcome, counts)
        if refusal is not None:
            await self._uncount(welcome.terminal)
        return refusal

    async def _uncount(self, terminal: Terminal) -> None:
        try:
            await self.backend.uncount_connection(terminal)
        except Unavailable:  # the backend says its counts again once it is back
            log.warning("could not uncount a connection of %s", terminal.terminal_id)

    async def _missed(self, conn: Connection, seen: dict[str, int] | None,
                      ) -> tuple[dict[str, list[Numbered]], list[str]]:
        """What a resumed session missed per channel: after the last seq the client says it
        read, else the last the session kept, if the channel still numbers in the same
        epoch. Channels whose history is gone (or whose epoch changed) are dropped from the
        session and named in the reply, for the client to subscribe again."""
        session = conn.session
        assert session is not None
        missed, lost = {}, []
        for channel, kept in list(session.subs.items()):
            last = (seen or {}).get(channel, kept)
            session.subs[channel] = last
            same = await self.backend.stream_epoch(channel) == session.epochs.get(channel)
            events = await self.backend.history(channel, last) if same else None
            if events is None:
                self.hub.unsubscribe(conn, channel)
                lost.append(channel)
            else:
                missed[channel] = events
        return missed, lost

    async def _keep(self, conn: Connection, grace_ms: int | None = None) -> None:
        """Write the connection's session to the backend, for a resume on any broker;
        `grace_ms`: it was detached, and goes after that."""
        session, terminal = conn.session, conn.terminal
        assert session is not None and terminal is not None
        await self.backend.keep_session(terminal.store_id, session.session_id,
                                        self.hub.stored(session), grace_ms)

    async def _kept(self, conn: Connection) -> None:
        """_keep after a subscription changed; a failure costs only a resume's precision."""
        try:
            await self._keep(conn)
        except Unavailable as exc:
            log.warning("could not keep the session: %s", exc)

    async def _serve(self, talk: Conversation, receive: Receive) -> None:
        conn = talk.conn
        backend = self.backend
        terminal = conn.terminal
        assert terminal is not None
        store_id = terminal.store_id
        while not conn.closed:  # once the broker closes a connection, it reads no more
            message = await receive()
            if conn.closed:
                return
            if message["type"] != "websocket.receive":
                conn.close_code = conn.close_code or message.get("code")
                return
            step = talk.receive(_payload(message))
            if isinstance(step, Apply):  # the hot path, inline: no coroutine of its own
                try:
                    out = await backend.apply(store_id, step.order_id, step.command, terminal)
                    answer = talk.answer(step, out)
                except Exception as exc:
                    conn.send(talk.failed(step.request, exc))
                    continue
                if isinstance(answer, bytes):
                    conn.send(answer)
                else:
                    self._spawn(self._pull(talk, answer))
            elif isinstance(step, bytes):
                conn.send(step)
            else:
                await self._perform(talk, step)

    async def _perform(self, talk: Conversation,
                       step: Goodbye | FindOrder | PullOrder | Ping | Subscribe | Unsubscribe
                       | RpcResult) -> None:
        """Carry out what a request asks besides applying a command."""
        conn = talk.conn
        if isinstance(step, Goodbye):
            _say_goodbye(conn, step)
        elif isinstance(step, PullOrder):
            # The ERP's answer may take a while: don't hold up this connection's other frames.
            self._spawn(self._pull(talk, step))
        elif isinstance(step, FindOrder):
            assert conn.terminal is not None
            try:
                order_id = await self.backend.find_order(conn.terminal.store_id, step.table_id)
            except Exception as exc:
                conn.send(talk.failed(step.request, exc))
                return
            await self._apply(talk, talk.found(step, order_id))
        elif isinstance(step, Subscribe):
            await self._subscribe(talk, step)
        elif isinstance(step, Unsubscribe):
            self.hub.unsubscribe(conn, step.channel)
            conn.send(talk.left(step))
            await self._kept(conn)
        elif isinstance(step, Ping):
            try:
                conn.send(talk.pong(step, await self.backend.now()))
            except Exception as exc:
                conn.send(talk.failed(step, exc))
        else:  # the ERP's answer to an order.fetch
            self.relay.resolve(conn, step)

    async def _apply(self, talk: Conversation, step: bytes | Apply) -> None:
        """Apply a command off the hot path and send its answer (never a pull)."""
        conn = talk.conn
        if isinstance(step, bytes):
            conn.send(step)
            return
        assert conn.terminal is not None
        try:
            out = await self.backend.apply(conn.terminal.store_id, step.order_id, step.command,
                                           conn.terminal)
            answer = talk.answer(step, out)
            assert isinstance(answer, bytes), "a command carrying the ERP's answer pulls no more"
        except Exception as exc:
            conn.send(talk.failed(step.request, exc))
            return
        conn.send(answer)

    async def _pull(self, talk: Conversation, pull: PullOrder) -> None:
        """Ask the store's ERP for the order, then apply what the pull was for."""
        conn = talk.conn
        terminal = conn.terminal
        assert terminal is not None
        try:
            config = await self.backend.get_config(terminal.store_id)
            order = await self.relay.fetch(terminal, pull.params, config.erp_fetch_timeout_ms)
        except PullLimited:
            conn.send(talk.pull_limited(pull))
            return
        except Exception as exc:
            conn.send(talk.failed(pull.request, exc))
            return
        await self._apply(talk, talk.pulled(pull, order))

    async def _subscribe(self, talk: Conversation, request: Subscribe) -> None:
        conn, hub, channel, backend = talk.conn, self.hub, request.channel, self.backend
        hub.begin_subscribe(conn, channel)
        epoch = ""
        try:
            seq, epoch, snapshot = await backend.snapshot(channel)
            # A `since` of another epoch was numbered by a stream that is gone.
            since = request.since if request.epoch in (None, epoch) else None
            missed = await backend.history(channel, since) if since is not None else None
            stands, reply = talk.subscribed(request, seq, epoch, snapshot, missed)
        except Exception as exc:
            stands, reply = False, talk.failed(request, exc)
        except BaseException:
            hub.unsubscribe(conn, channel)
            raise
        if not stands:
            hub.unsubscribe(conn, channel)
        conn.send(reply)
        if stands:  # the events that came meanwhile follow the reply
            hub.end_subscribe(conn, channel, seq, epoch)
            await self._kept(conn)

    def _admit_anonymous(self, conn: Connection) -> None:
        """Sockets without hello have their own bound, apart from max_connections: past it,
        the oldest of them is closed (4008). A terminal says hello one round trip after
        its upgrade, so a flood of silent sockets cannot keep it out."""
        anonymous = self._anonymous
        anonymous[conn] = None
        if len(anonymous) > self.settings.max_anonymous_connections:
            oldest = next(iter(anonymous))
            del anonymous[oldest]
            metrics.ANONYMOUS_EVICTED.inc()
            oldest.close(Close.POLICY, "too many connections without hello")

    def drain(self, window_s: float) -> None:
        """SIGTERM: refuse newcomers and ask everyone to reconnect (1012), spread out over the
        window so that they don't all come back to the other brokers at once."""
        self.draining = True
        loop = asyncio.get_running_loop()
        conns = list(self.hub.connections)
        random.shuffle(conns)
        for n, conn in enumerate(conns):
            loop.call_later(window_s * n / max(len(conns), 1), conn.close, *DRAINING)

    async def _goodbye(self, conn: Connection) -> None:
        terminal = conn.terminal
        if terminal is None:
            self.hub.connections.discard(conn)
            return
        metrics.CONNECTIONS.labels(terminal.role).dec()
        log.info("disconnected", extra={"store": terminal.store_id,
                                        "terminal": terminal.terminal_id,
                                        "role": terminal.role, "close_code": conn.close_code})
        try:
            config = await self.backend.get_config(terminal.store_id)
            grace = config.disconnect_grace_ms
        except Unavailable:
            grace = StoreConfig().disconnect_grace_ms
        self.hub.detach(conn)
        try:
            await self._keep(conn, grace)
        except Unavailable:
            log.warning("could not keep the session of %s", terminal.terminal_id)
        try:
            await self.backend.terminal_down(terminal)
        except Unavailable:
            log.warning("could not record %s going offline", terminal.terminal_id)
        await self._uncount(terminal)

    def _spawn(self, work: Awaitable[None]) -> None:
        """Answer a request that waits for an ERP without holding up the connection."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _say_goodbye(conn: Connection, goodbye: Goodbye) -> None:
    if goodbye.frame is not None:
        conn.send(goodbye.frame)
    conn.close(goodbye.code, goodbye.reason)


def _payload(message: dict[str, Any]) -> str | bytes:
    text = message.get("text")
    return text if text is not None else (message.get("bytes") or b"")
