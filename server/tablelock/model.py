"""Plain typed records shared by the core, the backends and the wire.

Everything here is a msgspec Struct, so the same types serialise the Redis
state, build the replies and generate the JSON schema. None of them can take
part in a reference cycle, so none is tracked by the garbage collector
(`gc=False`): the records a broker holds by the thousand cost no collector time.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

LockKind = Literal["order", "payment", "presettle"]
Role = Literal["erp_main", "erp_secondary", "h5", "manager", "service"]
OrderStatus = Literal["open", "paid", "closed"]
Action = Literal["edit", "add_items", "modify", "pay", "presettle", "accept"]
Locale = Literal["zh-CN", "en"]

LOCK_KINDS: tuple[LockKind, ...] = ("order", "payment", "presettle")
# The largest integer JavaScript reads exactly: the bound of every integer a client sends.
MAX_SAFE_INT = 2**53 - 1


class Terminal(msgspec.Struct, frozen=True, gc=False):
    terminal_id: str
    role: Role
    name: str
    store_id: str
    table_id: str | None = None


class Holder(msgspec.Struct, frozen=True, gc=False):
    terminal_id: str
    role: Role
    name: str


class Lock(msgspec.Struct, frozen=True, gc=False):
    store_id: str
    order_id: str
    kind: LockKind
    token: int
    holder: Holder
    acquired_at: int
    expires_at: int
    order_version: int


class Order(msgspec.Struct, gc=False):
    order_id: str
    table_id: str
    version: int
    amount_cents: int
    items: list[Any] = []
    status: OrderStatus = "open"


class Payment(msgspec.Struct, frozen=True, gc=False):
    token: int | None
    amount_cents: int
    payment_ref: str
    by: Terminal | None


class StoreConfig(msgspec.Struct, frozen=True, gc=False):
    strong_link: bool = True
    h5_payment_lock_ttl_ms: int = 15_000
    erp_lock_ttl_ms: int = 600_000
    disconnect_grace_ms: int = 30_000
    erp_fetch_timeout_ms: int = 3_000
    locale: Locale = "zh-CN"
    order_retention_ms: int = 86_400_000


# Inclusive ranges of the numeric config fields (PROTOCOL.md section 1).
CONFIG_RANGES: dict[str, tuple[int, int]] = {
    "h5_payment_lock_ttl_ms": (5_000, 300_000),
    "erp_lock_ttl_ms": (10_000, 3_600_000),
    "disconnect_grace_ms": (0, 600_000),
    "erp_fetch_timeout_ms": (500, 30_000),
    "order_retention_ms": (60_000, 2_592_000_000),
}


class OrderRecord(msgspec.Struct, gc=False):
    """Everything the broker knows about one order: the unit of atomicity.

    `fence` is the last fencing token granted on this order. `lapsed` maps a
    lock kind to the token of its last lock that expired, until someone takes
    that kind again, so a late write can be told `LOCK_EXPIRED` rather than
    `FENCED`. `ended_at` is when the order was paid or closed (retention).
    """

    store_id: str
    order_id: str
    order: Order
    fence: int
    locks: dict[str, Lock] = {}
    lapsed: dict[str, int] = {}
    payment: Payment | None = None
    ended_at: int | None = None


class Event(msgspec.Struct, omit_defaults=True, gc=False):
    """One state change, before it is numbered on a channel.

    `notify` names (by holder_key) the revoked holder of a `lock.forced` or `lock.expired`, who
    gets a direct copy on connections not subscribed to the order.
    `table_id` lets the hub show an order's events only to its own table's h5.
    """

    event: str
    ts: int
    lock: Lock | None = None
    reason: str | None = None
    by: Terminal | None = None
    action: str | None = None
    order: Order | None = None
    payment: Payment | None = None
    notify: str | None = None
    table_id: str | None = None
    terminal: Terminal | None = None  # terminal.online / terminal.offline
    config: StoreConfig | None = None  # config.updated


class AuditEntry(msgspec.Struct, gc=False):
    kind: str
    order_id: str | None
    terminal: Holder | None
    detail: dict[str, Any]
    ts: int = 0
    id: str = ""
    handled: bool | None = None


def holder_of(terminal: Terminal) -> Holder:
    return Holder(terminal.terminal_id, terminal.role, terminal.name)


def holder_key(who: Terminal | Holder) -> str:
    """Who a terminal is, for every "is this the same holder" question: role and sub.

    A token's `sub` alone is not an identity: the platform mints h5 tokens for phones and
    ERP tokens for tills from different places, and nothing stops a phone's `sub` from
    equalling a till's. Keyed by `sub` alone, such a phone was the till (it took over the
    till's order lock as `upgraded`). Refusing the collision instead would need the broker
    to know every terminal ever issued, which it does not. So holders, presence, the
    disconnect grace and direct delivery are keyed by role and sub, while `terminal_id`
    on the wire stays the token's `sub`. A role never contains ':', so the key is
    unambiguous whatever the sub.
    """
    return f"{who.role}:{who.terminal_id}"


def same_holder(lock_holder: Holder, who: Terminal | Holder) -> bool:
    return lock_holder.role == who.role and lock_holder.terminal_id == who.terminal_id
