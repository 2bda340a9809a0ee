"""Exhaustive breadth-first model check of `tablelock.rules.step` for one order.

    python -m tests.model_check --depth 10

Every state reachable from "order never seen" within `--depth` transitions is
explored once: a state is hashed in a canonical form (times relative to the
clock, fencing tokens by rank, versions relative to the order's), so that two
states the rules cannot tell apart are explored once. Terminals: an erp_main,
an erp_secondary, an h5 of the order's table, an h5 of another table, a manager
(publish, check: where its role differs) and the payment service. Transitions:
every command the core knows with every token class the state holds (current,
lapsed, another kind's, one never granted, none), publishes of each change,
payments with right and wrong token, version, amount and reference, checks,
ERP pulls, disconnects and reconnects, strong link off and on, and time jumps
landing just before and on every deadline the state holds (TTL, grace,
retention). A timer tick follows every jump and presence change, as the
broker's timers do, so no state holds a deadline that has passed.

Each transition is checked against PROTOCOL.md: the section 9 invariants, the
refusal precedence of section 2 (an oracle written from the spec, not from
rules.py), a refusal changes nothing but the audit log, tokens never repeat,
a paid order never reopens.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from tablelock import rules
from tablelock.model import (
    Action,
    Lock,
    LockKind,
    Order,
    OrderRecord,
    OrderStatus,
    StoreConfig,
    Terminal,
    holder_key,
)
from tablelock.rules import (
    Acquire,
    Check,
    Command,
    Complete,
    Context,
    Ingest,
    Outcome,
    Publish,
    Pulled,
    Release,
    ReleaseAll,
    Renew,
    Tick,
)

from .rules_helpers import View, term

ORDER_ID = "o1"
TABLE = "t1"
AMOUNT = 1000
T0 = 1_700_000_000_000
# The smallest durations the config allows, with grace shorter than the h5 TTL so
# that a grace wrongly given to a phone's lock would end it early.
CONFIG = StoreConfig(h5_payment_lock_ttl_ms=5_000, erp_lock_ttl_ms=10_000,
                     disconnect_grace_ms=3_000, order_retention_ms=60_000)
CONFIG_OFF = msgspec.structs.replace(CONFIG, strong_link=False)
H5_TTL = CONFIG.h5_payment_lock_ttl_ms
ERP_TTL = CONFIG.erp_lock_ttl_ms
GRACE = CONFIG.disconnect_grace_ms
RETENTION = CONFIG.order_retention_ms

ERP1 = term("e1", "erp_main")
ERP2 = term("e2", "erp_secondary")
H5 = term("h1", "h5", TABLE)
H5_OTHER = term("h9", "h5", "t2")
MANAGER = term("m1", "manager")
SERVICE = term("svc", "service")
ERPS = (ERP1, ERP2)
PRESENT = (ERP1, ERP2, H5)  # the terminals that can hold locks, so can drop off
KINDS: tuple[LockKind, ...] = ("order", "payment", "presettle")
ACTIONS: tuple[Action, ...] = ("edit", "add_items", "modify", "pay", "presettle", "accept")
# The refusals of payment.complete the store must reconcile, audited as payment.rejected:
# the five section 2 lists, and NOT_HOLDER (a current token sent by a terminal that does
# not hold it), which the core audits too.
AUDITED = {"LOCK_EXPIRED", "FENCED", "NOT_HOLDER", "STALE_VERSION", "AMOUNT_MISMATCH",
           "ORDER_PAID"}
CONFLICT_CODES = {"ORDER_LOCKED", "PAYMENT_LOCKED", "PRESETTLE_LOCKED", "ACCEPT_BLOCKED"}


# --- the spec's own tables (PROTOCOL.md section 2), kept apart from rules.py --------

FORCEABLE = {"order": "ORDER_LOCKED", "payment": "PAYMENT_LOCKED",
             "presettle": "PRESETTLE_LOCKED"}
# action -> {kind held by another: (refusal, may be forced)}
BLOCKED_BY: dict[str, dict[str, tuple[str, bool]]] = {
    "edit": {kind: (code, True) for kind, code in FORCEABLE.items()},
    "add_items": {kind: (FORCEABLE[kind], True) for kind in ("payment", "presettle")},
    "modify": {kind: (code, True) for kind, code in FORCEABLE.items()},
    "pay": {kind: (FORCEABLE[kind], True) for kind in ("order", "payment")},
    "presettle": {kind: (code, True) for kind, code in FORCEABLE.items()},
    "accept": {"payment": ("ACCEPT_BLOCKED", False), "presettle": ("ACCEPT_BLOCKED", False)},
}
ACTION_OF_KIND = {"order": "edit", "payment": "pay", "presettle": "presettle"}
ACTION_OF_CHANGE = {"add_items": "add_items", "modify": "modify", "status": "modify"}
ROLE_ACTIONS = {"erp_main": set(ACTIONS), "erp_secondary": set(ACTIONS),
                "manager": {"edit", "pay", "presettle"}, "h5": {"add_items", "pay"},
                "service": set()}
FORCERS = {"erp_main", "erp_secondary", "manager"}


# --- states ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class World:
    """One order as the broker holds it, plus what surrounds the record."""

    record: OrderRecord | None
    now: int
    strong_link: bool = True
    offline: tuple[tuple[str, int], ...] = ()  # (holder_key, since), sorted
    high: int = 0  # the highest fence this order id ever had (it outlives a forgotten record)

    @property
    def config(self) -> StoreConfig:
        return CONFIG if self.strong_link else CONFIG_OFF

    def ctx(self, actor: Terminal | None) -> Context:
        return Context(self.now, self.config, actor, dict(self.offline))


def state_tokens(rec: OrderRecord) -> list[int]:
    tokens = {rec.fence, *(lock.token for lock in rec.locks.values()), *rec.lapsed.values()}
    if rec.payment is not None and rec.payment.token is not None:
        tokens.add(rec.payment.token)
    return sorted(tokens)


def canonical(world: World) -> tuple[Any, ...]:
    """What the rules can tell of a state: times relative to now, tokens by rank.

    The rules compare tokens only for equality and grant max(fence + 1, now), which
    tops every token held, so a token's rank is all that matters. Versions are
    compared only with the order's own. An offline mark older than the grace
    behaves as any older one. A lock's `acquired_at` and `order_version` are
    never read by the rules (the per-step checks still see them).
    """
    now = world.now
    offline = tuple((tid, max(since - now, -GRACE)) for tid, since in world.offline)
    rec = world.record
    if rec is None:
        return world.strong_link, offline, None, world.high >= now
    rank = {token: i for i, token in enumerate(reversed(state_tokens(rec)))}
    locks = tuple(sorted((kind, lock.holder.terminal_id, rank[lock.token],
                          lock.expires_at - now) for kind, lock in rec.locks.items()))
    lapsed = tuple(sorted((kind, rank[token]) for kind, token in rec.lapsed.items()))
    payment = None
    if rec.payment is not None:
        by = rec.payment.by.terminal_id if rec.payment.by is not None else None
        payment = (rank.get(rec.payment.token) if rec.payment.token is not None else None,
                   rec.payment.amount_cents, rec.payment.payment_ref, by)
    ended = rec.ended_at - now if rec.ended_at is not None else None
    return (world.strong_link, offline, rec.order.status, rec.order.amount_cents, locks,
            lapsed, payment, ended, rank[rec.fence])


# --- transitions ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Step:
    """One call of rules.step, as a transition makes it."""

    actor: Terminal | None
    command: Command
    world: World  # the world it was called in
    out: Outcome


@dataclass(frozen=True, slots=True)
class Move:
    label: str
    run: Callable[[World], tuple[World, list[Step]]]


def call(world: World, actor: Terminal | None, command: Command) -> tuple[World, Step]:
    out = rules.step(world.record, command, world.ctx(actor))
    granted = [e.lock.token for e in out.events if e.event == "lock.acquired" and e.lock]
    fence = [out.record.fence] if out.record is not None else []
    high = max([world.high, *granted, *fence])
    return replace(world, record=out.record, high=high), Step(actor, command, world, out)


def command_move(label: str, actor: Terminal | None, command: Command) -> Move:
    def run(world: World) -> tuple[World, list[Step]]:
        after, done = call(world, actor, command)
        return after, [done]
    return Move(label, run)


def pull_move(label: str, actor: Terminal, command: Acquire, answer: Order | None) -> Move:
    """An h5 payment lock: the first pass, then the ERP's answer (None: the pull failed)."""
    def run(world: World) -> tuple[World, list[Step]]:
        after, first = call(world, actor, command)
        if not first.out.pull_first:
            return after, [first]
        second_cmd = replace(command, pulled=Pulled(answer))
        final, second = call(after, actor, second_cmd)
        return final, [first, second]
    return Move(label, run)


