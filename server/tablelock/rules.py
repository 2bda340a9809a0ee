"""The lock rules of PROTOCOL.md sections 2 and 9, as one pure step.

    step(record, command, context) -> Outcome

`record` is everything known about one order (None if it was never seen),
`context` carries the time, the store config, the acting terminal and which
terminals are offline. The Outcome holds the new record, the reply or the
refusal, the events to publish, the audit entries, the next deadline at which
the record must be stepped again, and whether the order must first be pulled
from the ERP. Nothing here awaits, reads a clock or touches a socket: every
backend calls this same function inside its own atomic section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from .model import (
    CONFIG_RANGES,
    Action,
    AuditEntry,
    Event,
    Holder,
    Lock,
    LockKind,
    Order,
    OrderRecord,
    Payment,
    Role,
    StoreConfig,
    Terminal,
    holder_key,
    holder_of,
    same_holder,
)

# --- the lock table ---------------------------------------------------------

ALLOWED: Final = None
Code = str


@dataclass(frozen=True, slots=True)
class Cell:
    code: Code
    can_force: bool


_FORCEABLE = {
    "order": Cell("ORDER_LOCKED", True),
    "payment": Cell("PAYMENT_LOCKED", True),
    "presettle": Cell("PRESETTLE_LOCKED", True),
}

# LOCK_TABLE[action][kind held by someone else] -> None (allowed) or the refusal.
LOCK_TABLE: Final[dict[str, dict[str, Cell | None]]] = {
    "edit": dict(_FORCEABLE),
    "add_items": {"order": ALLOWED, "payment": _FORCEABLE["payment"],
                  "presettle": _FORCEABLE["presettle"]},
    "modify": dict(_FORCEABLE),
    "pay": {"order": _FORCEABLE["order"], "payment": _FORCEABLE["payment"],
            "presettle": ALLOWED},
    "presettle": dict(_FORCEABLE),
    "accept": {"order": ALLOWED, "payment": Cell("ACCEPT_BLOCKED", False),
               "presettle": Cell("ACCEPT_BLOCKED", False)},
}

# The action a lock request or a publish amounts to.
ACTION_OF_KIND: Final[dict[str, Action]] = {"order": "edit", "payment": "pay",
                                             "presettle": "presettle"}
ACTION_OF_CHANGE: Final[dict[str, Action]] = {"add_items": "add_items", "modify": "modify",
                                               "status": "modify"}
# Which lock blocks first when several do (PROTOCOL.md section 2, refusal order).
BLOCKING_ORDER: Final[tuple[LockKind, ...]] = ("payment", "presettle", "order")

# --- the role table -------------------------------------------------------------

TtlField = Literal["erp_lock_ttl_ms", "h5_payment_lock_ttl_ms"]


@dataclass(frozen=True, slots=True)
class Capability:
    """What one role may do: every layer asks this, never a role's name."""

    lock_kinds: tuple[LockKind, ...]  # the locks it may take and release
    force: bool  # may repeat a refused request with force: true
    renew: bool  # may renew its locks (re-acquiring one renews it too)
    publish: bool  # may publish orders (and so accept a scanned order)
    record_payment: bool  # may send payment.complete
    store_channel: bool  # may subscribe to store:<store>
    order_authority: bool  # may say order_authority: true and answer order pulls
    table_scoped: bool  # sees and locks only the orders of its token's table
    disconnect_grace: bool  # its locks outlive its last connection by disconnect_grace_ms
    lock_ttl: TtlField  # the config field its locks live for
    scan_to_order: bool  # adds dishes from its table (asks `check add_items`)
    pulls_order: bool  # its lock waits for the ERP's latest copy of the order (strong link)


_COUNTER = Capability(
    lock_kinds=("order", "payment", "presettle"), force=True, renew=True, publish=True,
    record_payment=True, store_channel=True, order_authority=True, table_scoped=False,
    disconnect_grace=True, lock_ttl="erp_lock_ttl_ms", scan_to_order=False, pulls_order=False)

