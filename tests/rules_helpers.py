"""Builders shared by the tests of the pure lock core (`tablelock.rules.step`).

Terminals, orders, locks, records and contexts, a tiny driver that threads one
order's record through successive steps, and `View`: a subscriber's copy of an
order rebuilt from the events alone (PROTOCOL.md section 9, invariant 6).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tablelock import rules
from tablelock.model import (
    Event,
    Lock,
    LockKind,
    Order,
    OrderRecord,
    OrderStatus,
    Role,
    StoreConfig,
    Terminal,
    holder_of,
)
from tablelock.rules import Acquire, Command, Context, Outcome, Publish, Pulled

STORE = "s1"
T0 = 1_700_000_000_000  # ms since the epoch: a plausible broker clock
CONFIG = StoreConfig()
H5_TTL = CONFIG.h5_payment_lock_ttl_ms
ERP_TTL = CONFIG.erp_lock_ttl_ms
GRACE = CONFIG.disconnect_grace_ms


def term(terminal_id: str, role: Role, table_id: str | None = None) -> Terminal:
    return Terminal(terminal_id, role, terminal_id.upper(), STORE, table_id)


ERP1 = term("e1", "erp_main")
ERP2 = term("e2", "erp_secondary")
MANAGER = term("m1", "manager")
H5 = term("h1", "h5", "t1")
H5_SAME_TABLE = term("h2", "h5", "t1")
H5_OTHER_TABLE = term("h3", "h5", "t2")
SERVICE = term("svc", "service")
# A phone whose token names the same sub as the till ERP1: not the till (holder_key).
H5_AS_TILL = term("e1", "h5", "t1")


def make_order(order_id: str = "o1", table_id: str = "t1", version: int = 1,
               amount_cents: int = 1000, status: OrderStatus = "open") -> Order:
    return Order(order_id, table_id, version, amount_cents, [{"sku": "tea", "qty": 1}], status)


def make_lock(kind: LockKind, holder: Terminal, token: int, *, acquired_at: int = T0,
              ttl: int | None = None, version: int = 1, order_id: str = "o1") -> Lock:
    if ttl is None:
        ttl = H5_TTL if holder.role == "h5" else ERP_TTL
    return Lock(STORE, order_id, kind, token, holder_of(holder), acquired_at, acquired_at + ttl,
                version)


def make_record(order: Order | None = None, locks: Iterable[Lock] = (),
                fence: int | None = None) -> OrderRecord:
    order = order or make_order()
    by_kind = {lock.kind: lock for lock in locks}
    if fence is None:
        fence = max([T0, *(lock.token for lock in by_kind.values())])
    ended = T0 if order.status != "open" else None
    return OrderRecord(STORE, order.order_id, order, fence, by_kind, ended_at=ended)


def ctx(actor: Terminal | None = None, now: int = T0, config: StoreConfig = CONFIG,
        offline: Mapping[str, int] | None = None) -> Context:
    return Context(now, config, actor, dict(offline or {}))


def step(record: OrderRecord | None, command: Command, actor: Terminal | None = None,
         now: int = T0, config: StoreConfig = CONFIG,
         offline: Mapping[str, int] | None = None) -> Outcome:
    return rules.step(record, command, ctx(actor, now, config, offline))


def names(out: Outcome) -> list[str]:
    return [event.event for event in out.events]


def only(out: Outcome, name: str) -> Event:
    found = [event for event in out.events if event.event == name]
    assert len(found) == 1, (name, names(out))
    return found[0]


def refusal_code(out: Outcome) -> str | None:
    return out.refusal.code if out.refusal is not None else None


@dataclass
class Sim:
    """One order's record threaded through successive steps on a moving clock."""

    record: OrderRecord | None = None
    now: int = T0
    config: StoreConfig = CONFIG
    offline: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def step(self, actor: Terminal | None, command: Command) -> Outcome:
        out = rules.step(self.record, command,
                         Context(self.now, self.config, actor, dict(self.offline)))
        self.record = out.record
        self.outcomes.append(out)
        return out

    def publish(self, actor: Terminal = ERP1, *, version: int = 1, amount_cents: int = 1000,
                change: str = "modify", table_id: str = "t1", status: OrderStatus = "open",
                **kw: Any) -> Outcome:
        order = make_order(self.order_id, table_id, version, amount_cents, status)
        return self.step(actor, Publish(order, change, **kw))  # type: ignore[arg-type]

    @property
    def order_id(self) -> str:
        return self.record.order_id if self.record is not None else "o1"

    @property
    def order(self) -> Order:
        assert self.record is not None
        return self.record.order

    def acquire(self, actor: Terminal, kind: LockKind, **kw: Any) -> Outcome:
        """A lock request; an h5's ERP pull is answered with the broker's own copy."""
        out = self.step(actor, Acquire(kind, **kw))
        if out.pull_first and self.record is not None:
            out = self.step(actor, Acquire(kind, pulled=Pulled(self.record.order), **kw))
        return out

    def grant(self, actor: Terminal, kind: LockKind, **kw: Any) -> Lock:
        out = self.acquire(actor, kind, **kw)
        assert out.refusal is None and out.result is not None, out.refusal
        lock = out.result.lock
        assert isinstance(lock, Lock)
        return lock


def strip_renewable(lock: Lock) -> tuple[Any, ...]:
    """A lock as a subscriber can know it: an ERP lock's expires_at moves silently."""
    expires = lock.expires_at if lock.holder.role == "h5" else None
    return (lock.kind, lock.token, lock.holder, lock.acquired_at, expires, lock.order_version,
            lock.order_id, lock.store_id)


@dataclass
class View:
    """A snapshot of one order followed by its events (PROTOCOL.md section 9, invariant 6)."""

    order: Order | None = None
    locks: dict[str, Lock] = field(default_factory=dict)

    @classmethod
    def snapshot(cls, record: OrderRecord | None) -> View:
        if record is None:
            return cls()
        return cls(record.order, dict(record.locks))

    def apply(self, events: Iterable[Event]) -> None:
        for event in events:
            if event.event in ("order.updated", "order.paid"):
                assert event.order is not None
                self.order = event.order
            elif event.event == "lock.acquired":
                assert event.lock is not None
                assert event.lock.kind not in self.locks, f"second {event.lock.kind} lock"
                self.locks[event.lock.kind] = event.lock
            elif event.event in ("lock.released", "lock.expired", "lock.forced"):
                assert event.lock is not None
                held = self.locks.pop(event.lock.kind, None)
                assert held is not None and held.token == event.lock.token, event
            else:
                raise AssertionError(f"unexpected channel event {event.event}")

    def assert_matches(self, record: OrderRecord | None) -> None:
        if record is None:
            assert self.order is None and not self.locks
            return
        assert self.order == record.order
        mine = {kind: strip_renewable(lock) for kind, lock in self.locks.items()}
        real = {kind: strip_renewable(lock) for kind, lock in record.locks.items()}
        assert mine == real