def ticked(world: World, label: str) -> Move:
    def run(_: World) -> tuple[World, list[Step]]:
        after, done = call(world, None, Tick())
        return after, [done]
    return Move(label, run)


def order_at(version: int, status: OrderStatus = "open") -> Order:
    return Order(ORDER_ID, TABLE, version, AMOUNT, [{"sku": "tea", "qty": 1}], status)


def deadlines(world: World) -> set[int]:
    """Every time at which the state may change on its own, whoever computes it."""
    rec = world.record
    if rec is None:
        return set()
    offline = dict(world.offline)
    times = set()
    for lock in rec.locks.values():
        times.add(lock.expires_at)
        if holder_key(lock.holder) in offline:
            times.add(offline[holder_key(lock.holder)] + GRACE)
    if rec.ended_at is not None:
        times.add(rec.ended_at + RETENTION)
    return times


def moves(world: World) -> Iterator[Move]:
    rec = world.record
    version = rec.order.version if rec is not None else 0
    offline = dict(world.offline)
    online = [t for t in (ERP1, ERP2, H5, H5_OTHER, MANAGER, SERVICE)
              if holder_key(t) not in offline]
    # One token of each class the rules can tell apart: each held, and one never granted.
    held = state_tokens(rec) if rec is not None else []
    tokens: list[int | None] = [None, *held, (held[0] if held else T0) - 1]
    current_pay = rec.locks["payment"].token if rec is not None and "payment" in rec.locks \
        else None
    is_on = {t.terminal_id for t in online}

    for erp in ERPS:
        if erp.terminal_id not in is_on:
            continue
        name = erp.terminal_id
        for kind in KINDS:
            for force in (False, True):
                yield command_move(f"{name} acquire {kind}{' force' * force}", erp,
                                   Acquire(kind, force=force))
            for token in tokens:
                if token is not None:
                    yield command_move(f"{name} renew {kind} {token}", erp, Renew(kind, token))
                yield command_move(f"{name} release {kind} {token}", erp, Release(kind, token))
            yield command_move(f"{name} release {kind} force", erp, Release(kind, force=True))
        for change, status in (("add_items", "open"), ("modify", "open"), ("status", "closed"),
                               ("status", "open")):
            order = order_at(version + 1, status)  # type: ignore[arg-type]
            for token in tokens:
                yield command_move(f"{name} publish {change}:{status} v+1 token {token}", erp,
                                   Publish(order, change, token))  # type: ignore[arg-type]
            yield command_move(f"{name} publish {change}:{status} v+1 force", erp,
                               Publish(order, change, force=True))  # type: ignore[arg-type]
        yield command_move(f"{name} publish modify v+0", erp,
                           Publish(order_at(max(version, 1)), "modify"))
    if MANAGER.terminal_id in is_on:
        yield command_move("m1 publish modify v+1", MANAGER,
                           Publish(order_at(version + 1), "modify"))
    if H5.terminal_id in is_on:
        answers: list[tuple[str, Order | None]] = [
            ("pull v+0", order_at(max(version, 1))), ("pull v+1", order_at(version + 1)),
            ("pull failed", None)]
        for text, answer in answers:
            yield pull_move(f"h1 acquire payment, {text}", H5, Acquire("payment"), answer)
        yield command_move("h1 acquire payment force", H5, Acquire("payment", force=True))
        yield command_move("h1 acquire order", H5, Acquire("order"))
        for token in tokens:
            yield command_move(f"h1 release payment {token}", H5, Release("payment", token))
        if current_pay is not None:
            yield command_move("h1 renew payment", H5, Renew("payment", current_pay))
    yield pull_move("h9 (other table) acquire payment, pull", H5_OTHER, Acquire("payment"),
                    order_at(max(version, 1)))
    yield command_move("h9 (other table) release payment", H5_OTHER,
                       Release("payment", current_pay))

    payers = [t for t in (ERP1, ERP2, SERVICE, H5) if t.terminal_id in is_on]
    for payer in payers:
        for token in tokens:
            yield command_move(f"{payer.terminal_id} complete token {token} p1", payer,
                               Complete(token, version, AMOUNT, "p1"))
            yield command_move(f"{payer.terminal_id} complete token {token} wrong v+a", payer,
                               Complete(token, version - 1, AMOUNT + 1, "p1"))
        right = current_pay if world.strong_link else None
        for text, command in (("p2", Complete(right, version, AMOUNT, "p2")),
                              ("wrong version", Complete(right, version - 1, AMOUNT, "p1")),
                              ("wrong amount", Complete(right, version, AMOUNT + 1, "p1"))):
            yield command_move(f"{payer.terminal_id} complete right token {text}", payer,
                               command)
    for checker in (ERP1, ERP2, MANAGER, H5, H5_OTHER):
        if checker.terminal_id in is_on:
            for action in ACTIONS:
                yield command_move(f"{checker.terminal_id} check {action}", checker,
                                   Check(action))
    for bump in (0, 1):
        yield command_move(f"ERP answers a pull, v+{bump}", SERVICE,
                           Ingest(order_at(max(version + bump, 1))))

    for terminal in PRESENT:
        tid = holder_key(terminal)
        if tid in offline:
            back = tuple(pair for pair in world.offline if pair[0] != tid)
            yield ticked(replace(world, offline=back), f"{terminal.terminal_id} reconnects")
        else:
            gone = tuple(sorted((*world.offline, (tid, world.now))))
            yield ticked(replace(world, offline=gone), f"{terminal.terminal_id} disconnects")
    if world.strong_link:
        off = replace(world, strong_link=False)
        yield Move("strong link off", lambda _: _one(call(off, None, ReleaseAll())))
    else:
        yield Move("strong link on", lambda _: (replace(world, strong_link=True), []))
    for deadline in sorted(deadlines(world)):
        for at in (deadline - 1, deadline):
            if at > world.now:
                yield ticked(replace(world, now=at), f"time +{at - world.now} ms")