CAPABILITIES: Final[dict[Role, Capability]] = {
    "erp_main": _COUNTER,
    "erp_secondary": _COUNTER,
    # A manager takes and forces locks and records payments; the ERP alone writes orders.
    "manager": dataclasses.replace(_COUNTER, publish=False, order_authority=False),
    # A customer's phone pays for its own table's order, against the ERP's latest copy; it
    # never records the payment (the payment service does, with the phone's token).
    "h5": Capability(
        lock_kinds=("payment",), force=False, renew=False, publish=False,
        record_payment=False, store_channel=False, order_authority=False, table_scoped=True,
        disconnect_grace=False, lock_ttl="h5_payment_lock_ttl_ms", scan_to_order=True,
        pulls_order=True),
    # The platform's payment service records payments with the payer's token, and nothing else.
    "service": Capability(
        lock_kinds=(), force=False, renew=False, publish=False, record_payment=True,
        store_channel=False, order_authority=False, table_scoped=False,
        disconnect_grace=True, lock_ttl="erp_lock_ttl_ms", scan_to_order=False,
        pulls_order=False),
}
ROLES: Final[tuple[Role, ...]] = tuple(CAPABILITIES)
# The role that answers order pulls first, whether or not it said order_authority.
FIRST_AUTHORITY: Final[Role] = "erp_main"
# The prompt variant (prompts.py) a table-scoped terminal reads for PAYMENT_LOCKED.
PHONE_PROMPT: Final = "h5"

# Who may use each store-administration endpoint over HTTP (the `/v1` API): the store's
# config, the payment service's recording of a payment, the audit log.
AdminTask = Literal["config", "payment", "audit"]
ADMIN_ROLES: Final[dict[AdminTask, tuple[Role, ...]]] = {
    "config": ("manager", "service"),
    "payment": ("service",),
    "audit": ("manager",),
}


def capability(role: Role) -> Capability:
    return CAPABILITIES[role]


def actions_of(role: Role) -> frozenset[Action]:
    """What `role` may ever do, for `check` (anything else answers FORBIDDEN): the actions
    of the locks it takes, the ERP's order actions if it publishes, adding dishes if it
    orders from its table."""
    cap = CAPABILITIES[role]
    actions: set[Action] = {ACTION_OF_KIND[kind] for kind in cap.lock_kinds}
    if cap.publish:
        actions |= {*ACTION_OF_CHANGE.values(), "accept"}
    if cap.scan_to_order:
        actions.add("add_items")
    return frozenset(actions)


def sees_table(terminal: Terminal, table_id: str | None) -> bool:
    """Whether `terminal` may see what happened on `table_id` (None: no table, everyone):
    a table-scoped terminal sees its own table's only."""
    return (table_id is None or not CAPABILITIES[terminal.role].table_scoped
            or table_id == terminal.table_id)


def sees_order(terminal: Terminal, order: Order) -> bool:
    """Whether `terminal` may see (and act on) `order`."""
    return sees_table(terminal, order.table_id)


def table_scope(terminal: Terminal) -> str | None:
    """The one table `terminal` is limited to, or None for the whole store."""
    return terminal.table_id if CAPABILITIES[terminal.role].table_scoped else None


def lock_ttl_ms(role: Role, config: StoreConfig) -> int:
    ttl: int = getattr(config, CAPABILITIES[role].lock_ttl)
    return ttl


def is_first_authority(role: str) -> bool:
    """Whether `role` answers order pulls before any other, without saying order_authority."""
    return role == FIRST_AUTHORITY


def has_grace(role: Role) -> bool:
    return CAPABILITIES[role].disconnect_grace


def presence_lingers(role: Role) -> bool:
    """Whether a terminal of `role` is said offline only after the broker's linger: a phone,
    whose page reloads and whose network comes and goes."""
    return CAPABILITIES[role].table_scoped


@dataclass(frozen=True, slots=True)
class ConnectionCounts:
    """A store's and one terminal's connections, the newcomer included, over every broker."""

    store: int
    terminal: int


def connection_limit(counts: ConnectionCounts, per_store: int, per_terminal: int) -> str:
    """Which limit a newcomer passes ('store', 'terminal'), or '' when it fits. The counts
    include it: a connection is counted first and judged after, so that of two hellos
    counted at once (on two brokers) the later one sees the earlier and alone is refused."""
    if counts.store > per_store:
        return "store"
    if counts.terminal > per_terminal:
        return "terminal"
    return ""


