"""The WebSocket endpoint `/ws`: hello, dispatch by request type, close codes.

A raw ASGI app (no per-message wrapper objects): each frame is decoded once
into a typed request, turned into a `rules` command, applied by the backend,
and answered. Events reach the connection through the hub, never from here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from .auth import AuthError, Tokens
from .backends.base import Backend, Numbered, Unavailable
from .hub import Connection, Hub
from .model import FORCING_ROLES, Lock, Terminal
from .prompts import prompt
from .protocol import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    AcquireResult,
    BadFrame,
    CheckRequest,
    CheckResult,
    ClientMessage,
    ErrorBody,
    ErrorReply,
    Hello,
    HelloResult,
    LockAcquire,
    LockRelease,
    LockRenew,
    OrderGet,
    OrderPublish,
    OrderResult,
    PaymentComplete,
    PaymentResult,
    Ping,
    PingResult,
    PublishResult,
    ReleaseResult,
    RenewResult,
    RpcResult,
    StoreInfo,
    Subscribe,
    SubscribeResult,
    Unsubscribe,
    decode,
    encode,
    parse_channel,
)
from .relay import Relay
from .rules import (
    Acquire,
    Check,
    Command,
    Complete,
    Ingest,
    Outcome,
    Publish,
    Release,
    Renew,
    Tick,
)
from .settings import Settings

log = logging.getLogger("tablelock.gateway")

CLOSE_NO_HELLO = 4001
CLOSE_UNSUPPORTED_PROTOCOL = 4002
CLOSE_AUTH_FAILED = 4003

RequestId = int | str | None


class Refused(Exception):
    """A request refused before it reached the core (scoping, bad parameters)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


def ok_frame(request_id: int | str, result: msgspec.Struct | None = None) -> str:
    """`{"id": ..., "ok": true, ...result}`, spliced from the result's own encoding."""
    head = b'{"id":' + encode(request_id) + b',"ok":true'
    body = encode(result) if result is not None else b"{}"
    return (head + (b"," + body[1:] if len(body) > 2 else b"}")).decode()


def error_frame(request_id: RequestId, code: str, locale: str, *, variant: str = "",
                can_force: bool = False, lock: Lock | None = None, detail: str = "") -> str:
    message = prompt(code, locale, variant)
    if detail:
        message = f"{message} ({detail})"
    body = ErrorBody(code, message, can_force, lock)
    return encode(ErrorReply(request_id, body)).decode()


Handler = Callable[[Connection, Any], Awaitable[None]]