def _one(pair: tuple[World, Step]) -> tuple[World, list[Step]]:
    return pair[0], [pair[1]]


# --- what the spec expects of a command (PROTOCOL.md section 2) ------------------------

@dataclass(frozen=True, slots=True)
class Expect:
    code: str | None  # the refusal, None when the command goes through
    lock: Lock | None = None  # the blocking lock a conflict names
    fetch: bool = False  # an h5 payment lock that must first pull the order


OK = Expect(None)


def ended(rec: OrderRecord) -> bool:
    return rec.order.status != "open" or rec.payment is not None


def paid(rec: OrderRecord) -> bool:
    return rec.payment is not None or rec.order.status == "paid"


def conflict(rec: OrderRecord, action: str, actor: Terminal, force: bool) -> Expect | None:
    """The first lock of another that blocks `action`, in the order payment, presettle, order."""
    for kind in ("payment", "presettle", "order"):
        lock = rec.locks.get(kind)
        cell = BLOCKED_BY[action].get(kind)
        if lock is None or cell is None or lock.holder.terminal_id == actor.terminal_id:
            continue
        if force and cell[1]:
            return None  # forced: every blocking lock goes
        return Expect(cell[0], lock)
    return None


def token_code(rec: OrderRecord, kind: str, token: int, actor: Terminal) -> str | None:
    lock = rec.locks.get(kind)
    if lock is not None and lock.token == token:
        if actor.role == "service" or lock.holder.terminal_id == actor.terminal_id:
            return None
        return "NOT_HOLDER"
    return "LOCK_EXPIRED" if rec.lapsed.get(kind) == token else "FENCED"