def _token_is_credential(actor: Terminal) -> bool:
    """A writer that takes no locks (the payment service) writes with the token it was
    handed: the token alone is its credential, whoever holds the lock."""
    return not CAPABILITIES[actor.role].lock_kinds


# --- commands -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pulled:
    """What the store's ERP answered to the order pull: the order, or None when it gave none."""

    order: Order | None


@dataclass(frozen=True, slots=True)
class Acquire:
    kind: LockKind
    force: bool = False
    operator: str | None = None
    reason: str | None = None
    # Set on the second pass of a lock taken on the ERP's copy (Outcome.pull_first).
    pulled: Pulled | None = None


@dataclass(frozen=True, slots=True)
class Renew:
    kind: LockKind
    token: int


@dataclass(frozen=True, slots=True)
class Release:
    kind: LockKind
    token: int | None = None
    force: bool = False
    operator: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    order: Order
    change: Literal["add_items", "modify", "status"]
    token: int | None = None
    force: bool = False
    operator: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Complete:
    token: int | None
    version: int
    amount_cents: int
    payment_ref: str


@dataclass(frozen=True, slots=True)
class Check:
    action: Action


@dataclass(frozen=True, slots=True)
class Ingest:
    """The ERP's answer to an order pull: stored without any lock rule."""

    order: Order


@dataclass(frozen=True, slots=True)
class Tick:
    """A timer woke the record: only expiry and retention run."""


@dataclass(frozen=True, slots=True)
class ReleaseAll:
    """Strong link was turned off: every lock goes, reason `released`."""


Command = Acquire | Renew | Release | Publish | Complete | Check | Ingest | Tick | ReleaseAll


@dataclass(frozen=True, slots=True)
class Context:
    now: int
    config: StoreConfig
    actor: Terminal | None = None
    # holder_key -> when its last connection closed, for terminals now offline.
    offline: Mapping[str, int] = field(default_factory=dict)


# --- results --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Refusal:
    code: Code
    variant: str = ""  # which prompt of the code (see prompts.py)
    can_force: bool = False
    lock: Lock | None = None


@dataclass(frozen=True, slots=True)
class Acquired:
    enforced: bool  # False: strong link is off, nothing was locked
    lock: Lock | None
    order: Order | None
    released: list[Lock] | None = None  # the actor's own order lock, upgraded to payment
    forced: list[Lock] | None = None  # the locks of others this force revoked


@dataclass(frozen=True, slots=True)
class Renewed:
    enforced: bool
    lock: Lock | None


@dataclass(frozen=True, slots=True)
class Released:
    lock: Lock


@dataclass(frozen=True, slots=True)
class Published:
    order: Order


@dataclass(frozen=True, slots=True)
class Paid:
    order: Order
    payment: Payment


@dataclass(frozen=True, slots=True)
class Checked:
    """`check`'s answer: None, or the refusal the action would get. An unknown order is the
    only refusal of `check` itself (Outcome.refusal)."""

    refusal: Refusal | None

    @property
    def allowed(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True, slots=True)
class Ingested:
    order: Order
    locks: list[Lock]


Result = Acquired | Renewed | Released | Published | Paid | Checked | Ingested


@dataclass(slots=True)
class Outcome:
    record: OrderRecord | None
    result: Result | None = None
    refusal: Refusal | None = None
    events: list[Event] = field(default_factory=list)
    direct: list[tuple[str, Event]] = field(default_factory=list)  # (holder_key, event)
    audit: list[AuditEntry] = field(default_factory=list)
    deadline: int | None = None
    # The command must first have the ERP's latest order: pull it, then apply the command
    # again carrying the answer (Acquire.pulled). Nothing else in the outcome counts.
    pull_first: bool = False
    changed: bool = False


# --- the step -------------------------------------------------------------------

