"""The wire messages of PROTOCOL.md sections 4 to 6 as typed structs.

Requests are decoded once, straight into these types; events are encoded once
per channel. `docs/asyncapi.json` is generated from these same types
(`python -m tablelock.schema`), and a test keeps the two in step.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

from .model import (
    MAX_SAFE_INT,
    Action,
    Event,
    Locale,
    Lock,
    LockKind,
    Order,
    Payment,
    StoreConfig,
    Terminal,
)

PROTOCOL_VERSION = 1
SUBPROTOCOL = "tablelock.v1"
MAX_FRAME_BYTES = 64 * 1024

# --- input bounds: one set for the WebSocket and HTTP (http.PaymentBody, path ids) -----------

MAX_ID_CHARS = 128
MAX_PAYMENT_REF_CHARS = 128
# Printable: a control character in an id (a newline, say) split the channel list a Redis
# event carries, and a holder got the same lock.forced both as a channel event and directly.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"

# order_id, table_id, store_id (and a token's sub, store and table: auth.terminal_of).
Identifier = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=PRINTABLE)]
# amount_cents, version, token: integers JavaScript reads exactly.
SafeInt = Annotated[int, Meta(ge=0, le=MAX_SAFE_INT)]
PaymentRef = Annotated[str, Meta(min_length=1, max_length=MAX_PAYMENT_REF_CHARS)]
Token = SafeInt
# `order:<store>:<order>` at the longest.
Channel = Annotated[str, Meta(min_length=1, max_length=len("order::") + 2 * MAX_ID_CHARS,
                              pattern=PRINTABLE)]

Name = Annotated[str, Meta(min_length=1, max_length=128)]
RequestId = int | Annotated[str, Meta(max_length=128)]
Text = Annotated[str, Meta(max_length=512)]


class ClientInfo(msgspec.Struct):
    name: Text = ""
    version: Text = ""


class Request(msgspec.Struct, tag_field="type", kw_only=True, gc=False):
    id: RequestId
    store_id: Identifier | None = None


class Hello(Request, tag="hello"):
    token: Annotated[str, Meta(max_length=8192)]
    protocol: int
    client: ClientInfo | None = None
    locale: Locale | None = None
    resume: Name | None = None
    # With `resume`: the last seq the client *read* per channel, when frames may have died
    # in flight with the old socket; the replay starts from there. Seqs alone: the epoch
    # of each channel is the one the resumed session kept.
    seen: dict[str, Annotated[int, Meta(ge=0)]] | None = None
    order_authority: bool = False


class Ping(Request, tag="ping"):
    pass


class TokenRefresh(Request, tag="token.refresh"):
    """A new token for the same terminal, before the current one ends (docs/protocol.md)."""

    token: Annotated[str, Meta(max_length=8192)]


class Subscribe(Request, tag="subscribe"):
    channel: Channel
    # Not bounded: a seq no channel has reached answers `recovered: false` (PROTOCOL.md s. 5).
    since: Annotated[int, Meta(ge=0)] | None = None
    # With `since`: the epoch the client's `since` was numbered in; another epoch answers
    # `recovered: false` (the numbering started over since).
    epoch: Annotated[str, Meta(max_length=64)] | None = None


class Unsubscribe(Request, tag="unsubscribe"):
    channel: Channel


class OrderGet(Request, tag="order.get"):
    order_id: Identifier | None = None
    table_id: Identifier | None = None
    fresh: bool = False


class WireOrder(msgspec.Struct, gc=False):
    """An order as an ERP sends it; validated, then kept as a model.Order."""

    order_id: Identifier
    table_id: Identifier
    version: SafeInt
    amount_cents: SafeInt
    items: list[Any] = []
    status: Literal["open", "paid", "closed"] = "open"

    def to_order(self) -> Order:
        return Order(self.order_id, self.table_id, self.version, self.amount_cents,
                     self.items, self.status)


class OrderPublish(Request, tag="order.publish"):
    order: WireOrder
    change: Literal["add_items", "modify", "status"]
    token: Token | None = None
    force: bool = False
    operator: Text | None = None
    reason: Text | None = None


class CheckRequest(Request, tag="check"):
    order_id: Identifier
    action: Action


class LockAcquire(Request, tag="lock.acquire"):
    order_id: Identifier
    kind: LockKind
    force: bool = False
    operator: Text | None = None
    reason: Text | None = None


class LockRenew(Request, tag="lock.renew"):
    order_id: Identifier
    kind: LockKind
    token: Token


class LockRelease(Request, tag="lock.release"):
    order_id: Identifier
    kind: LockKind
    token: Token | None = None
    force: bool = False
    operator: Text | None = None
    reason: Text | None = None


class PaymentComplete(Request, tag="payment.complete"):
    order_id: Identifier
    version: SafeInt
    amount_cents: SafeInt
    payment_ref: PaymentRef
    # Required while strong_link is on; the core answers FENCED without it.
    token: Token | None = None


class RpcError(msgspec.Struct):
    code: Text = "ERROR"
    message: Text = ""


class RpcResult(msgspec.Struct, tag_field="type", tag="rpc.result"):
    """An ERP's answer to an `rpc` the broker sent it (not a request: no `id`)."""

    rid: Name
    ok: bool
    result: dict[str, Any] | None = None
    error: RpcError | None = None


