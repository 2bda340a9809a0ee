"""The WebSocket endpoint `/ws`: hello, dispatch by request type, close codes.

A raw ASGI app (no per-message wrapper objects): each frame is decoded once
into a typed request, turned into a `rules` command, applied by the backend,
and answered. Events reach the connection through the hub, never from here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

from . import metrics
from .auth import AuthError, Tokens
from .backends.base import Backend, Numbered, OutcomeUnknown, Unavailable
from .hub import Connection, Hub
from .model import Lock, Order, StoreConfig, Terminal
from .prompts import prompt
from .protocol import (
    AUTH_REFUSED,
    AUTHORITY_REFUSED,
    BACKEND_UNAVAILABLE,
    CONNECTION_LIMIT,
    DRAINING,
    HELLO_TIMEOUT,
    NOT_HELLO,
    PROTOCOL_VERSION,
    RATE_LIMIT,
    SUBPROTOCOL,
    UNSUPPORTED,
    AcquireResult,
    BadFrame,
    CheckRequest,
    CheckResult,
    ClientMessage,
    Close,
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
    OrderSnapshot,
    PaymentComplete,
    PaymentResult,
    Ping,
    PingResult,
    PublishResult,
    ReleaseResult,
    RenewResult,
    Request,
    RpcResult,
    StoreInfo,
    Subscribe,
    SubscribeResult,
    TokenRefresh,
    TokenRefreshResult,
    Unsubscribe,
    decode,
    encode,
    parse_channel,
)
from .relay import PullLimited, Relay
from .rules import (
    Acquire,
    Acquired,
    Check,
    Checked,
    Command,
    Complete,
    Ingest,
    Ingested,
    Outcome,
    Paid,
    Publish,
    Published,
    Release,
    Released,
    Renew,
    Renewed,
    Result,
    Tick,
    capability,
    sees_order,
    sees_table,
)
from .settings import Settings
from .wire import shed_handshake

log = logging.getLogger("tablelock.gateway")

RequestId = int | str | None


class Refused(Exception):
    """A request refused before it reached the core (scoping, bad parameters)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


def ok_frame(request_id: int | str, result: msgspec.Struct | None = None) -> bytes:
    """`{"id": ..., "ok": true, ...result}`, spliced from the result's own encoding."""
    head = b'{"id":' + encode(request_id) + b',"ok":true'
    body = encode(result) if result is not None else b"{}"
    return head + (b"," + body[1:] if len(body) > 2 else b"}")