def step(record: OrderRecord | None, command: Command, ctx: Context) -> Outcome:
    """Apply `command` to one order's record at `ctx.now`. Never mutates `record`."""
    rec = _copy(record) if record is not None else None
    out = Outcome(record=rec)
    if rec is not None:
        _expire(rec, ctx, out)
        if rec.ended_at is not None and ctx.now >= rec.ended_at + ctx.config.order_retention_ms:
            out.record = rec = None
            out.changed = True
    handler = _HANDLERS[type(command)]
    handler(rec, command, ctx, out)
    if out.record is not None:
        out.deadline = next_deadline(out.record, ctx)
    return out


def _copy(rec: OrderRecord) -> OrderRecord:
    return msgspec.structs.replace(rec, locks=dict(rec.locks), lapsed=dict(rec.lapsed))


def lock_deadline(lock: Lock, ctx: Context) -> tuple[int, str]:
    """When `lock` ends on its own, and why: its TTL, or its holder's grace."""
    if has_grace(lock.holder.role):
        since = ctx.offline.get(holder_key(lock.holder))
        if since is not None and since + ctx.config.disconnect_grace_ms <= lock.expires_at:
            return since + ctx.config.disconnect_grace_ms, "holder_disconnected"
    return lock.expires_at, "expired"


def next_deadline(rec: OrderRecord, ctx: Context) -> int | None:
    times = [lock_deadline(lock, ctx)[0] for lock in rec.locks.values()]
    if rec.ended_at is not None:
        times.append(rec.ended_at + ctx.config.order_retention_ms)
    return min(times) if times else None


def _expire(rec: OrderRecord, ctx: Context, out: Outcome) -> None:
    for kind, lock in list(rec.locks.items()):
        deadline, why = lock_deadline(lock, ctx)
        if ctx.now < deadline:
            continue
        del rec.locks[kind]
        out.changed = True
        if why == "expired":
            rec.lapsed[kind] = lock.token
            _emit(out, rec, ctx, "lock.expired", lock=lock, notify=holder_key(lock.holder))
            _audit(out, ctx, "lock.expired", rec, lock.holder, kind=kind, token=lock.token)
        else:
            _emit(out, rec, ctx, "lock.released", lock=lock, reason=why)
            _audit(out, ctx, "lock.released", rec, lock.holder, kind=kind, token=lock.token,
                   reason=why)


# --- helpers shared by the handlers -------------------------------------------

def _emit(out: Outcome, rec: OrderRecord, ctx: Context, name: str, **data: Any) -> None:
    out.events.append(Event(name, ctx.now, table_id=rec.order.table_id, **data))


def _audit(out: Outcome, ctx: Context, entry_kind: str, rec: OrderRecord | None,
           who: Terminal | Holder | None, **detail: Any) -> None:
    order_id = rec.order_id if rec is not None else None
    entry = AuditEntry(entry_kind, order_id, _as_holder(who), detail, ts=ctx.now)
    if entry_kind == "payment.rejected":
        entry.handled = False
    out.audit.append(entry)


def _as_holder(who: Terminal | Holder | None) -> Holder | None:
    return holder_of(who) if isinstance(who, Terminal) else who


def _refuse(out: Outcome, code: Code, variant: str = "", can_force: bool = False,
            lock: Lock | None = None) -> None:
    out.refusal = Refusal(code, variant, can_force, lock)


def _ended(rec: OrderRecord) -> bool:
    return rec.order.status != "open" or rec.payment is not None


def _paid(rec: OrderRecord) -> bool:
    """Paid through the broker or at the counter: never payable again, whatever follows."""
    return rec.payment is not None or rec.order.status == "paid"


def _blocking(rec: OrderRecord, action: str, actor: Terminal) -> list[tuple[Lock, Cell]]:
    """Locks of others that stop `actor` doing `action`, in refusal order."""
    row = LOCK_TABLE[action]
    found = []
    for kind in BLOCKING_ORDER:
        lock = rec.locks.get(kind)
        if lock is None or same_holder(lock.holder, actor):
            continue
        cell = row[kind]
        if cell is not None:
            found.append((lock, cell))
    return found