ClientMessage = (Hello | Ping | TokenRefresh | Subscribe | Unsubscribe | OrderGet | OrderPublish
                 | CheckRequest | LockAcquire | LockRenew | LockRelease | PaymentComplete
                 | RpcResult)

_decoder = msgspec.json.Decoder(ClientMessage)


class _IdOnly(msgspec.Struct):
    id: RequestId | None = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


class BadFrame(Exception):
    def __init__(self, request_id: int | str | None, detail: str) -> None:
        super().__init__(detail)
        self.request_id = request_id
        self.detail = detail


_ID_FIELD = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.){0,128}"|-?\d{1,18})[\s,}]')


def _read_id(frame: str | bytes) -> int | str | None:
    """A bad frame's `id`, so that its error reply can be matched: null if unreadable."""
    try:
        return _id_decoder.decode(frame).id
    except (msgspec.DecodeError, UnicodeError):
        return None
    except RecursionError:  # too deep to skip: look for a top-level-looking "id" instead
        text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
        found = _ID_FIELD.search(text[:4096])
        if found is None:
            return None
        try:
            return msgspec.json.decode(found.group(1), type=RequestId)
        except msgspec.DecodeError:
            return None


def decode(frame: str | bytes) -> ClientMessage:
    """Decode and validate one client frame, or raise BadFrame with what id could be read."""
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        request_id = _read_id(frame)
        detail = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise BadFrame(request_id, detail) from None


# --- replies ---------------------------------------------------------------------

class ErrorBody(msgspec.Struct):
    code: str
    message: str
    can_force: bool = False
    lock: Lock | None = None
    # "unknown" on an UNAVAILABLE whose write may have been applied: read the order first.
    outcome: Literal["unknown"] | None = None


class ErrorReply(msgspec.Struct):
    id: RequestId | None
    error: ErrorBody
    ok: bool = False


class StoreInfo(msgspec.Struct):
    store_id: str
    config: StoreConfig


class HelloResult(msgspec.Struct):
    session_id: str
    resumed: bool
    terminal: Terminal
    store: StoreInfo
    heartbeat_ms: int
    server_time: int
    # On resume: channels whose missed events are gone from the history (or whose epoch
    # changed); subscribe again.
    resubscribe: list[str] = []


class PingResult(msgspec.Struct):
    server_time: int


class TokenRefreshResult(msgspec.Struct):
    expires_at: int  # ms since the epoch


class OrderSnapshot(msgspec.Struct, tag_field="scope", tag="order"):
    order: Order | None
    locks: list[Lock]


class StoreSnapshot(msgspec.Struct, tag_field="scope", tag="store"):
    orders: list[Order]
    locks: list[Lock]
    terminals: list[Terminal]