def error_frame(request_id: RequestId, code: str, locale: str, *, variant: str = "",
                can_force: bool = False, lock: Lock | None = None, detail: str = "",
                outcome: Literal["unknown"] | None = None) -> bytes:
    message = prompt(code, locale, variant)
    if detail:
        message = f"{message} ({detail})"
    body = ErrorBody(code, message, can_force, lock, outcome)
    return encode(ErrorReply(request_id, body))


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
        self.draining = False
        # A reconnect storm queues here rather than all at once at the backend, where its
        # calls would time out together and come back, refused, as another storm.
        self._arrivals = asyncio.Semaphore(32)
        # Sockets that have not said hello yet, oldest first (see _admit_anonymous).
        self._anonymous: dict[Connection, None] = {}
        self._handlers: dict[type, Handler] = {
            Ping: self._ping,
            TokenRefresh: self._refresh,
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
        if not self._origin_allowed(scope):
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
            _hello_refused("no_hello")
            conn.close(*HELLO_TIMEOUT)
            return False
        finally:
            self._anonymous.pop(conn, None)  # whatever it said, it is no longer waiting
        if message["type"] != "websocket.receive":
            return False
        try:
            hello = decode(_payload(message))
        except BadFrame as bad:
            _hello_refused("bad_request", detail=bad.detail)
            conn.send(error_frame(bad.request_id, "BAD_REQUEST", conn.locale, detail=bad.detail))
            conn.close(*NOT_HELLO)
            return False
        locale = getattr(hello, "locale", None) or conn.locale
        if not isinstance(hello, Hello):
            _hello_refused("bad_request", detail="the first frame must be hello")
            conn.send(error_frame(getattr(hello, "id", None), "BAD_REQUEST", locale,
                                  detail="the first frame must be hello"))
            conn.close(*NOT_HELLO)
            return False
        if hello.protocol != PROTOCOL_VERSION:
            _hello_refused("unsupported_protocol", detail=f"protocol {hello.protocol}")
            conn.send(error_frame(hello.id, "UNSUPPORTED_PROTOCOL", locale,
                                  detail=f"this broker speaks protocol {PROTOCOL_VERSION}"))
            conn.close(*UNSUPPORTED)
            return False
        try:
            terminal, expires = self.tokens.verify(hello.token)
            if hello.store_id is not None and hello.store_id != terminal.store_id:
                raise AuthError("store_id differs from the token's store")
        except AuthError as exc:
            _hello_refused("auth_failed", detail=str(exc))
            conn.send(error_frame(hello.id, "AUTH_FAILED", locale, detail=str(exc)))
            conn.close(*AUTH_REFUSED)
            return False
        if hello.order_authority and not capability(terminal.role).order_authority:
            # Whoever answers order.fetch writes the orders the store pays against: only
            # an ERP terminal may (a phone that said so answered pulls with forged bills).
            _hello_refused("forbidden", terminal, "order_authority is for ERP terminals")
            conn.send(error_frame(hello.id, "FORBIDDEN", locale,
                                  detail="order_authority is for ERP terminals"))
            conn.close(*AUTHORITY_REFUSED)
            return False
        full = self._full(terminal)
        if full:
            _hello_refused("limit_reached", terminal, full)
            conn.send(error_frame(hello.id, "LIMIT_REACHED", locale, detail=full))
            conn.close(*CONNECTION_LIMIT)
            return False
        # Counted at once, before any await, so that simultaneous hellos see each other.
        session, resumed = self.hub.attach(conn, terminal, hello.resume, hello.order_authority)
        metrics.CONNECTIONS.labels(terminal.role).inc()
        log.info("connected", extra={"store": terminal.store_id, "terminal": terminal.terminal_id,
                                     "role": terminal.role})
        try:
            async with self._arrivals:
                config = await self.backend.get_config(terminal.store_id)
                conn.locale = hello.locale or config.locale
                await self.backend.terminal_up(terminal, conn.authority)
                missed, lost = await self._missed(conn, hello.seen) if resumed else ({}, [])
                result = HelloResult(session.session_id, resumed, terminal,
                                     StoreInfo(terminal.store_id, config),
                                     self.settings.heartbeat_ms, await self.backend.now(), lost)
        except Unavailable as exc:
            _hello_refused("unavailable", terminal, str(exc))
            # The store's locale could not be read: the hello's own, else the default.
            conn.send(error_frame(hello.id, "UNAVAILABLE", locale))
            conn.close(*BACKEND_UNAVAILABLE)
            return False
        conn.send(ok_frame(hello.id, result))
        self._expire_at(conn, expires)
        for channel, events in missed.items():  # then what the session missed, in order
            for seq, frame, table_id in events:
                self.hub.replay(conn, channel, seq, frame, table_id)
            self.hub.end_subscribe(conn, channel)
        return True

    async def _missed(self, conn: Connection, seen: dict[str, int] | None,
                      ) -> tuple[dict[str, list[Numbered]], list[str]]:
        """What a resumed session missed per channel, from the last seq written to it or the
        last the client says it read; channels whose history is gone are dropped from the
        session and named in the reply, for the client to subscribe again."""
        assert conn.session is not None
        missed, lost = {}, []
        for channel, written in list(conn.session.subs.items()):
            last = min(written, (seen or {}).get(channel, written))
            conn.session.subs[channel] = last
            events = await self.backend.history(channel, last)
            if events is None:
                self.hub.unsubscribe(conn, channel)
                lost.append(channel)
            else:
                missed[channel] = events
        return missed, lost

    async def _serve(self, conn: Connection, receive: Callable[[], Awaitable[Any]]) -> None:
        while not conn.closed:  # once the broker closes a connection, it reads no more
            message = await receive()
            if conn.closed:
                return
            if message["type"] != "websocket.receive":
                conn.close_code = conn.close_code or message.get("code")
                return
            problem = ""
            try:
                request: ClientMessage | None = decode(_payload(message))
                request_id = getattr(request, "id", None)
            except BadFrame as bad:
                request, request_id, problem = None, bad.request_id, bad.detail
            if not conn.take_token():  # every frame counts, good or bad
                metrics.RATE_LIMITED.inc()
                if isinstance(request, Request):
                    _count(request, "RATE_LIMITED")
                conn.send(error_frame(request_id, "RATE_LIMITED", conn.locale))
                if conn.over_limit():
                    conn.close(*RATE_LIMIT)
                continue
            if request is None:
                conn.send(error_frame(request_id, "BAD_REQUEST", conn.locale, detail=problem))
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
        if request.store_id is not None and request.store_id != conn.terminal.store_id:
            self._fail(conn, request, "FORBIDDEN", detail="another store")
            return
        await self._run(conn, request, handler(conn, request))

    async def _run(self, conn: Connection, request: Request, work: Awaitable[None]) -> None:
        """Run a request's handler; whatever it raises becomes that request's error reply."""
        try:
            await work
        except Refused as refused:
            self._fail(conn, request, refused.code, detail=refused.detail)
        except OutcomeUnknown:  # the write may have been applied: the client reads first
            _count(request, "UNAVAILABLE")
            conn.send(error_frame(request.id, "UNAVAILABLE", conn.locale, outcome="unknown"))
        except Unavailable:
            self._fail(conn, request, "UNAVAILABLE")
        except Exception:
            log.exception("request %s failed", type(request).__name__,
                          extra={"request_id": str(request.id)})
            self._fail(conn, request, "UNAVAILABLE", detail="internal error")

    def _origin_allowed(self, scope: dict[str, Any]) -> bool:
        """Browsers may connect from the broker's own origin or an allowed one."""
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if origin is None:
            return True  # not a browser: its token is its only credential
        allowed = self.settings.allowed_origins
        text = origin.decode("latin-1")
        scheme = "https" if scope.get("scheme") == "wss" else "http"
        own = f"{scheme}://{headers.get(b'host', b'').decode('latin-1')}"
        return "*" in allowed or text in allowed or text == own

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

    def _full(self, terminal: Terminal) -> str:
        """Why one more connection is refused, or '' when it is welcome."""
        settings = self.settings
        # Only terminals past hello count here: silent sockets have their own bound.
        if len(self.hub.connections) - len(self._anonymous) > settings.max_connections:
            return f"this broker holds {settings.max_connections} connections already"
        if self.hub.store_connections(terminal.store_id) >= settings.max_connections_per_store:
            return f"store {terminal.store_id} has {settings.max_connections_per_store} already"
        if self.hub.online_connections(terminal) >= settings.max_connections_per_terminal:
            return (f"terminal {terminal.terminal_id} has "
                    f"{settings.max_connections_per_terminal} connections already")
        return ""

    @staticmethod
    def _expire_at(conn: Connection, expires_s: int) -> None:
        """Close the connection when its token ends (Hub.expire_tokens), unless
        `token.refresh` moves the end."""
        conn.expires_at = expires_s

    async def _refresh(self, conn: Connection, request: TokenRefresh) -> None:
        try:
            terminal, expires = self.tokens.verify(request.token)
        except AuthError as exc:
            raise Refused("AUTH_FAILED", str(exc)) from None
        if terminal != conn.terminal:
            raise Refused("AUTH_FAILED", "the new token names another terminal")
        self._expire_at(conn, expires)
        self._ok(conn, request, TokenRefreshResult(expires * 1000))

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
        self.hub.detach(conn, grace)
        try:
            await self.backend.terminal_down(terminal)
        except Unavailable:
            log.warning("could not record %s going offline", terminal.terminal_id)

    # --- helpers --------------------------------------------------------------------------

    def _spawn(self, conn: Connection, request: Request, work: Awaitable[None]) -> None:
        """Answer a request that waits for an ERP without holding up the connection."""
        task = asyncio.ensure_future(self._run(conn, request, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, conn: Connection, order_id: str, command: Command) -> Outcome:
        assert conn.terminal is not None
        return await self.backend.apply(conn.terminal.store_id, order_id, command, conn.terminal)

    @staticmethod
    def _ok(conn: Connection, request: Request, result: msgspec.Struct | None = None) -> None:
        _count(request, "OK")
        conn.send(ok_frame(request.id, result))

    @staticmethod
    def _fail(conn: Connection, request: Request, code: str, *, variant: str = "",
              can_force: bool = False, lock: Lock | None = None, detail: str = "") -> None:
        _count(request, code)
        conn.send(error_frame(request.id, code, conn.locale, variant=variant,
                              can_force=can_force, lock=lock, detail=detail))

    def _answer(self, conn: Connection, request: Request, out: Outcome) -> None:
        if out.refusal is not None:
            r = out.refusal
            self._fail(conn, request, r.code, variant=r.variant, can_force=r.can_force,
                       lock=r.lock)
        else:
            assert out.result is not None
            self._ok(conn, request, reply_of(out.result, conn.locale))

    async def _fetch(self, terminal: Terminal, params: dict[str, str]) -> Order | None:
        config = await self.backend.get_config(terminal.store_id)
        try:
            return await self.relay.fetch(terminal, params, config.erp_fetch_timeout_ms)
        except PullLimited:
            raise Refused("RATE_LIMITED", "too many order pulls from the ERP") from None

    # --- requests ---------------------------------------------------------------------------

    async def _ping(self, conn: Connection, request: Ping) -> None:
        self._ok(conn, request, PingResult(await self.backend.now()))

    async def _subscribe(self, conn: Connection, request: Subscribe) -> None:
        terminal = conn.terminal
        assert terminal is not None and conn.session is not None
        parsed = parse_channel(request.channel)
        if parsed is None:
            raise Refused("BAD_REQUEST", "channel must be store:<store> or order:<store>:<order>")
        store_id, order_id = parsed
        if store_id != terminal.store_id:
            raise Refused("FORBIDDEN", "a channel of another store")
        if order_id is None and not capability(terminal.role).store_channel:
            raise Refused("FORBIDDEN", "the store channel is for ERP and manager terminals")
        if (request.channel not in conn.session.subs
                and self.hub.subscription_count(conn) >= self.settings.max_subscriptions):
            raise Refused("LIMIT_REACHED", "too many subscriptions on this connection")
        self.hub.begin_subscribe(conn, request.channel)
        seq = 0
        try:
            seq, snapshot = await self.backend.snapshot(request.channel)
            # An h5's scope is checked on the very record the snapshot shows, not on an
            # earlier read that the order could have moved away from (or come into) since.
            if (isinstance(snapshot, OrderSnapshot) and snapshot.order is not None
                    and not sees_order(terminal, snapshot.order)):
                raise Refused("FORBIDDEN", "an order of another table")
            result = SubscribeResult(request.channel, seq, snapshot)
            if request.since is not None:
                missed = await self.backend.history(request.channel, request.since)
                result.recovered = missed is not None
                # Each event carries its order's table at the time: an h5 is not shown what
                # happened while the order belonged to another table.
                result.missed = [msgspec.Raw(m.frame) for m in missed or ()
                                 if m.seq <= seq and sees_table(terminal, m.table_id)]
            self._ok(conn, request, result)
        except BaseException:
            self.hub.unsubscribe(conn, request.channel)
            raise
        self.hub.end_subscribe(conn, request.channel, seq)

    async def _unsubscribe(self, conn: Connection, request: Unsubscribe) -> None:
        self.hub.unsubscribe(conn, request.channel)
        self._ok(conn, request)

    async def _order_get(self, conn: Connection, request: OrderGet) -> None:
        terminal = conn.terminal
        assert terminal is not None
        if request.order_id is None and request.table_id is None:
            raise Refused("BAD_REQUEST", "order_id or table_id is needed")
        if not sees_table(terminal, request.table_id):
            raise Refused("FORBIDDEN", "another table")
        if request.fresh:
            # The ERP's answer may take a while: don't hold up this connection's other frames.
            self._spawn(conn, request, self._order_get_fresh(conn, request))
            return
        order_id = request.order_id or await self.backend.find_order(
            terminal.store_id, request.table_id or "")
        if order_id is None:
            raise Refused("NOT_FOUND")
        self._send_order(conn, request, await self._apply(conn, order_id, Tick()))

    async def _order_get_fresh(self, conn: Connection, request: OrderGet) -> None:
        terminal = conn.terminal
        assert terminal is not None
        params = ({"order_id": request.order_id} if request.order_id
                  else {"table_id": request.table_id or ""})
        order = await self._fetch(terminal, params)
        if order is None:
            raise Refused("ERP_UNAVAILABLE")
        self._send_order(conn, request, await self._apply(conn, order.order_id, Ingest(order)))

    def _send_order(self, conn: Connection, request: OrderGet, out: Outcome) -> None:
        terminal = conn.terminal
        assert terminal is not None
        rec = out.record
        if rec is None:
            raise Refused("NOT_FOUND")
        if not sees_order(terminal, rec.order):
            raise Refused("FORBIDDEN", "an order of another table")
        self._ok(conn, request, OrderResult(rec.order, list(rec.locks.values())))

    async def _publish(self, conn: Connection, request: OrderPublish) -> None:
        command = Publish(request.order.to_order(), request.change, request.token, request.force,
                          request.operator, request.reason)
        out = await self._apply(conn, request.order.order_id, command)
        self._answer(conn, request, out)

    async def _check(self, conn: Connection, request: CheckRequest) -> None:
        self._answer(conn, request, await self._apply(conn, request.order_id,
                                                      Check(request.action)))

    async def _acquire(self, conn: Connection, request: LockAcquire) -> None:
        command = Acquire(request.kind, request.force, request.operator, request.reason)
        out = await self._apply(conn, request.order_id, command)
        if out.need_fetch:
            self._spawn(conn, request, self._acquire_fresh(conn, request, command))
            return
        self._answer(conn, request, out)

    async def _acquire_fresh(self, conn: Connection, request: LockAcquire,
                             command: Acquire) -> None:
        """Strong link: pull the order from the ERP, then decide again on the fresh copy."""
        assert conn.terminal is not None
        order = await self._fetch(conn.terminal, {"order_id": request.order_id})
        retry = Acquire(command.kind, command.force, command.operator, command.reason,
                        fetched=order, fetch_failed=order is None)
        out = await self._apply(conn, request.order_id, retry)
        self._answer(conn, request, out)

    async def _renew(self, conn: Connection, request: LockRenew) -> None:
        out = await self._apply(conn, request.order_id, Renew(request.kind, request.token))
        self._answer(conn, request, out)

    async def _release(self, conn: Connection, request: LockRelease) -> None:
        command = Release(request.kind, request.token, request.force, request.operator,
                          request.reason)
        out = await self._apply(conn, request.order_id, command)
        self._answer(conn, request, out)

    async def _complete(self, conn: Connection, request: PaymentComplete) -> None:
        command = Complete(request.token, request.version, request.amount_cents,
                           request.payment_ref)
        out = await self._apply(conn, request.order_id, command)
        self._answer(conn, request, out)


def reply_of(result: Result, locale: str) -> msgspec.Struct:
    """The wire reply of a command's result (a refusal `check` reports reads `locale`)."""
    match result:
        case Acquired(enforced, lock, order, released, forced):
            return AcquireResult(lock, order, enforced, released, forced)
        case Renewed(enforced, lock):
            return RenewResult(lock, enforced)
        case Released(lock):
            return ReleaseResult(lock)
        case Published(order):
            return PublishResult(order)
        case Paid(order, payment):
            return PaymentResult(order, payment)
        case Ingested(order, locks):
            return OrderResult(order, locks)
        case Checked(refusal):
            if refusal is None:
                return CheckResult(True)
            return CheckResult(False, refusal.code, prompt(refusal.code, locale, refusal.variant),
                               refusal.can_force, refusal.lock)


def _hello_refused(reason: str, terminal: Terminal | None = None, detail: str = "") -> None:
    """Count and log a refused hello: why, and who when the token was good; never the token."""
    metrics.HELLO_REFUSED.labels(reason).inc()
    extra = {"reason": reason}
    if terminal is not None:
        extra.update(store=terminal.store_id, terminal=terminal.terminal_id, role=terminal.role)
    log.info("hello refused%s", f": {detail}" if detail else "", extra=extra)


def _count(request: Request, code: str) -> None:
    metrics.REQUESTS.inc(str(request.__struct_config__.tag), code)


def _payload(message: dict[str, Any]) -> str | bytes:
    text = message.get("text")
    return text if text is not None else (message.get("bytes") or b"")