def conflict_refusal(lock: Lock, cell: Cell, actor: Terminal) -> Refusal:
    cap = CAPABILITIES[actor.role]
    can_force = cell.can_force and cap.force
    variant = ""
    if cell.code == "PAYMENT_LOCKED" and cap.table_scoped:
        variant = PHONE_PROMPT
    elif cell.code == "ACCEPT_BLOCKED" and lock.kind == "presettle":
        variant = "presettle"
    return Refusal(cell.code, variant, can_force, lock)


def coalescing_key(event: Event) -> str:
    """What makes two direct notices the same news for their terminal: a `lock.contended`
    is the same while the lock and the requester are ('' for notices never coalesced).
    How often the same news may reach a holder is the hub's business (Hub.direct)."""
    if event.event != "lock.contended" or event.lock is None or event.by is None:
        return ""
    return f"{event.lock.order_id}\n{event.lock.kind}\n{event.by.terminal_id}"


def _resolve_conflicts(rec: OrderRecord, action: str, force: bool, ctx: Context, out: Outcome,
                       operator: str | None, reason: str | None) -> list[Lock] | None:
    """Refuse (returns None) or, when forced, revoke the blocking locks (returns them)."""
    actor = ctx.actor
    assert actor is not None
    blocking = _blocking(rec, action, actor)
    if not blocking:
        return []
    lock, cell = blocking[0]
    if not force or not cell.can_force:
        out.refusal = conflict_refusal(lock, cell, actor)
        contended = Event("lock.contended", ctx.now, lock=lock, by=actor, action=action)
        out.direct.append((holder_key(lock.holder), contended))
        return None
    revoked = []
    for lock, _ in blocking:
        del rec.locks[lock.kind]
        revoked.append(lock)
        _emit(out, rec, ctx, "lock.forced", lock=lock, by=actor, notify=holder_key(lock.holder))
        _audit(out, ctx, "lock.forced", rec, actor, kind=lock.kind, token=lock.token,
               holder=lock.holder, operator=operator, reason=reason)
    out.changed = True
    return revoked


def _token_refusal(rec: OrderRecord, kind: str, token: int, actor: Terminal | None) -> str | None:
    """Check a token written under a lock of `kind`. None: it is the actor's current one."""
    lock = rec.locks.get(kind)
    if lock is not None and lock.token == token:
        if actor is None or _token_is_credential(actor) or same_holder(lock.holder, actor):
            return None
        return "NOT_HOLDER"
    if rec.lapsed.get(kind) == token:
        return "LOCK_EXPIRED"
    return "FENCED"


def _release_all(rec: OrderRecord, ctx: Context, out: Outcome, reason: str) -> None:
    for lock in list(rec.locks.values()):
        del rec.locks[lock.kind]
        _emit(out, rec, ctx, "lock.released", lock=lock, reason=reason)
        _audit(out, ctx, "lock.released", rec, lock.holder, kind=lock.kind, token=lock.token,
               reason=reason)
        out.changed = True


def _store_order(rec: OrderRecord, order: Order, ctx: Context, out: Outcome) -> None:
    """Replace the order and publish it; an order that ends drops its locks."""
    was_open = rec.order.status == "open"
    rec.order = order
    out.changed = True
    _emit(out, rec, ctx, "order.updated", order=order)
    if order.status == "open":
        rec.ended_at = None
    elif was_open:
        rec.ended_at = ctx.now
        _release_all(rec, ctx, out, "paid" if order.status == "paid" else "released")


def _new_record(order: Order, ctx: Context, store_id: str) -> OrderRecord:
    # Tokens start from the clock, so an in-memory broker that restarts never
    # hands out a token it already gave (PROTOCOL.md section 1, fencing token).
    ended = ctx.now if order.status != "open" else None
    return OrderRecord(store_id, order.order_id, order, fence=ctx.now, ended_at=ended)


# --- handlers ------------------------------------------------------------------