def pulled(rec: OrderRecord | None, order: Order) -> OrderRecord:
    """The record after the ERP's answer to a pull is stored (no lock rule applies)."""
    if rec is None:
        return OrderRecord("s1", order.order_id, order, 0)
    if order.version > rec.order.version and not paid(rec) and "presettle" not in rec.locks:
        return msgspec.structs.replace(rec, order=order)
    return rec


def expect(rec: OrderRecord | None, command: Command, actor: Terminal | None,
           config: StoreConfig) -> Expect:
    strong = config.strong_link
    if isinstance(command, (Tick, ReleaseAll, Ingest)):
        return OK
    assert actor is not None
    role = actor.role
    if isinstance(command, Acquire):
        if role == "service" or (command.force and role not in FORCERS) or (
                role == "h5" and command.kind != "payment"):
            return Expect("FORBIDDEN")
        fetched = command.pulled.order if command.pulled is not None else None
        failed = command.pulled is not None and fetched is None
        if fetched is not None:
            rec = pulled(rec, fetched)
        if rec is None:
            if role != "h5":
                return Expect("NOT_FOUND")
            if not strong:
                return OK
            return Expect("ERP_UNAVAILABLE") if failed else Expect(None, fetch=True)
        if role == "h5" and rec.order.table_id != actor.table_id:
            return Expect("FORBIDDEN")
        if ended(rec):
            return Expect("ORDER_PAID")
        if not strong:
            return OK
        own = rec.locks.get(command.kind)
        if own is not None and own.holder.terminal_id == actor.terminal_id:
            return OK
        blocked = conflict(rec, ACTION_OF_KIND[command.kind], actor, command.force)
        if blocked is not None:
            return blocked
        if role == "h5" and fetched is None:
            return Expect("ERP_UNAVAILABLE") if failed else Expect(None, fetch=True)
        return OK
    if isinstance(command, Renew):
        if role not in FORCERS:
            return Expect("FORBIDDEN")
        if rec is None:
            return Expect("NOT_FOUND")
        if ended(rec):
            return Expect("ORDER_PAID")
        if not strong:
            return OK
        return Expect(token_code(rec, command.kind, command.token, actor))
    if isinstance(command, Release):
        if role == "service" or (command.force and role not in FORCERS) or (
                role == "h5" and command.kind != "payment"):
            return Expect("FORBIDDEN")
        if rec is None:
            return Expect("NOT_FOUND")
        if role == "h5" and rec.order.table_id != actor.table_id:
            return Expect("FORBIDDEN")
        if ended(rec):
            return Expect("ORDER_PAID")
        lock = rec.locks.get(command.kind)
        if command.force:
            return OK if lock is not None else Expect("NOT_HOLDER")
        if command.token is not None:
            return Expect(token_code(rec, command.kind, command.token, actor))
        mine = lock is not None and lock.holder.terminal_id == actor.terminal_id
        return OK if mine else Expect("NOT_HOLDER")
    if isinstance(command, Publish):
        if role not in ("erp_main", "erp_secondary"):
            return Expect("FORBIDDEN")
        if rec is None:
            return OK
        if paid(rec) and (command.change != "status" or command.order.status == "open"):
            return Expect("ORDER_PAID")
        if command.token is not None:
            holders = {lock.token: lock.holder.terminal_id for lock in rec.locks.values()}
            if command.token in holders:
                if holders[command.token] != actor.terminal_id:
                    return Expect("NOT_HOLDER")
            else:
                lapsed = command.token in rec.lapsed.values()
                return Expect("LOCK_EXPIRED" if lapsed else "FENCED")
        if command.order.version <= rec.order.version:
            return Expect("STALE_VERSION")
        if strong:
            blocked = conflict(rec, ACTION_OF_CHANGE[command.change], actor, command.force)
            if blocked is not None:
                return blocked
        return OK
    if isinstance(command, Complete):
        if role == "h5":
            return Expect("FORBIDDEN")
        if rec is None:
            return Expect("NOT_FOUND")
        if rec.payment is not None and rec.payment.payment_ref == command.payment_ref:
            return OK  # the retry of the success
        if ended(rec):
            return Expect("ORDER_PAID")
        if strong:
            if command.token is None:
                return Expect("FENCED")
            code = token_code(rec, "payment", command.token, actor)
            if code is not None:
                return Expect(code)
        if command.version != rec.order.version:
            return Expect("STALE_VERSION")
        if command.amount_cents != rec.order.amount_cents:
            return Expect("AMOUNT_MISMATCH")
        return OK
    assert isinstance(command, Check)
    return Expect("NOT_FOUND") if rec is None else OK