class SubscribeResult(msgspec.Struct, omit_defaults=True):
    channel: str
    seq: int
    snapshot: OrderSnapshot | StoreSnapshot
    epoch: str  # of the channel's numbering: give it back with the next `since`
    recovered: bool | None = None
    missed: list[msgspec.Raw] | None = None  # event frames, as numbered on the channel


class OrderResult(msgspec.Struct):
    order: Order | None
    locks: list[Lock]


class PublishResult(msgspec.Struct):
    order: Order


class CheckResult(msgspec.Struct, omit_defaults=True):
    allowed: bool
    code: str | None = None
    message: str | None = None
    can_force: bool | None = None
    lock: Lock | None = None


class AcquireResult(msgspec.Struct, omit_defaults=True):
    lock: Lock | None
    order: Order | None
    enforced: bool = True
    released: list[Lock] | None = None
    forced: list[Lock] | None = None


class RenewResult(msgspec.Struct):
    lock: Lock | None
    enforced: bool = True


class ReleaseResult(msgspec.Struct):
    lock: Lock | None = None


class PaymentResult(msgspec.Struct):
    order: Order
    payment: Payment


RESULT_OF_REQUEST: dict[str, type[msgspec.Struct]] = {
    "hello": HelloResult,
    "ping": PingResult,
    "token.refresh": TokenRefreshResult,
    "subscribe": SubscribeResult,
    "unsubscribe": msgspec.Struct,
    "order.get": OrderResult,
    "order.publish": PublishResult,
    "check": CheckResult,
    "lock.acquire": AcquireResult,
    "lock.renew": RenewResult,
    "lock.release": ReleaseResult,
    "payment.complete": PaymentResult,
}


# --- events ------------------------------------------------------------------------

# Every event the broker publishes (docs/protocol.md section 6), and every `reason` a
# `lock.released` carries. tests/test_docs.py fails when the code emits one not listed here.
EVENT_NAMES: tuple[str, ...] = (
    "lock.acquired", "lock.released", "lock.expired", "lock.forced", "lock.contended",
    "order.updated", "order.paid", "terminal.online", "terminal.offline", "config.updated",
)
RELEASE_REASONS: tuple[str, ...] = ("released", "upgraded", "paid", "holder_disconnected")
# Why a lock a client held has ended, as the SDKs tell their application: a `lock.released`
# reason, `expired` (lock.expired), `forced` (lock.forced), or `gone` (no longer there on a
# re-read, cause unknown).
LOST_LOCK_REASONS: tuple[str, ...] = (*RELEASE_REASONS, "expired", "forced", "gone")


# --- closing -----------------------------------------------------------------------

class Close(enum.IntEnum):
    """Every WebSocket close code the broker sends (CLOSE_CODES says what the client does)."""

    TOO_BIG = 1009
    RESTARTING = 1012
    TRY_AGAIN_LATER = 1013
    NO_HELLO = 4001
    UNSUPPORTED_PROTOCOL = 4002
    AUTH_FAILED = 4003
    POLICY = 4008
    SLOW_CONSUMER = 4010


# Each code's short name (the generated SDK constants carry it).
CLOSE_NAMES: dict[Close, str] = {
    Close.TOO_BIG: "frame too big",
    Close.RESTARTING: "server restarting",
    Close.TRY_AGAIN_LATER: "try again later",
    Close.NO_HELLO: "no hello",
    Close.UNSUPPORTED_PROTOCOL: "unsupported protocol",
    Close.AUTH_FAILED: "auth failed",
    Close.POLICY: "policy",
    Close.SLOW_CONSUMER: "slow consumer",
}

# What the client should do on each, for the docs.
CLOSE_CODES: dict[Close, str] = {
    Close.TOO_BIG: "a frame larger than 64 KiB: do not resend it",
    Close.RESTARTING: "the broker is restarting, or events were lost: reconnect and "
                      "subscribe again with `since` and `epoch`",
    Close.TRY_AGAIN_LATER: "the backend could not be reached during `hello`: reconnect after "
                           "a backoff",
    Close.NO_HELLO: "no `hello` within 10 s, or a first frame that is not a valid `hello`",
    Close.UNSUPPORTED_PROTOCOL: "unsupported protocol version",
    Close.AUTH_FAILED: "authentication failed, the token expired unrefreshed, or a `hello` "
                       "claimed `order_authority` for a role that may not have it",
    Close.POLICY: "policy: the connection broke a bound (request rate, control frames, "
                  "connections per process, store or terminal, connections that have not "
                  "said `hello`)",
    Close.SLOW_CONSUMER: "slow consumer: the connection's send queue passed its bound; "
                         "reconnect and recover",
}