def _acquire(rec: OrderRecord | None, cmd: Acquire, ctx: Context, out: Outcome) -> None:
    actor = ctx.actor
    assert actor is not None
    cap = CAPABILITIES[actor.role]
    if cmd.kind not in cap.lock_kinds or (cmd.force and not cap.force):
        return _refuse(out, "FORBIDDEN")
    pulled = cmd.pulled
    if pulled is not None and pulled.order is not None:
        rec = out.record = _ingest_order(rec, pulled.order, ctx, out, actor.store_id)
    if rec is None:
        if not cap.pulls_order:
            return _refuse(out, "NOT_FOUND")
        if not ctx.config.strong_link:
            out.result = Acquired(enforced=False, lock=None, order=None)
        elif pulled is not None:  # the ERP gave no order
            _refuse(out, "ERP_UNAVAILABLE")
        else:
            out.pull_first = True
        return None
    if not sees_order(actor, rec.order):
        return _refuse(out, "FORBIDDEN")
    if _ended(rec):
        return _refuse(out, "ORDER_PAID")
    if not ctx.config.strong_link:
        out.result = Acquired(enforced=False, lock=None, order=rec.order)
        return None
    own = rec.locks.get(cmd.kind)
    if own is not None and same_holder(own.holder, actor):
        if cap.renew:  # re-acquiring a renewable lock renews it, silently
            own = msgspec.structs.replace(own, expires_at=ctx.now + lock_ttl_ms(actor.role,
                                                                                 ctx.config))
            rec.locks[cmd.kind] = own
            out.changed = True
        out.result = Acquired(enforced=True, lock=own, order=rec.order)
        return None
    forced = _resolve_conflicts(rec, ACTION_OF_KIND[cmd.kind], cmd.force, ctx, out,
                                cmd.operator, cmd.reason)
    if forced is None:
        return None
    if cap.pulls_order and (pulled is None or pulled.order is None):
        # Strong link: the customer pays against the ERP's latest order, decided again after.
        if pulled is not None:
            return _refuse(out, "ERP_UNAVAILABLE")
        out.pull_first = True
        return None
    released = []
    if cmd.kind == "payment":
        mine = rec.locks.get("order")
        if mine is not None and same_holder(mine.holder, actor):
            del rec.locks["order"]
            released.append(mine)
            _emit(out, rec, ctx, "lock.released", lock=mine, reason="upgraded")
            _audit(out, ctx, "lock.released", rec, mine.holder, kind="order", token=mine.token,
                   reason="upgraded")
    ttl = lock_ttl_ms(actor.role, ctx.config)
    rec.fence = max(rec.fence + 1, ctx.now)
    lock = Lock(rec.store_id, rec.order_id, cmd.kind, rec.fence, holder_of(actor), ctx.now,
                ctx.now + ttl, rec.order.version)
    rec.locks[cmd.kind] = lock
    rec.lapsed.pop(cmd.kind, None)
    out.changed = True
    _emit(out, rec, ctx, "lock.acquired", lock=lock)
    _audit(out, ctx, "lock.acquired", rec, actor, kind=cmd.kind, token=lock.token,
           forced=[f.token for f in forced] or None)
    out.result = Acquired(enforced=True, lock=lock, order=rec.order,
                          released=released or None, forced=forced or None)
    return None


def _ingest_order(rec: OrderRecord | None, order: Order, ctx: Context, out: Outcome,
                  store_id: str) -> OrderRecord:
    if rec is None:
        rec = _new_record(order, ctx, store_id)
        out.changed = True
        _emit(out, rec, ctx, "order.updated", order=order)
    elif order.version > rec.order.version and not _paid(rec) and "presettle" not in rec.locks:
        _store_order(rec, order, ctx, out)  # a printed pre-bill freezes the order
    return rec


def _ingest(rec: OrderRecord | None, cmd: Ingest, ctx: Context, out: Outcome) -> None:
    store_id = ctx.actor.store_id if ctx.actor is not None else ""
    rec = out.record = _ingest_order(rec, cmd.order, ctx, out, store_id)
    out.result = Ingested(rec.order, list(rec.locks.values()))