def expect_check(rec: OrderRecord, action: str, actor: Terminal, strong: bool) -> Expect:
    """The answer of `check`: FORBIDDEN, ORDER_PAID, a conflict, or allowed (None)."""
    if action not in ROLE_ACTIONS[actor.role] or (
            actor.role == "h5" and rec.order.table_id != actor.table_id):
        return Expect("FORBIDDEN")
    if ended(rec):
        return Expect("ORDER_PAID")
    if not strong:
        return OK
    return conflict(rec, action, actor, False) or OK


# --- the checks ------------------------------------------------------------------------

def encode(rec: OrderRecord | None) -> bytes:
    return msgspec.json.encode(rec)


def lock_end(lock: Lock, offline: dict[str, int]) -> int:
    """When a lock must be gone, per the spec: its TTL, or its ERP holder's grace."""
    if lock.holder.role != "h5" and holder_key(lock.holder) in offline:
        return min(lock.expires_at, offline[holder_key(lock.holder)] + GRACE)
    return lock.expires_at


def check_state(world: World) -> list[str]:
    """Invariants of one state."""
    rec = world.record
    if rec is None:
        return []
    found = []
    offline = dict(world.offline)
    if rec.order_id != ORDER_ID or rec.order.table_id != TABLE:
        found.append("the record names another order or table")
    for kind, lock in rec.locks.items():
        if lock.kind != kind or lock.order_id != ORDER_ID:
            found.append(f"a {lock.kind} lock filed as {kind}")  # invariant 1
        if lock.token > rec.fence:
            found.append(f"a lock token {lock.token} above the fence {rec.fence}")
        if lock_end(lock, offline) <= world.now:
            found.append(f"a {kind} lock held past its end")  # TTL, grace
        if lock.holder.role == "h5":
            if lock.expires_at - lock.acquired_at != H5_TTL:
                found.append("an h5 lock whose life is not the h5 TTL")
            if kind != "payment" or lock.holder.terminal_id != H5.terminal_id:
                found.append("an h5 lock that is not its own table's payment lock")
    if ended(rec) and rec.locks:
        found.append("an ended order holds locks")
    if not world.strong_link and rec.locks:
        found.append("a lock stored with strong link off")
    if rec.payment is not None and rec.order.status == "open":
        found.append("a paid order is open")
    return found