class Closing(NamedTuple):
    """A close the broker sends: its code and the reason in the close frame."""

    code: Close
    reason: str


HELLO_TIMEOUT = Closing(Close.NO_HELLO, "no hello")
NOT_HELLO = Closing(Close.NO_HELLO, "the first frame must be hello")
UNSUPPORTED = Closing(Close.UNSUPPORTED_PROTOCOL, "unsupported protocol")
AUTH_REFUSED = Closing(Close.AUTH_FAILED, "auth failed")
AUTHORITY_REFUSED = Closing(Close.AUTH_FAILED, "order_authority refused")
TOKEN_EXPIRED = Closing(Close.AUTH_FAILED, "token expired")
CONNECTION_LIMIT = Closing(Close.POLICY, "connection limit")
RATE_LIMIT = Closing(Close.POLICY, "rate limit")
BACKEND_UNAVAILABLE = Closing(Close.TRY_AGAIN_LATER, "backend unavailable")
DRAINING = Closing(Close.RESTARTING, "restarting: reconnect")
EVENTS_LOST = Closing(Close.RESTARTING, "events lost: resubscribe")
SLOW_CONSUMER = Closing(Close.SLOW_CONSUMER, "slow consumer")


class EventFrame(msgspec.Struct, omit_defaults=True, gc=False):
    """An event as it goes on the wire: numbered on a channel, or direct."""

    type: Literal["event"]
    event: str
    ts: int
    channel: str | None = None
    seq: int | None = None
    direct: bool | None = None
    lock: Lock | None = None
    reason: str | None = None
    by: Terminal | None = None
    action: str | None = None
    order: Order | None = None
    payment: Payment | None = None
    terminal: Terminal | None = None
    config: StoreConfig | None = None


class RpcCall(msgspec.Struct):
    type: Literal["rpc"]
    rid: str
    method: str
    params: dict[str, str]


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def frame_of(event: Event, direct: bool = False) -> EventFrame:
    return EventFrame(
        "event", event.event, event.ts, direct=True if direct else None,
        lock=event.lock, reason=event.reason, by=event.by, action=event.action,
        order=event.order, payment=event.payment, terminal=event.terminal,
        config=event.config,
    )


_BODY_START = len(b'{"type":"event",')


def event_body(event: Event) -> bytes:
    """The event's JSON after `{"type":"event",`: encoded once, numbered per channel."""
    return _encoder.encode(frame_of(event))[_BODY_START:]


def direct_frame(event: Event) -> bytes:
    return _encoder.encode(frame_of(event, direct=True))


def numbered_frame(channel: str, seq: int, body: bytes | memoryview) -> bytes:
    """Splice channel and seq into an encoded body (event_body): every numbered event frame,
    whichever backend numbered it, is made here."""
    return b"".join((b'{"type":"event","channel":', _encoder.encode(channel), b',"seq":',
                     str(seq).encode(), b",", body))


def order_channel(store_id: str, order_id: str) -> str:
    return f"order:{store_id}:{order_id}"


def store_channel(store_id: str) -> str:
    return f"store:{store_id}"


def parse_channel(channel: str) -> tuple[str, str | None] | None:
    """(store_id, order_id or None for the store channel), or None if malformed."""
    kind, _, rest = channel.partition(":")
    if kind == "store" and rest and ":" not in rest and len(rest) <= MAX_ID_CHARS:
        return rest, None
    if kind == "order":
        store_id, _, order_id = rest.partition(":")
        if 0 < len(store_id) <= MAX_ID_CHARS and 0 < len(order_id) <= MAX_ID_CHARS:
            return store_id, order_id
    return None