def _renew(rec: OrderRecord | None, cmd: Renew, ctx: Context, out: Outcome) -> None:
    actor = ctx.actor
    assert actor is not None
    if not CAPABILITIES[actor.role].renew:
        return _refuse(out, "FORBIDDEN")
    if rec is None:
        return _refuse(out, "NOT_FOUND")
    if _ended(rec):
        return _refuse(out, "ORDER_PAID")
    if not ctx.config.strong_link:
        out.result = Renewed(enforced=False, lock=None)
        return None
    code = _token_refusal(rec, cmd.kind, cmd.token, actor)
    if code is not None:
        return _refuse(out, code)
    lock = msgspec.structs.replace(rec.locks[cmd.kind],
                                   expires_at=ctx.now + lock_ttl_ms(actor.role, ctx.config))
    rec.locks[cmd.kind] = lock
    out.changed = True
    out.result = Renewed(enforced=True, lock=lock)
    return None


def _release(rec: OrderRecord | None, cmd: Release, ctx: Context, out: Outcome) -> None:
    actor = ctx.actor
    assert actor is not None
    cap = CAPABILITIES[actor.role]
    if cmd.kind not in cap.lock_kinds or (cmd.force and not cap.force):
        return _refuse(out, "FORBIDDEN")
    if rec is None:
        return _refuse(out, "NOT_FOUND")
    if not sees_order(actor, rec.order):
        return _refuse(out, "FORBIDDEN")
    if _ended(rec):
        return _refuse(out, "ORDER_PAID")
    lock = rec.locks.get(cmd.kind)
    if not cmd.force:
        if cmd.token is not None:
            code = _token_refusal(rec, cmd.kind, cmd.token, actor)
            if code is not None:
                return _refuse(out, code)
        elif lock is None or not same_holder(lock.holder, actor):
            return _refuse(out, "NOT_HOLDER")
    elif lock is None:
        return _refuse(out, "NOT_HOLDER")
    assert lock is not None
    del rec.locks[cmd.kind]
    out.changed = True
    if same_holder(lock.holder, actor):
        _emit(out, rec, ctx, "lock.released", lock=lock, reason="released")
        _audit(out, ctx, "lock.released", rec, actor, kind=cmd.kind, token=lock.token,
               reason="released")
    else:
        _emit(out, rec, ctx, "lock.forced", lock=lock, by=actor, notify=holder_key(lock.holder))
        _audit(out, ctx, "lock.forced", rec, actor, kind=cmd.kind, token=lock.token,
               holder=lock.holder, operator=cmd.operator, reason=cmd.reason)
    out.result = Released(lock)
    return None


def _publish(rec: OrderRecord | None, cmd: Publish, ctx: Context, out: Outcome) -> None:
    actor = ctx.actor
    assert actor is not None
    if not CAPABILITIES[actor.role].publish:
        return _refuse(out, "FORBIDDEN")
    if rec is None:
        rec = out.record = _new_record(cmd.order, ctx, actor.store_id)
        out.changed = True
        _emit(out, rec, ctx, "order.updated", order=cmd.order)
        out.result = Published(cmd.order)
        return None
    if _paid(rec) and (cmd.change != "status" or cmd.order.status == "open"):
        return _refuse(out, "ORDER_PAID")  # a paid order may only be closed
    if cmd.token is not None:
        code = _publish_token_refusal(rec, cmd.token, actor)
        if code is not None:
            return _refuse(out, code)
    if cmd.order.version <= rec.order.version:
        return _refuse(out, "STALE_VERSION")
    if ctx.config.strong_link and _resolve_conflicts(
            rec, ACTION_OF_CHANGE[cmd.change], cmd.force, ctx, out,
            cmd.operator, cmd.reason) is None:
        return None
    _store_order(rec, cmd.order, ctx, out)
    out.result = Published(cmd.order)
    return None


def _publish_token_refusal(rec: OrderRecord, token: int, actor: Terminal) -> str | None:
    """A publish may carry the token of any lock the actor holds on the order."""
    for lock in rec.locks.values():
        if lock.token == token:
            return None if same_holder(lock.holder, actor) else "NOT_HOLDER"
    return "LOCK_EXPIRED" if token in rec.lapsed.values() else "FENCED"


