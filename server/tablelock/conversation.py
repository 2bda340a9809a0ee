"""One WebSocket connection's conversation with the broker, without the socket (sans I/O,
after websockets' `protocol.py`).

Frames come in as text; what comes out is a frame to send, a `Goodbye` (a frame, then a
close), or an action naming the backend or hub call that the driver (gateway.py) performs
and whose result it hands back here to be answered. Everything the protocol decides lives
here: hello and its refusals, the token's end, the rate limit, request scoping, which rules
command a request is, when the ERP is asked first, and the shape of every reply.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from . import metrics
from .auth import AuthError, Tokens
from .backends.base import Numbered, OutcomeUnknown, Unavailable
from .hub import Connection, Hub
from .hub import Session as Resumable
from .model import Lock, Order, StoreConfig, Terminal
from .prompts import prompt
from .protocol import (
    AUTH_REFUSED,
    AUTHORITY_REFUSED,
    BACKEND_UNAVAILABLE,
    CONNECTION_LIMIT,
    HELLO_TIMEOUT,
    NOT_HELLO,
    PROTOCOL_VERSION,
    RATE_LIMIT,
    UNSUPPORTED,
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
    StoreSnapshot,
    Subscribe,
    SubscribeResult,
    TokenRefresh,
    TokenRefreshResult,
    Unsubscribe,
    decode,
    encode,
    parse_channel,
)
from .rules import (
    Acquire,
    Acquired,
    Check,
    Checked,
    Command,
    Complete,
    ConnectionCounts,
    Ingest,
    Ingested,
    Outcome,
    Paid,
    Publish,
    Published,
    Pulled,
    Release,
    Released,
    Renew,
    Renewed,
    Result,
    Tick,
    capability,
    connection_limit,
    sees_order,
    sees_table,
)
from .settings import Settings

log = logging.getLogger("tablelock.gateway")

RequestId = int | str | None


# --- what comes out ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Goodbye:
    """Send `frame` (if any), then close with `code` and `reason`."""

    frame: bytes | None
    code: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """A hello that passed every check: the driver attaches it and reads the store."""

    hello: Hello
    terminal: Terminal
    expires_s: int
    locale: str  # of a refusal before the store's config is read


# Not frozen: one is made per request, and a frozen dataclass's __init__ costs three times.
@dataclasses.dataclass(slots=True)
class Apply:
    """Apply `command` to the order, then hand the outcome to `Conversation.answer`."""

    request: Request
    order_id: str
    command: Command


@dataclasses.dataclass(frozen=True, slots=True)
class FindOrder:
    """Find the open order of a table, then hand it to `Conversation.found`."""

    request: OrderGet
    table_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class PullOrder:
    """Ask the store's ERP for the order, without holding up the connection's other frames,
    then hand its answer to `Conversation.pulled`. `acquire`: the lock taken on the pulled
    copy (strong link), else an `order.get` with `fresh`."""

    request: OrderGet | LockAcquire
    params: dict[str, str]
    acquire: Acquire | None = None


# What `Conversation.receive` asks of the driver. A checked `Ping`, `Subscribe`,
# `Unsubscribe` or `RpcResult` comes back as it is: read the clock, read the channel, leave
# it, or hand the ERP's answer to the relay.
Step = bytes | Goodbye | Apply | FindOrder | PullOrder | Ping | Subscribe | Unsubscribe | RpcResult


class Conversation:
    """The broker's side of one connection; its state is kept on the hub's `Connection`."""

    __slots__ = ("_anonymous", "conn", "hub", "settings", "tokens")

    def __init__(self, conn: Connection, hub: Hub, tokens: Tokens, settings: Settings,
                 anonymous: dict[Connection, None]) -> None:
        self.conn = conn
        self.hub = hub
        self.tokens = tokens
        self.settings = settings
        self._anonymous = anonymous  # the gateway's sockets without hello (limits)

    # --- hello ----------------------------------------------------------------------------

    def hello(self, payload: str | bytes) -> Welcome | Goodbye:
        """The first frame: who this is, or why the connection closes."""
        conn = self.conn
        try:
            hello = decode(payload)
        except BadFrame as bad:
            _hello_refused("bad_request", detail=bad.detail)
            return Goodbye(error_frame(bad.request_id, "BAD_REQUEST", conn.locale,
                                       detail=bad.detail), *NOT_HELLO)
        locale = getattr(hello, "locale", None) or conn.locale
        if not isinstance(hello, Hello):
            _hello_refused("bad_request", detail="the first frame must be hello")
            return Goodbye(error_frame(getattr(hello, "id", None), "BAD_REQUEST", locale,
                                       detail="the first frame must be hello"), *NOT_HELLO)
        if hello.protocol != PROTOCOL_VERSION:
            _hello_refused("unsupported_protocol", detail=f"protocol {hello.protocol}")
            return Goodbye(error_frame(hello.id, "UNSUPPORTED_PROTOCOL", locale,
                                       detail=f"this broker speaks protocol {PROTOCOL_VERSION}"),
                           *UNSUPPORTED)
        try:
            terminal, expires = self.tokens.verify(hello.token)
            if hello.store_id is not None and hello.store_id != terminal.store_id:
                raise AuthError("store_id differs from the token's store")
        except AuthError as exc:
            _hello_refused("auth_failed", detail=str(exc))
            return Goodbye(error_frame(hello.id, "AUTH_FAILED", locale, detail=str(exc)),
                           *AUTH_REFUSED)
        if hello.order_authority and not capability(terminal.role).order_authority:
            # Whoever answers order.fetch writes the orders the store pays against: only
            # an ERP terminal may (a phone that said so answered pulls with forged bills).
            _hello_refused("forbidden", terminal, "order_authority is for ERP terminals")
            return Goodbye(error_frame(hello.id, "FORBIDDEN", locale,
                                       detail="order_authority is for ERP terminals"),
                           *AUTHORITY_REFUSED)
        full = self._full()
        if full:
            _hello_refused("limit_reached", terminal, full)
            return Goodbye(error_frame(hello.id, "LIMIT_REACHED", locale, detail=full),
                           *CONNECTION_LIMIT)
        return Welcome(hello, terminal, expires, locale)

    @staticmethod
    def hello_timeout() -> Goodbye:
        _hello_refused("no_hello")
        return Goodbye(None, *HELLO_TIMEOUT)

    def store_read(self, welcome: Welcome, config: StoreConfig) -> None:
        """The store's config is read: replies speak the hello's language, else the store's."""
        self.conn.locale = welcome.hello.locale or config.locale

    def welcomed(self, welcome: Welcome, session: Resumable, resumed: bool,
                 config: StoreConfig, now_ms: int, lost: list[str]) -> bytes:
        """The hello's reply; from now on the connection closes when its token ends
        (Hub.expire_tokens), unless `token.refresh` moves the end."""
        terminal = welcome.terminal
        result = HelloResult(session.session_id, resumed, terminal,
                             StoreInfo(terminal.store_id, config), self.settings.heartbeat_ms,
                             now_ms, lost)
        self.conn.expires_at = welcome.expires_s
        return ok_frame(welcome.hello.id, result)

    def store_unreadable(self, welcome: Welcome, exc: Unavailable) -> Goodbye:
        hello = welcome.hello
        _hello_refused("unavailable", welcome.terminal, str(exc))
        # The store's locale could not be read: the hello's own, else the default.
        return Goodbye(error_frame(hello.id, "UNAVAILABLE", welcome.locale),
                       *BACKEND_UNAVAILABLE)

    def _full(self) -> str:
        """Why this process takes no more connections, or '' when it does (the store's and
        the terminal's limits count over every broker: see `admitted`)."""
        settings, hub = self.settings, self.hub
        # Only terminals past hello count here: silent sockets have their own bound.
        if len(hub.connections) - len(self._anonymous) > settings.max_connections:
            return f"this broker holds {settings.max_connections} connections already"
        return ""

    def admitted(self, welcome: Welcome, counts: ConnectionCounts) -> Goodbye | None:
        """The welcomed terminal's connection is counted (Presence.count_connection): None
        when it fits in its store's and its own limits, else why it closes."""
        settings, terminal = self.settings, welcome.terminal
        reached = connection_limit(counts, settings.max_connections_per_store,
                                   settings.max_connections_per_terminal)
        if not reached:
            return None
        full = (f"store {terminal.store_id} has {settings.max_connections_per_store} already"
                if reached == "store" else
                f"terminal {terminal.terminal_id} has "
                f"{settings.max_connections_per_terminal} connections already")
        _hello_refused("limit_reached", terminal, full)
        return Goodbye(error_frame(welcome.hello.id, "LIMIT_REACHED", welcome.locale,
                                   detail=full), *CONNECTION_LIMIT)

    # --- requests -----------------------------------------------------------------------

    def receive(self, payload: str | bytes) -> Step:
        """A frame after hello: what to send, or what to do for it."""
        conn = self.conn
        problem = ""
        try:
            request: ClientMessage | None = decode(payload)
            request_id = getattr(request, "id", None)
        except BadFrame as bad:
            request, request_id, problem = None, bad.request_id, bad.detail
        if not conn.take_token():  # every frame counts, good or bad
            metrics.RATE_LIMITED.inc()
            if isinstance(request, Request):
                _count(request, "RATE_LIMITED")
            frame = error_frame(request_id, "RATE_LIMITED", conn.locale)
            return Goodbye(frame, *RATE_LIMIT) if conn.over_limit() else frame
        if request is None:
            return error_frame(request_id, "BAD_REQUEST", conn.locale, detail=problem)
        if isinstance(request, RpcResult):
            return request
        decide = _DECISIONS.get(request.__class__)
        if decide is None:  # a second hello
            return error_frame(request.id, "BAD_REQUEST", conn.locale,
                               detail="hello was already said")
        assert conn.terminal is not None
        if request.store_id is not None and request.store_id != conn.terminal.store_id:
            return self.fail(request, "FORBIDDEN", detail="another store")
        return decide(self, request)

    def _ping(self, request: Ping) -> Step:
        return request

    def _unsubscribe(self, request: Unsubscribe) -> Step:
        return request

    def _refresh(self, request: TokenRefresh) -> Step:
        try:
            terminal, expires = self.tokens.verify(request.token)
        except AuthError as exc:
            return self.fail(request, "AUTH_FAILED", detail=str(exc))
        if terminal != self.conn.terminal:
            return self.fail(request, "AUTH_FAILED",
                             detail="the new token names another terminal")
        self.conn.expires_at = expires
        return self.ok(request, TokenRefreshResult(expires * 1000))

    def _subscribe(self, request: Subscribe) -> Step:
        conn = self.conn
        terminal = conn.terminal
        assert terminal is not None and conn.session is not None
        parsed = parse_channel(request.channel)
        if parsed is None:
            return self.fail(request, "BAD_REQUEST",
                             detail="channel must be store:<store> or order:<store>:<order>")
        store_id, order_id = parsed
        if store_id != terminal.store_id:
            return self.fail(request, "FORBIDDEN", detail="a channel of another store")
        if order_id is None and not capability(terminal.role).store_channel:
            return self.fail(request, "FORBIDDEN",
                             detail="the store channel is for ERP and manager terminals")
        if (request.channel not in conn.session.subs
                and self.hub.subscription_count(conn) >= self.settings.max_subscriptions):
            return self.fail(request, "LIMIT_REACHED",
                             detail="too many subscriptions on this connection")
        return request

    def subscribed(self, request: Subscribe, seq: int, epoch: str,
                   snapshot: OrderSnapshot | StoreSnapshot,
                   missed: list[Numbered] | None) -> tuple[bool, bytes]:
        """The reply to a subscribe whose channel was read at `seq` of `epoch` (`missed`: its
        history since `request.since`, None when gone or of another epoch): whether it
        stands, and the frame."""
        terminal = self.conn.terminal
        assert terminal is not None
        # An h5's scope is checked on the very record the snapshot shows, not on an
        # earlier read that the order could have moved away from (or come into) since.
        if (isinstance(snapshot, OrderSnapshot) and snapshot.order is not None
                and not sees_order(terminal, snapshot.order)):
            return False, self.fail(request, "FORBIDDEN", detail="an order of another table")
        result = SubscribeResult(request.channel, seq, snapshot, epoch)
        if request.since is not None:
            result.recovered = missed is not None
            # Each event carries its order's table at the time: an h5 is not shown what
            # happened while the order belonged to another table.
            result.missed = [msgspec.Raw(m.frame) for m in missed or ()
                             if m.seq <= seq and sees_table(terminal, m.table_id)]
        return True, self.ok(request, result)

    def _order_get(self, request: OrderGet) -> Step:
        terminal = self.conn.terminal
        assert terminal is not None
        if request.order_id is None and request.table_id is None:
            return self.fail(request, "BAD_REQUEST", detail="order_id or table_id is needed")
        if not sees_table(terminal, request.table_id):
            return self.fail(request, "FORBIDDEN", detail="another table")
        if request.fresh:
            params = ({"order_id": request.order_id} if request.order_id
                      else {"table_id": request.table_id or ""})
            return PullOrder(request, params)
        if request.order_id is None:
            return FindOrder(request, request.table_id or "")
        return Apply(request, request.order_id, Tick())

    def found(self, find: FindOrder, order_id: str | None) -> bytes | Apply:
        if order_id is None:
            return self.fail(find.request, "NOT_FOUND")
        return Apply(find.request, order_id, Tick())

    def _publish(self, request: OrderPublish) -> Step:
        command = Publish(request.order.to_order(), request.change, request.token, request.force,
                          request.operator, request.reason)
        return Apply(request, request.order.order_id, command)

    def _check(self, request: CheckRequest) -> Step:
        return Apply(request, request.order_id, Check(request.action))

    def _acquire(self, request: LockAcquire) -> Step:
        return Apply(request, request.order_id,
                     Acquire(request.kind, request.force, request.operator, request.reason))

    def _renew(self, request: LockRenew) -> Step:
        return Apply(request, request.order_id, Renew(request.kind, request.token))

    def _release(self, request: LockRelease) -> Step:
        return Apply(request, request.order_id, Release(request.kind, request.token,
                                                        request.force, request.operator,
                                                        request.reason))

    def _complete(self, request: PaymentComplete) -> Step:
        return Apply(request, request.order_id, Complete(request.token, request.version,
                                                         request.amount_cents,
                                                         request.payment_ref))

    # --- results ----------------------------------------------------------------------

    def answer(self, apply: Apply, out: Outcome) -> bytes | PullOrder:
        """The reply to an applied command, or the ERP pull the rules ask for first."""
        request = apply.request
        if request.__class__ is OrderGet:
            return self._order(request, out)
        if out.pull_first:
            # Strong link: the customer pays against the ERP's latest order, decided again
            # on the pulled copy (rules._acquire says when).
            assert isinstance(request, LockAcquire) and isinstance(apply.command, Acquire)
            return PullOrder(request, {"order_id": apply.order_id}, apply.command)
        refusal = out.refusal
        if refusal is not None:
            return self.fail(request, refusal.code, variant=refusal.variant,
                             can_force=refusal.can_force, lock=refusal.lock)
        assert out.result is not None
        return self.ok(request, reply_of(out.result, self.conn.locale))

    def _order(self, request: Request, out: Outcome) -> bytes:
        terminal = self.conn.terminal
        assert terminal is not None
        rec = out.record
        if rec is None:
            return self.fail(request, "NOT_FOUND")
        if not sees_order(terminal, rec.order):
            return self.fail(request, "FORBIDDEN", detail="an order of another table")
        return self.ok(request, OrderResult(rec.order, list(rec.locks.values())))

    def pulled(self, pull: PullOrder, order: Order | None) -> bytes | Apply:
        """The ERP's answer (None: it gave none in time) becomes the command it was for."""
        if pull.acquire is not None:
            command = dataclasses.replace(pull.acquire, pulled=Pulled(order))
            return Apply(pull.request, pull.params["order_id"], command)
        if order is None:
            return self.fail(pull.request, "ERP_UNAVAILABLE")
        return Apply(pull.request, order.order_id, Ingest(order))

    def pull_limited(self, pull: PullOrder) -> bytes:
        return self.fail(pull.request, "RATE_LIMITED", detail="too many order pulls from the ERP")

    def pong(self, request: Ping, now_ms: int) -> bytes:
        return self.ok(request, PingResult(now_ms))

    def left(self, request: Unsubscribe) -> bytes:
        return self.ok(request)

    def failed(self, request: Request, exc: Exception) -> bytes:
        """The reply to a request whose backend call raised."""
        if isinstance(exc, OutcomeUnknown):  # the write may have been applied: read first
            _count(request, "UNAVAILABLE")
            return error_frame(request.id, "UNAVAILABLE", self.conn.locale, outcome="unknown")
        if isinstance(exc, Unavailable):
            return self.fail(request, "UNAVAILABLE")
        log.error("request %s failed", type(request).__name__, exc_info=exc,
                  extra={"request_id": str(request.id)})
        return self.fail(request, "UNAVAILABLE", detail="internal error")

    def ok(self, request: Request, result: msgspec.Struct | None = None) -> bytes:
        _count(request, "OK")
        return ok_frame(request.id, result)

    def fail(self, request: Request, code: str, *, variant: str = "", can_force: bool = False,
             lock: Lock | None = None, detail: str = "") -> bytes:
        _count(request, code)
        return error_frame(request.id, code, self.conn.locale, variant=variant,
                           can_force=can_force, lock=lock, detail=detail)


_DECISIONS: dict[type, Callable[[Conversation, Any], Step]] = {
    Ping: Conversation._ping,
    TokenRefresh: Conversation._refresh,
    Subscribe: Conversation._subscribe,
    Unsubscribe: Conversation._unsubscribe,
    OrderGet: Conversation._order_get,
    OrderPublish: Conversation._publish,
    CheckRequest: Conversation._check,
    LockAcquire: Conversation._acquire,
    LockRenew: Conversation._renew,
    LockRelease: Conversation._release,
    PaymentComplete: Conversation._complete,
}


def origin_allowed(scope: dict[str, Any], allowed: list[str]) -> bool:
    """Browsers may connect from the broker's own origin or an allowed one."""
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin")
    if origin is None:
        return True  # not a browser: its token is its only credential
    text = origin.decode("latin-1")
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    own = f"{scheme}://{headers.get(b'host', b'').decode('latin-1')}"
    return "*" in allowed or text in allowed or text == own


# --- frames ---------------------------------------------------------------------------------

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