def check_step(step: Step, after: World) -> list[str]:
    """Invariants of one call of rules.step."""
    found: list[str] = []
    world, actor, command, out = step.world, step.actor, step.command, step.out
    before = world.record
    rec = out.record
    names = [event.event for event in out.events]
    strong = world.config.strong_link

    # Section 2: which refusal, by precedence; a conflict names the first blocking lock.
    want = expect(before, command, actor, world.config)
    got = out.refusal.code if out.refusal is not None else None
    if got != want.code:
        found.append(f"refusal {got}, the spec says {want.code}")
    elif want.lock is not None and out.refusal is not None and out.refusal.lock != want.lock:
        found.append("a conflict names the wrong lock")
    if out.pull_first != want.fetch:
        found.append(f"pull the order: {out.pull_first}, the spec says {want.fetch}")
    if isinstance(command, Check) and before is not None and actor is not None:
        answer = expect_check(before, command.action, actor, strong)
        assert isinstance(out.result, rules.Checked)
        said = None if out.result.refusal is None else out.result.refusal.code
        if said != answer.code:
            found.append(f"check says {said}, the spec says {answer.code}")

    # A refusal, a check or a pending pull changes nothing but the audit log.
    unchanged = out.refusal is not None or out.pull_first or isinstance(command, Check)
    if unchanged:
        # (The ERP's answer to an h5's pull is stored whatever the lock request gets.)
        base, pull_events = before, []
        fetched = command.pulled.order if isinstance(command, Acquire) and command.pulled else None
        if fetched is not None:
            pull = rules.step(before, Ingest(fetched), world.ctx(actor))
            base, pull_events = pull.record, [event.event for event in pull.events]
        if encode(rec) != encode(base):
            found.append(f"{got or 'a no-op'} changed the record")
        if names != pull_events:
            found.append(f"{got or 'a no-op'} published {names}")
        rejected = [a for a in out.audit if a.kind == "payment.rejected"]
        if len(out.audit) != len(rejected) or (
                isinstance(command, Complete) and got in AUDITED) != bool(rejected):
            found.append("a refusal audited other than one payment.rejected, or not audited")
        if out.refusal is not None and out.refusal.code in CONFLICT_CODES:
            blocker = out.refusal.lock
            if blocker is None or [(to, e.event) for to, e in out.direct] != [
                    (holder_key(blocker.holder), "lock.contended")]:
                found.append("a conflict did not tell the blocking holder, once")
        elif out.direct:
            found.append("a direct event without a conflict")

    # A write under a token went through: the token was the current one's.
    if out.refusal is None and before is not None and actor is not None:
        def current(kind: str, token: int | None) -> bool:
            lock = before.locks.get(kind)
            return lock is not None and lock.token == token and (
                actor.role == "service" or lock.holder.terminal_id == actor.terminal_id)
        token_write = isinstance(command, Renew) or (
            isinstance(command, Release) and command.token is not None and not command.force)
        if token_write and strong and not current(command.kind, command.token):  # type: ignore[union-attr]
            found.append("a stale token wrote")
        if isinstance(command, Publish) and command.token is not None and not any(
                current(kind, command.token) for kind in before.locks):
            found.append("a publish under a stale token went through")
        if "order.paid" in names and strong and isinstance(command, Complete) and not current(
                "payment", command.token):
            found.append("a payment under a stale token went through")

    # Invariant 2: every grant tops every token the order ever had; tokens never repeat.
    floor = max(world.high, before.fence if before is not None else 0)
    for event in out.events:
        if event.event == "lock.acquired" and event.lock is not None:
            if event.lock.token <= floor:
                found.append(f"token {event.lock.token} granted after {floor}")
            floor = event.lock.token
            if event.lock.holder.role == "h5" and not (
                    isinstance(command, Acquire) and command.pulled is not None
                    and command.pulled.order is not None):
                found.append("an h5 lock granted on the broker's copy, without a pull")
    if rec is not None and before is not None and rec.fence < before.fence:
        found.append("the fence went back")
    if rec is not None and before is None and rec.fence <= world.high:
        found.append("a new record starts its fence at or below an old token")

    # Invariant 3 and "a paid order never reopens".
    if "order.paid" in names:
        if names.count("order.paid") > 1 or (before is not None and paid(before)):
            found.append("a second payment")
        if actor is None or actor.role == "h5" or (
                rec is not None and rec.payment is not None and rec.payment.by is not None
                and rec.payment.by.role == "h5"):
            found.append("a payment recorded by an h5")
    if before is not None and paid(before) and rec is not None and (
            rec.order.status == "open" or rec.payment != before.payment):
        found.append("a paid order reopened or its payment changed")

    # Invariant 4: h5 never forces, never gets a grace, never touches another table.
    for event in out.events:
        if event.event == "lock.forced" and (event.by is None or event.by.role not in FORCERS):
            found.append("a lock forced by a role that may not force")
        if (event.event == "lock.released" and event.reason == "holder_disconnected"
                and event.lock is not None and event.lock.holder.role == "h5"):
            found.append("an h5 lock ended by the disconnect grace")
    if actor is not None and actor.role == "h5" and actor.table_id != TABLE:
        if encode(rec) != encode(before) and not (before is None and rec is not None
                                                  and isinstance(command, Acquire)):
            found.append("an h5 changed another table's order")
        if names and not (before is None and names == ["order.updated"]):
            found.append("an h5 caused events on another table's order")

    # Invariants 5 and 6: the events replayed on the snapshot before give the state after.
    for event in out.events:
        if event.ts != world.now or event.table_id != TABLE:
            found.append(f"{event.event} stamped with another time or table")
    if before is not None and rec is None:
        if before.ended_at is None or world.now < before.ended_at + RETENTION:
            found.append("an order forgotten before its retention ran out")
    else:
        view = View.snapshot(before)
        try:
            view.apply(out.events)
            view.assert_matches(rec)
        except AssertionError as error:
            found.append(f"snapshot + events differ from the state: {error}")
    if rec is not None and before is not None and rec.payment != before.payment and (
            "order.paid" not in names):
        found.append("a payment recorded without order.paid")

    # The next deadline the outcome names is the first one the spec knows.
    ends: list[int] = []
    if rec is not None:
        offline = dict(world.offline)
        ends = [lock_end(lock, offline) for lock in rec.locks.values()]
        if rec.ended_at is not None:
            ends.append(rec.ended_at + RETENTION)
    if out.deadline != (min(ends) if ends else None):
        found.append(f"deadline {out.deadline}, the spec says {min(ends) if ends else None}")
    return found