def _complete(rec: OrderRecord | None, cmd: Complete, ctx: Context, out: Outcome) -> None:
    actor = ctx.actor
    if actor is not None and not CAPABILITIES[actor.role].record_payment:
        # A phone never records a payment (the payment service does, with the phone's
        # token): refused before anything is read, so it leaves no audit entry either.
        return _refuse(out, "FORBIDDEN")
    if rec is None:
        return _refuse(out, "NOT_FOUND")
    if rec.payment is not None and rec.payment.payment_ref == cmd.payment_ref:
        out.result = Paid(rec.order, rec.payment)  # the retry of a success
        return None
    code = _payment_refusal(rec, cmd, ctx, actor)
    if code is not None:
        _refuse(out, code)
        _audit(out, ctx, "payment.rejected", rec, actor, payment_ref=cmd.payment_ref, code=code,
               amount_cents=cmd.amount_cents, version=cmd.version, token=cmd.token)
        return None  # only the audit entry is written: the record stays as it was
    payment = Payment(cmd.token, cmd.amount_cents, cmd.payment_ref, actor)
    order = msgspec.structs.replace(rec.order, status="paid")
    rec.order = order
    rec.payment = payment
    rec.ended_at = ctx.now
    out.changed = True
    _emit(out, rec, ctx, "order.paid", order=order, payment=payment)
    _release_all(rec, ctx, out, "paid")
    _audit(out, ctx, "payment.completed", rec, actor, payment_ref=cmd.payment_ref,
           amount_cents=cmd.amount_cents, version=cmd.version, token=cmd.token)
    out.result = Paid(order, payment)
    return None


def _payment_refusal(rec: OrderRecord, cmd: Complete, ctx: Context,
                     actor: Terminal | None) -> str | None:
    if _ended(rec):
        return "ORDER_PAID"
    if ctx.config.strong_link:
        if cmd.token is None:
            return "FENCED"
        code = _token_refusal(rec, "payment", cmd.token, actor)
        if code is not None:
            return code
    if cmd.version != rec.order.version:
        return "STALE_VERSION"
    if cmd.amount_cents != rec.order.amount_cents:
        return "AMOUNT_MISMATCH"
    return None


def _check(rec: OrderRecord | None, cmd: Check, ctx: Context, out: Outcome) -> None:
    actor = ctx.actor
    assert actor is not None
    if rec is None:
        return _refuse(out, "NOT_FOUND")
    out.result = Checked(check_refusal(rec, cmd.action, ctx))
    return None


def check_refusal(rec: OrderRecord, action: str, ctx: Context) -> Refusal | None:
    """What the lock table says of `action` by the context's actor, without trying it."""
    actor = ctx.actor
    assert actor is not None
    if action not in actions_of(actor.role) or not sees_order(actor, rec.order):
        return Refusal("FORBIDDEN")
    if _ended(rec):
        return Refusal("ORDER_PAID")
    if not ctx.config.strong_link:
        return None
    blocking = _blocking(rec, action, actor)
    if not blocking:
        return None
    lock, cell = blocking[0]
    return conflict_refusal(lock, cell, actor)


def _tick(rec: OrderRecord | None, cmd: Tick, ctx: Context, out: Outcome) -> None:
    return None


def _release_every(rec: OrderRecord | None, cmd: ReleaseAll, ctx: Context, out: Outcome) -> None:
    if rec is not None:
        _release_all(rec, ctx, out, "released")


_HANDLERS: Final[dict[type, Any]] = {
    Acquire: _acquire,
    Renew: _renew,
    Release: _release,
    Publish: _publish,
    Complete: _complete,
    Check: _check,
    Ingest: _ingest,
    Tick: _tick,
    ReleaseAll: _release_every,
}


# --- store config -----------------------------------------------------------------

class ConfigError(ValueError):
    pass


def patch_config(config: StoreConfig, patch: Mapping[str, Any]) -> StoreConfig:
    """Validate a partial flat config object (PUT config) and apply it."""
    fields = set(StoreConfig.__struct_fields__)
    unknown = sorted(set(patch) - fields)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    for name, value in patch.items():
        if name == "strong_link":
            if not isinstance(value, bool):
                raise ConfigError("strong_link must be true or false")
        elif name == "locale":
            if value not in ("zh-CN", "en"):
                raise ConfigError("locale must be zh-CN or en")
        else:
            low, high = CONFIG_RANGES[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in {low}..{high}")
    return msgspec.structs.replace(config, **patch)