class Gateway:
    def __init__(self, backend: Backend, hub: Hub, relay: Relay, tokens: Tokens,
                 settings: Settings) -> None:
        self.backend = backend
        self.hub = hub
        self.relay = relay
        self.tokens = tokens
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: dict[type, Handler] = {
            Ping: self._ping,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            OrderGet: self._order_get,
            OrderPublish: self._publish,
            CheckRequest: self._check,
            LockAcquire: self._acquire,
            LockRenew: self._renew,
            LockRelease: self._release,
            PaymentComplete: self._complete,
        }

    # --- the connection's life ----------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept",
                    "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None})
        conn = self.hub.connection(send)
        try:
            if await self._hello(conn, receive):
                await self._serve(conn, receive)
        finally:
            await self._goodbye(conn)
            await conn.wait_closed()

    async def _hello(self, conn: Connection, receive: Callable[[], Awaitable[Any]]) -> bool:
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                message = await receive()
        except TimeoutError:
            conn.close(CLOSE_NO_HELLO, "no hello")
            return False
        if message["type"] != "websocket.receive":
            return False
        try:
            hello = decode(_payload(message))
        except BadFrame as bad:
            conn.send(error_frame(bad.request_id, "BAD_REQUEST", conn.locale, detail=bad.detail))
            conn.close(CLOSE_NO_HELLO, "the first frame must be hello")
            return False
        locale = getattr(hello, "locale", None) or conn.locale
        if not isinstance(hello, Hello):
            conn.send(error_frame(getattr(hello, "id", None), "BAD_REQUEST", locale,
                                  detail="the first frame must be hello"))
            conn.close(CLOSE_NO_HELLO, "the first frame must be hello")
            return False
        if hello.protocol != PROTOCOL_VERSION:
            conn.send(error_frame(hello.id, "UNSUPPORTED_PROTOCOL", locale,
                                  detail=f"this broker speaks protocol {PROTOCOL_VERSION}"))
            conn.close(CLOSE_UNSUPPORTED_PROTOCOL, "unsupported protocol")
            return False
        try:
            terminal, _expires = self.tokens.verify(hello.token)
            if hello.store_id is not None and hello.store_id != terminal.store_id:
                raise AuthError("store_id differs from the token's store")
        except AuthError as exc:
            conn.send(error_frame(hello.id, "AUTH_FAILED", locale, detail=str(exc)))
            conn.close(CLOSE_AUTH_FAILED, "auth failed")
            return False
        try:
            config = await self.backend.get_config(terminal.store_id)
            session, resumed = self.hub.attach(conn, terminal, hello.resume,
                                               hello.order_authority)
            conn.locale = hello.locale or config.locale
            await self.backend.terminal_up(terminal, conn.authority)
            missed, lost = await self._missed(conn) if resumed else ({}, [])
            result = HelloResult(session.session_id, resumed, terminal,
                                 StoreInfo(terminal.store_id, config),
                                 self.settings.heartbeat_ms, await self.backend.now(), lost)
        except Unavailable:
            conn.send(error_frame(hello.id, "UNAVAILABLE", conn.locale))
            conn.close(1013, "backend unavailable")
            return False
        conn.send(ok_frame(hello.id, result))
        for channel, events in missed.items():  # then what the session missed, in order
            for seq, frame, table_id in events:
                self.hub.replay(conn, channel, seq, frame.decode(), table_id)
            self.hub.end_subscribe(conn, channel)
        return True

    async def _missed(self, conn: Connection) -> tuple[dict[str, list[Numbered]], list[str]]:
        """What a resumed session missed per channel; channels whose history is gone are
        dropped from the session and named in the reply, for the client to subscribe again."""
        assert conn.session is not None
        missed, lost = {}, []
        for channel, last in list(conn.session.subs.items()):
            events = await self.backend.history(channel, last)
            if events is None:
                self.hub.unsubscribe(conn, channel)
                lost.append(channel)
            else:
                missed[channel] = events
        return missed, lost

    async def _serve(self, conn: Connection, receive: Callable[[], Awaitable[Any]]) -> None:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            try:
                request = decode(_payload(message))
            except BadFrame as bad:
                conn.send(error_frame(bad.request_id, "BAD_REQUEST", conn.locale,
                                      detail=bad.detail))
                continue
            await self._dispatch(conn, request)

    async def _dispatch(self, conn: Connection, request: ClientMessage) -> None:
        if isinstance(request, RpcResult):
            self.relay.resolve(conn, request)
            return
        handler = self._handlers.get(type(request))
        if handler is None:  # a second hello
            conn.send(error_frame(request.id, "BAD_REQUEST", conn.locale,
                                  detail="hello was already said"))
            return
        assert conn.terminal is not None
        try:
            if request.store_id is not None and request.store_id != conn.terminal.store_id:
                raise Refused("FORBIDDEN", "another store")
            await handler(conn, request)
        except Refused as refused:
            conn.send(error_frame(request.id, refused.code, conn.locale, detail=refused.detail))
        except Unavailable:
            conn.send(error_frame(request.id, "UNAVAILABLE", conn.locale))
        except Exception:
            log.exception("request %s failed", type(request).__name__)
            conn.send(error_frame(request.id, "UNAVAILABLE", conn.locale,
                                  detail="internal error"))

    async def _goodbye(self, conn: Connection) -> None:
        terminal = conn.terminal
        if terminal is None:
            self.hub.connections.discard(conn)
            return
        try:
            config = await self.backend.get_config(terminal.store_id)
            grace = config.disconnect_grace_ms
        except Unavailable:
            grace = 30_000
        self.hub.detach(conn, grace)
        try:
            await self.backend.terminal_down(terminal)
        except Unavailable:
            log.warning("could not record %s going offline", terminal.terminal_id)

    # --- helpers --------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, conn: Connection, order_id: str, command: Command) -> Outcome:
        assert conn.terminal is not None
        return await self.backend.apply(conn.terminal.store_id, order_id, command, conn.terminal)

    def _answer(self, conn: Connection, request_id: int | str, out: Outcome,
                result: Callable[[dict[str, Any]], msgspec.Struct]) -> None:
        if out.refusal is not None:
            r = out.refusal
            conn.send(error_frame(request_id, r.code, conn.locale, variant=r.variant,
                                  can_force=r.can_force, lock=r.lock))
        else:
            assert out.result is not None
            conn.send(ok_frame(request_id, result(out.result)))

    async def _fetch(self, terminal: Terminal, params: dict[str, str]):  # type: ignore[no-untyped-def]
        config = await self.backend.get_config(terminal.store_id)
        return await self.relay.fetch(terminal.store_id, params, config.erp_fetch_timeout_ms)

    # --- requests ---------------------------------------------------------------------------

    async def _ping(self, conn: Connection, request: Ping) -> None:
        conn.send(ok_frame(request.id, PingResult(await self.backend.now())))

    async def _subscribe(self, conn: Connection, request: Subscribe) -> None:
        terminal = conn.terminal
        assert terminal is not None and conn.session is not None
        parsed = parse_channel(request.channel)
        if parsed is None:
            raise Refused("BAD_REQUEST", "channel must be store:<store> or order:<store>:<order>")
        store_id, order_id = parsed
        if store_id != terminal.store_id:
            raise Refused("FORBIDDEN", "a channel of another store")
        if order_id is None and terminal.role not in FORCING_ROLES:
            raise Refused("FORBIDDEN", "the store channel is for ERP and manager terminals")
        if order_id is not None and terminal.role == "h5":
            rec = await self.backend.read(store_id, order_id)
            if rec is not None and rec.order.table_id != terminal.table_id:
                raise Refused("FORBIDDEN", "an order of another table")
        if (request.channel not in conn.session.subs
                and self.hub.subscription_count(conn) >= self.settings.max_subscriptions):
            raise Refused("BAD_REQUEST", "too many subscriptions on this connection")
        self.hub.begin_subscribe(conn, request.channel)
        seq = 0
        try:
            seq, snapshot = await self.backend.snapshot(request.channel)
            result = SubscribeResult(request.channel, seq, snapshot)
            if request.since is not None:
                missed = await self.backend.history(request.channel, request.since)
                result.recovered = missed is not None
                result.missed = [msgspec.Raw(m.frame) for m in missed or () if m.seq <= seq]
            conn.send(ok_frame(request.id, result))
        except BaseException:
            self.hub.unsubscribe(conn, request.channel)
            raise
        self.hub.end_subscribe(conn, request.channel, seq)

    async def _unsubscribe(self, conn: Connection, request: Unsubscribe) -> None:
        self.hub.unsubscribe(conn, request.channel)
        conn.send(ok_frame(request.id))

    async def _order_get(self, conn: Connection, request: OrderGet) -> None:
        terminal = conn.terminal
        assert terminal is not None
        if request.order_id is None and request.table_id is None:
            raise Refused("BAD_REQUEST", "order_id or table_id is needed")
        if terminal.role == "h5" and request.table_id not in (None, terminal.table_id):
            raise Refused("FORBIDDEN", "another table")
        if request.fresh:
            # The ERP's answer may take a while: don't hold up this connection's other frames.
            self._spawn(self._order_get_fresh(conn, request))
            return
        order_id = request.order_id or await self.backend.find_order(
            terminal.store_id, request.table_id or "")
        if order_id is None:
            raise Refused("NOT_FOUND")
        self._send_order(conn, request.id, await self._apply(conn, order_id, Tick()))

    async def _order_get_fresh(self, conn: Connection, request: OrderGet) -> None:
        terminal = conn.terminal
        assert terminal is not None
        params = ({"order_id": request.order_id} if request.order_id
                  else {"table_id": request.table_id or ""})
        try:
            order = await self._fetch(terminal, params)
            if order is None:
                raise Refused("ERP_UNAVAILABLE")
            self._send_order(conn, request.id,
                             await self._apply(conn, order.order_id, Ingest(order)))
        except Refused as refused:
            conn.send(error_frame(request.id, refused.code, conn.locale, detail=refused.detail))
        except Unavailable:
            conn.send(error_frame(request.id, "UNAVAILABLE", conn.locale))

    def _send_order(self, conn: Connection, request_id: int | str, out: Outcome) -> None:
        terminal = conn.terminal
        assert terminal is not None
        rec = out.record
        if rec is None:
            raise Refused("NOT_FOUND")
        if terminal.role == "h5" and rec.order.table_id != terminal.table_id:
            raise Refused("FORBIDDEN", "an order of another table")
        conn.send(ok_frame(request_id, OrderResult(rec.order, list(rec.locks.values()))))

    async def _publish(self, conn: Connection, request: OrderPublish) -> None:
        command = Publish(request.order.to_order(), request.change, request.token, request.force,
                          request.operator, request.reason)
        out = await self._apply(conn, request.order.order_id, command)
        self._answer(conn, request.id, out, lambda r: PublishResult(**r))

    async def _check(self, conn: Connection, request: CheckRequest) -> None:
        out = await self._apply(conn, request.order_id, Check(request.action))
        if out.refusal is not None:
            raise Refused(out.refusal.code)
        assert out.result is not None
        refusal = out.result.get("refusal")
        if refusal is None:
            conn.send(ok_frame(request.id, CheckResult(True)))
            return
        message = prompt(refusal.code, conn.locale, refusal.variant)
        result = CheckResult(False, refusal.code, message, refusal.can_force, refusal.lock)
        conn.send(ok_frame(request.id, result))

    async def _acquire(self, conn: Connection, request: LockAcquire) -> None:
        command = Acquire(request.kind, request.force, request.operator, request.reason)
        out = await self._apply(conn, request.order_id, command)
        if out.need_fetch:
            self._spawn(self._acquire_fresh(conn, request, command))
            return
        self._answer(conn, request.id, out, lambda r: AcquireResult(**r))

    async def _acquire_fresh(self, conn: Connection, request: LockAcquire,
                             command: Acquire) -> None:
        """Strong link: pull the order from the ERP, then decide again on the fresh copy."""
        assert conn.terminal is not None
        try:
            order = await self._fetch(conn.terminal, {"order_id": request.order_id})
            retry = Acquire(command.kind, command.force, command.operator, command.reason,
                            fetched=order, fetch_failed=order is None)
            out = await self._apply(conn, request.order_id, retry)
            self._answer(conn, request.id, out, lambda r: AcquireResult(**r))
        except Unavailable:
            conn.send(error_frame(request.id, "UNAVAILABLE", conn.locale))

    async def _renew(self, conn: Connection, request: LockRenew) -> None:
        out = await self._apply(conn, request.order_id, Renew(request.kind, request.token))
        self._answer(conn, request.id, out, lambda r: RenewResult(**r))

    async def _release(self, conn: Connection, request: LockRelease) -> None:
        command = Release(request.kind, request.token, request.force, request.operator,
                          request.reason)
        out = await self._apply(conn, request.order_id, command)
        self._answer(conn, request.id, out, lambda r: ReleaseResult(**r))

    async def _complete(self, conn: Connection, request: PaymentComplete) -> None:
        command = Complete(request.token, request.version, request.amount_cents,
                           request.payment_ref)
        out = await self._apply(conn, request.order_id, command)
        self._answer(conn, request.id, out, lambda r: PaymentResult(**r))


def _payload(message: dict[str, Any]) -> str | bytes:
    text = message.get("text")
    return text if text is not None else (message.get("bytes") or b"")