# --- the search --------------------------------------------------------------------------

@dataclass
class Violation:
    problem: str
    trace: list[str]


@dataclass
class Report:
    depth: int
    states: int = 0
    transitions: int = 0
    steps: int = 0
    per_depth: list[tuple[int, int, int]] = field(default_factory=list)  # depth, new, moves
    violations: list[Violation] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False  # no new state at the last depth: the whole space was seen


def explore(depth: int, max_violations: int = 20) -> Report:
    """Breadth-first search from the order never seen, `depth` transitions deep."""
    started = time.perf_counter()
    start = World(None, T0)
    parent: dict[tuple[Any, ...], tuple[tuple[Any, ...] | None, str]] = {
        canonical(start): (None, "")}
    frontier = [start]
    report = Report(depth, states=1)

    def trace(key: tuple[Any, ...] | None, last: str) -> list[str]:
        labels = [last]
        while key is not None:
            key, label = parent[key]
            if label:
                labels.append(label)
        return labels[::-1]

    for level in range(1, depth + 1):
        following: list[World] = []
        level_moves = 0
        for world in frontier:
            here = canonical(world)
            for move in moves(world):
                after, steps = move.run(world)
                level_moves += 1
                report.steps += len(steps)
                problems = [p for s in steps for p in check_step(s, after)]
                problems += check_state(after)
                if problems and len(report.violations) < max_violations:
                    report.violations.extend(Violation(p, trace(here, move.label))
                                             for p in dict.fromkeys(problems))
                key = canonical(after)
                if key not in parent:
                    parent[key] = (here, move.label)
                    following.append(after)
            if len(report.violations) >= max_violations:
                break
        report.transitions += level_moves
        report.states += len(following)
        report.per_depth.append((level, len(following), level_moves))
        frontier = following
        if not frontier or len(report.violations) >= max_violations:
            report.complete = not frontier
            break
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6, help="transitions from the start")
    args = parser.parse_args(argv)
    report = explore(args.depth)
    print("depth  new states  transitions")
    for level, new, level_moves in report.per_depth:
        print(f"{level:5}  {new:10}  {level_moves:11}")
    print(f"states {report.states}, transitions {report.transitions} "
          f"({report.steps} calls of rules.step), depth {len(report.per_depth)}"
          f"{' (every reachable state)' if report.complete else ''}, "
          f"{report.seconds:.1f} s")
    for violation in report.violations:
        print(f"VIOLATION {violation.problem}\n    after: " + "\n           ".join(
            violation.trace))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
