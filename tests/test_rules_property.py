"""Random request sequences through `rules.step`, checking PROTOCOL.md section 9 after each step.

Six terminals (2 ERP, 1 manager, 2 phones of table t1, 1 phone of table t2) act
on the bills of tables t1 and t2 while time moves and terminals drop and come
back. Only `rules.step` is driven; the machine plays the broker around it: it
stores each record, re-steps an h5 payment lock with the ERP's answer, and
ticks every record when time passes or presence changes, as the timers would.

The simulated ERP publishes what it likes, reopening included (a paid order must
stay paid whatever it says); once its copy of a table's bill has ended it may
also open the table's next bill under a new order id, so the walk keeps going.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tablelock import rules
from tablelock.model import (
    Lock,
    LockKind,
    Order,
    OrderRecord,
    StoreConfig,
    Terminal,
    holder_key,
    same_holder,
)
from tablelock.rules import (
    Acquire,
    Check,
    Command,
    Complete,
    Context,
    Outcome,
    Publish,
    Pulled,
    Release,
    Renew,
    Tick,
)

from .rules_helpers import (
    ERP1,
    ERP2,
    H5,
    H5_AS_TILL,
    H5_OTHER_TABLE,
    H5_SAME_TABLE,
    MANAGER,
    SERVICE,
    T0,
    View,
    make_order,
)

TABLES = ("t1", "t2")
TERMINALS = [ERP1, ERP2, MANAGER, H5, H5_SAME_TABLE, H5_OTHER_TABLE, H5_AS_TILL]
PAYERS = [*TERMINALS, SERVICE]
KINDS: list[LockKind] = ["order", "payment", "presettle"]
ACTIONS = ["edit", "add_items", "modify", "pay", "presettle", "accept"]
ACTION_OF_KIND = {"order": "edit", "payment": "pay", "presettle": "presettle"}
ACTION_OF_CHANGE = {"add_items": "add_items", "modify": "modify", "status": "modify"}
REJECTED = {"LOCK_EXPIRED", "FENCED", "STALE_VERSION", "AMOUNT_MISMATCH", "ORDER_PAID"}
CONFLICTS = {"ORDER_LOCKED", "PAYMENT_LOCKED", "PRESETTLE_LOCKED", "ACCEPT_BLOCKED"}
SHORT = {"h5_payment_lock_ttl_ms": 5_000, "erp_lock_ttl_ms": 10_000,
         "order_retention_ms": 60_000}
CONFIGS = [StoreConfig(disconnect_grace_ms=grace, **SHORT)  # type: ignore[arg-type]
           for grace in (3_000, 0, 20_000)]

# Weighted towards the terminals that may do most, so fewer steps are a plain FORBIDDEN.
FORCING_ROLES = frozenset(role for role in rules.ROLES if rules.capability(role).force)
terminals = st.sampled_from([*TERMINALS, ERP1, ERP2, H5])
forces = st.sampled_from([False, False, True])
bills = st.sampled_from(["t1", "t2", "t1", "old"])  # a table's current bill, or an older one
kinds = st.sampled_from(KINDS)
picks = st.integers(0, 4)  # which known lock's token a write carries (see CoreMachine.known)
refs = st.sampled_from(["p1", "p2"])


def lock_deadline(lock: Lock, config: StoreConfig, offline: dict[str, int]) -> int:
    """When a lock must be gone, from the spec: its TTL, or its ERP holder's grace."""
    key = holder_key(lock.holder)
    if lock.holder.role != "h5" and key in offline:
        return min(lock.expires_at, offline[key] + config.disconnect_grace_ms)
    return lock.expires_at


class CoreMachine(RuleBasedStateMachine):
    reached: ClassVar[Counter[str]] = Counter()  # events, reasons, refusals seen: coverage

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.config = CONFIGS[0]
        self.offline: dict[str, int] = {}
        self.bills: dict[str, list[str]] = {table: [f"{table}-1"] for table in TABLES}
        self.table_of = {f"{table}-1": table for table in TABLES}
        self.records: dict[str, OrderRecord | None] = {}
        self.views: dict[str, View] = {}
        self.erp: dict[str, Order] = {}  # the ERP's own copy of each bill
        self.granted: dict[str, list[Lock]] = {}
        self.max_token: dict[str, int] = {}
        self.paid_refs: dict[str, list[str]] = {}

    @initialize(config=st.sampled_from(CONFIGS), amount=st.sampled_from([1000, 1500]),
                both=st.booleans())
    def open_store(self, config: StoreConfig, amount: int, both: bool) -> None:
        """The store's config, and t1's bill published (t2's too, or left to the walk)."""
        self.config = config
        for table in TABLES if both else TABLES[:1]:
            oid = self.bills[table][-1]
            order = make_order(oid, table, 1, amount)
            assert self.step(oid, ERP1, Publish(order, "modify")).refusal is None
            self.erp[oid] = order

    def order_id(self, bill: str) -> str:
        if bill == "old":
            older = [oid for table in TABLES for oid in self.bills[table][:-1]]
            return older[-1] if older else self.bills["t1"][-1]
        return self.bills[bill][-1]

    # --- the one door into the core, with the per-step invariants ------------------

    def step(self, oid: str, actor: Terminal | None, command: Command) -> Outcome:
        if actor is not None:
            self.offline.pop(holder_key(actor), None)  # a terminal that sends is connected
        before = self.records.get(oid)
        ctx = Context(self.now, self.config, actor, dict(self.offline))
        frozen = msgspec.json.encode(before)
        seen = rules.step(before, Tick(), ctx).record  # the record as the command finds it
        out = rules.step(before, command, ctx)
        assert msgspec.json.encode(before) == frozen, "step mutated its input"
        self.check_outcome(oid, actor, command, before, seen, out)
        self.records[oid] = out.record
        self.count(command, before, out)
        return out

    def count(self, command: Command, before: OrderRecord | None, out: Outcome) -> None:
        reached = self.reached
        reached.update(e.event + (":" + e.reason if e.reason else "") for e in out.events)
        if out.refusal is not None:
            reached[out.refusal.code] += 1
        elif isinstance(command, Check) and out.result and not out.result.allowed:
            reached["check:" + out.result.refusal.code] += 1
        if before is not None and out.record is None:
            reached["forgotten"] += 1
        if isinstance(command, Complete) and out.refusal is None and not out.events:
            reached["payment.retry"] += 1

    def check_outcome(self, oid: str, actor: Terminal | None, command: Command,
                      before: OrderRecord | None, seen: OrderRecord | None, out: Outcome) -> None:
        rec = out.record
        table = self.table_of[oid]
        names = [event.event for event in out.events]
        # Events: each carries the order's table and the step's time.
        for event in out.events:
            assert event.table_id == table and event.ts == self.now, event
        # Invariant 1: one lock per kind (the replay below refuses a second grant, too).
        if rec is not None:
            assert rec.order_id == oid and rec.order.table_id == table
            for kind, lock in rec.locks.items():
                assert lock.kind == kind and lock.order_id == oid
                assert lock.token <= rec.fence
        # Invariant 2: fencing tokens strictly increase per order, below 2**53 ...
        for event in out.events:
            if event.event == "lock.acquired":
                assert event.lock is not None
                assert self.max_token.get(oid, 0) < event.lock.token < 2**53
                self.max_token[oid] = event.lock.token
                self.granted.setdefault(oid, []).append(event.lock)
        # ... and a stale token never writes.
        if out.refusal is None:
            self.check_token_write(actor, command, before, seen, out)
        # Invariant 3: at most one payment per order; a retry names the first one. (Once
        # retention has forgotten an order, the ERP's next publish of its id starts afresh.)
        if rec is None and before is not None:
            self.paid_refs[oid] = []
        paid = self.paid_refs.setdefault(oid, [])
        if "order.paid" in names:
            assert isinstance(command, Complete)
            paid.append(command.payment_ref)
            assert len(paid) == 1, paid
        elif isinstance(command, Complete) and out.refusal is None:
            assert paid == [command.payment_ref]
        # Invariant 4: h5 never forces, never outlives its TTL, never touches another table,
        # never records a payment (not even a refused one: no audit entry).
        if isinstance(command, Complete) and actor is not None and actor.role == "h5":
            assert out.refusal is not None and out.refusal.code == "FORBIDDEN"
            assert not any(a.kind.startswith("payment.") for a in out.audit)
        for event in out.events:
            if event.event == "lock.forced":
                assert event.by is not None and event.by.role in FORCING_ROLES
                assert getattr(command, "force", False)
        if actor is not None and actor.role == "h5":
            if getattr(command, "force", False):
                assert out.refusal is not None and out.refusal.code == "FORBIDDEN"
            assert out.refusal is None or not out.refusal.can_force  # never offered a force
            if isinstance(command, Check) and out.result and not out.result.allowed:
                assert not out.result.refusal.can_force
            if actor.table_id != table:
                self.check_other_table(command, out)
        if rec is not None:
            for lock in rec.locks.values():
                if lock.holder.role == "h5":
                    assert lock.expires_at - lock.acquired_at == self.config.h5_payment_lock_ttl_ms
                    assert lock.holder.terminal_id in {
                        t.terminal_id for t in TERMINALS if t.table_id == table}
        # Invariant 6: the events replayed over the last snapshot give the record.
        view = self.views.setdefault(oid, View())
        if rec is None and before is not None:  # only retention forgets an order, silently
            assert before.ended_at is not None
            assert self.now >= before.ended_at + self.config.order_retention_ms
            view = self.views[oid] = View()
        view.apply(out.events)
        view.assert_matches(rec)
        # No lock outlives its deadline; the outcome names the next one.
        deadlines = []
        if rec is not None:
            for lock in rec.locks.values():
                deadline = lock_deadline(lock, self.config, self.offline)
                assert deadline > self.now, (lock, self.offline)
                deadlines.append(deadline)
            if rec.ended_at is not None:
                deadlines.append(rec.ended_at + self.config.order_retention_ms)
        assert out.deadline == (min(deadlines) if deadlines else None)
        # A refusal changes no lock; a conflict tells the blocking holder, and only then.
        if out.refusal is not None:
            assert not {"lock.acquired", "lock.forced", "order.paid"} & set(names)
            if seen is not None and rec is not None:
                assert rec.locks == seen.locks
            assert out.result is None and not out.pull_first
        if out.refusal is not None and out.refusal.code in CONFLICTS:
            assert out.refusal.lock is not None and actor is not None
            [(to, contended)] = out.direct
            assert to == holder_key(out.refusal.lock.holder)
            assert not same_holder(out.refusal.lock.holder, actor)
            assert contended.event == "lock.contended" and contended.by == actor
        else:
            assert out.direct == []

    def check_token_write(self, actor: Terminal | None, command: Command,
                          before: OrderRecord | None, seen: OrderRecord | None,
                          out: Outcome) -> None:
        """A successful write under a token carried the current token of the actor's lock."""
        def current(kind: str, token: int | None) -> bool:
            lock = seen.locks.get(kind) if seen is not None else None
            return lock is not None and lock.token == token and (
                actor is None or actor.role == "service"
                or same_holder(lock.holder, actor))

        if isinstance(command, Renew) or (
                isinstance(command, Release) and command.token is not None and not command.force):
            assert current(command.kind, command.token)
        elif isinstance(command, Publish) and command.token is not None and seen is not None:
            assert any(current(kind, command.token) for kind in seen.locks)
        elif isinstance(command, Complete):
            if "order.paid" in [e.event for e in out.events]:
                assert current("payment", command.token)
            else:  # the retry of the success
                assert before is not None and before.payment is not None
                assert before.payment.payment_ref == command.payment_ref

    def check_other_table(self, command: Command, out: Outcome) -> None:
        if isinstance(command, Check):
            assert out.refusal is not None or (
                out.result is not None and out.result.refusal.code == "FORBIDDEN")
        else:
            # An unknown order's table is learnt from the ERP: failing that, ERP_UNAVAILABLE.
            assert out.pull_first or (out.refusal is not None and out.refusal.code in (
                "FORBIDDEN", "NOT_FOUND", "ERP_UNAVAILABLE"))
        caused = [e for e in out.events if e.event in ("lock.acquired", "lock.forced", "order.paid")
                  or (e.event == "lock.released" and e.reason != "holder_disconnected")]
        assert caused == [], caused

    def tick_all(self) -> None:
        for oid, rec in list(self.records.items()):
            if rec is not None:
                self.step(oid, None, Tick())

    def known(self, oid: str, pick: int, actor: Terminal | None) -> Lock | None:
        """0: none; 1: the actor's latest lock on this order; n: the (n-1)-th latest granted."""
        granted = self.granted.get(oid, [])
        if pick == 1 and actor is not None:
            granted = [lock for lock in granted if same_holder(lock.holder, actor)]
            pick = 2
        if pick == 0 or not granted:
            return None
        return granted[-min(pick - 1, len(granted))]

    def compare_check(self, checked: Outcome, real: Outcome) -> None:
        """`check` answers like the request itself where only the lock table can refuse it."""
        assert checked.result is not None
        if checked.result.allowed:
            assert real.refusal is None
        else:
            refusal = checked.result.refusal
            assert real.refusal is not None
            assert (real.refusal.code, real.refusal.can_force, real.refusal.lock) == (
                refusal.code, refusal.can_force, refusal.lock)

    # --- requests -------------------------------------------------------------------

    @rule(actor=st.sampled_from([ERP1, ERP2, MANAGER, ERP1]), bill=bills,
          change=st.sampled_from(["add_items", "modify", "add_items", "modify", "status"]),
          bump=st.integers(0, 2), amount=st.sampled_from([1000, 1500]), force=forces,
          pick=picks, reopen=st.booleans(),
          next_bill=st.sampled_from([True, True, False]))
    def publish(self, actor: Terminal, bill: str, change: str, bump: int, amount: int,
                force: bool, pick: int, reopen: bool, next_bill: bool) -> None:
        oid = self.order_id(bill)
        table = self.table_of[oid]
        base = self.erp.get(oid)
        if (base is not None and base.status != "open" and change != "status" and next_bill
                and self.bills[table][-1] == oid):
            oid = f"{table}-{len(self.bills[table]) + 1}"  # the table's next bill
            self.bills[table].append(oid)
            self.table_of[oid] = table
            base = None
        status = ("open" if reopen else "closed") if change == "status" else "open"
        version = (base.version if base is not None else 0) + bump
        order = make_order(oid, table, version, amount, status)  # type: ignore[arg-type]
        lock = self.known(oid, pick, actor)
        command = Publish(order, change, lock.token if lock else None,  # type: ignore[arg-type]
                          force)
        before = self.records.get(oid)
        ctx = Context(self.now, self.config, actor, dict(self.offline))
        checked = rules.step(before, Check(ACTION_OF_CHANGE[change]), ctx)  # type: ignore[arg-type]
        out = self.step(oid, actor, command)
        if out.refusal is None:
            self.erp[oid] = order
        elif before is not None and before.payment is not None and status == "open":
            self.reached["reopen.refused"] += 1
        # A phone's check of add_items answers for scan-to-order, not for a publish of its own.
        if (before is not None and before.order.status == "open" and before.payment is None
                and actor.role != "h5" and command.token is None and not force
                and version > before.order.version):
            self.compare_check(checked, out)

    @rule(actor=terminals, bill=bills, kind=kinds, force=forces, fetch_ok=st.booleans())
    def acquire(self, actor: Terminal, bill: str, kind: LockKind, force: bool,
                fetch_ok: bool) -> None:
        self.take(actor, self.order_id(bill), kind, force, fetch_ok)

    def take(self, actor: Terminal, oid: str, kind: LockKind, force: bool,
             fetch_ok: bool) -> None:
        before = self.records.get(oid)
        ctx = Context(self.now, self.config, actor, dict(self.offline))
        checked = rules.step(before, Check(ACTION_OF_KIND[kind]), ctx)  # type: ignore[arg-type]
        mine = before is not None and kind in before.locks and (
            same_holder(before.locks[kind].holder, actor))
        out = self.step(oid, actor, Acquire(kind, force=force))
        if before is not None and not force and not mine:
            # (Re-acquiring a held lock returns it even where check would name a conflict.)
            self.compare_check(checked, out)
        if not out.pull_first:
            return
        assert actor.role == "h5" and kind == "payment" and out.result is None
        fetched = self.erp.get(oid)
        if fetch_ok and fetched is not None:
            second = self.step(oid, actor, Acquire(kind, pulled=Pulled(fetched)))
        else:
            second = self.step(oid, actor, Acquire(kind, pulled=Pulled(None)))
            assert second.refusal is not None
            assert second.refusal.code == "ERP_UNAVAILABLE" or second.refusal.code in CONFLICTS
        assert not second.pull_first

    @rule(actor=terminals, bill=bills, kind=st.one_of(st.none(), kinds), pick=picks,
          force=forces)
    def release(self, actor: Terminal, bill: str, kind: LockKind | None, pick: int,
                force: bool) -> None:
        """kind None: the kind of the lock whose token is sent."""
        oid = self.order_id(bill)
        lock = self.known(oid, pick, actor)
        kind = kind or (lock.kind if lock is not None else "order")
        self.step(oid, actor, Release(kind, lock.token if lock else None, force))

    @rule(actor=terminals, bill=bills, kind=st.one_of(st.none(), kinds), pick=st.integers(1, 4))
    def renew(self, actor: Terminal, bill: str, kind: LockKind | None, pick: int) -> None:
        oid = self.order_id(bill)
        lock = self.known(oid, pick, actor)
        if lock is not None:
            self.step(oid, actor, Renew(kind or lock.kind, lock.token))

    @rule(actor=st.sampled_from(PAYERS), bill=bills, pick=picks,
          delta=st.sampled_from([0, 0, -1]), amount_ok=st.booleans(), ref=refs)
    def complete(self, actor: Terminal, bill: str, pick: int, delta: int, amount_ok: bool,
                 ref: str) -> None:
        oid = self.order_id(bill)
        lock = self.known(oid, pick, actor)
        self.pay(actor, oid, lock.token if lock else None, delta, amount_ok, ref)

    @rule(first=st.sampled_from([ERP1, ERP2, MANAGER, H5]), kind=kinds,
          then=st.sampled_from([ERP1, ERP2, MANAGER, H5, H5_SAME_TABLE]),
          attempt=st.sampled_from(["edit", "add_items", "modify", "pay", "presettle"]),
          bill=st.sampled_from(["t1", "t1", "t2"]), force=forces)
    def contend(self, first: Terminal, kind: LockKind, then: Terminal, attempt: str,
                bill: str, force: bool) -> None:
        """The races of SCENARIOS.md: one takes a lock, another tries something at once."""
        oid = self.order_id(bill)
        self.take(first, oid, kind, False, True)
        if attempt in ("add_items", "modify"):
            self.publish(then, bill, attempt, 1, 1000, force, 0, False, False)
        else:
            kind_of = {v: k for k, v in ACTION_OF_KIND.items()}
            self.take(then, oid, kind_of[attempt], force, True)  # type: ignore[arg-type]

    @rule(actor=st.sampled_from(TERMINALS), bill=bills,
          pay_now=st.sampled_from([True, True, False]), by_service=st.booleans(), ref=refs,
          amount_ok=st.sampled_from([True, True, False]),
          then=st.sampled_from(["nothing", "retry", "reopen", "pay again"]))
    def checkout(self, actor: Terminal, bill: str, pay_now: bool, by_service: bool,
                 ref: str, amount_ok: bool, then: str) -> None:
        """The honest flow: take the payment lock, perhaps pay under it at once, and then
        perhaps retry, have the ERP try to reopen the order, or try to pay it again."""
        oid = self.order_id(bill)
        self.take(actor, oid, "payment", False, True)
        rec = self.records.get(oid)
        lock = rec.locks.get("payment") if rec is not None else None
        if not (pay_now and lock is not None and same_holder(lock.holder, actor)):
            return
        # A phone never records its payment: the payment service does, with its token.
        payer = SERVICE if by_service or actor.role == "h5" else actor
        self.pay(payer, oid, lock.token, 0, amount_ok, ref)
        if then == "retry":  # the network dropped the reply: same payment_ref, any token
            self.pay(payer, oid, None, 0, amount_ok, ref)
        elif then == "reopen":
            self.publish(ERP1, bill, "status", 1, 1000, False, 0, True, False)
            self.checkout(ERP2, bill, True, False, "p3", True, "nothing")
        elif then == "pay again":
            self.checkout(ERP2 if actor != ERP2 else ERP1, bill, True, by_service, "p3", True,
                          "nothing")

    def pay(self, actor: Terminal, oid: str, token: int | None, delta: int, amount_ok: bool,
            ref: str) -> None:
        rec = self.records.get(oid)
        version = (rec.order.version if rec is not None else 1) + delta
        amount = (rec.order.amount_cents if rec is not None else 1000) + (0 if amount_ok else 1)
        out = self.step(oid, actor, Complete(token, version, amount, ref))
        if "order.paid" in [e.event for e in out.events]:
            assert out.record is not None
            self.erp[oid] = out.record.order  # the ERP learns of the payment
            assert out.record.order.status == "paid" and out.record.locks == {}
        elif out.refusal is not None and out.refusal.code in REJECTED:
            [entry] = out.audit
            assert entry.kind == "payment.rejected" and entry.handled is False
            assert entry.detail["payment_ref"] == ref and entry.detail["code"] == out.refusal.code

    @rule(actor=st.sampled_from([ERP1, ERP2, MANAGER, H5, H5_OTHER_TABLE, SERVICE]), bill=bills,
          action=st.sampled_from([*ACTIONS, "accept", "accept", "pay"]))
    def check(self, actor: Terminal, bill: str, action: str) -> None:
        out = self.step(self.order_id(bill), actor, Check(action))  # type: ignore[arg-type]
        assert all(e.event in ("lock.expired", "lock.released") for e in out.events)

    # --- presence and time ---------------------------------------------------------------

    @rule(who=st.sampled_from(TERMINALS))
    def presence(self, who: Terminal) -> None:
        """The terminal's last connection closes, or (if it was offline) one comes back."""
        if self.offline.pop(holder_key(who), None) is None:
            self.offline[holder_key(who)] = self.now
        self.tick_all()

    @rule(ms=st.sampled_from([0, 0, 0, 1, 250, 1_000, 2_999, 3_000, 5_000, 10_000, 60_000]),
          bill=bills, early=st.booleans())
    def time_passes(self, ms: int, bill: str, early: bool) -> None:
        """`ms` later; 0 means: exactly at a bill's next deadline, or 1 ms before it."""
        if ms:
            self.now += ms
            self.tick_all()
            return
        rec = self.records.get(self.order_id(bill))
        if rec is None:
            return
        deadline = rules.step(rec, Tick(), Context(self.now, self.config, None,
                                                   dict(self.offline))).deadline
        if deadline is not None and deadline - early > self.now:
            self.now = deadline - early
            self.tick_all()

    @invariant()
    def views_match_records(self) -> None:
        for oid, view in self.views.items():
            view.assert_matches(self.records.get(oid))


SETTINGS = settings(max_examples=200, stateful_step_count=40, derandomize=True, database=None,
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])
MUST_REACH = [
    "order.paid", "payment.retry", "lock.forced", "lock.expired", "lock.released:released",
    "lock.released:upgraded", "lock.released:paid", "lock.released:holder_disconnected",
    "forgotten", "FENCED", "LOCK_EXPIRED", "NOT_HOLDER", "STALE_VERSION", "AMOUNT_MISMATCH",
    "ORDER_PAID", "ORDER_LOCKED", "PAYMENT_LOCKED", "PRESETTLE_LOCKED", "check:ACCEPT_BLOCKED",
    "FORBIDDEN", "NOT_FOUND", "ERP_UNAVAILABLE", "reopen.refused"]


def test_lock_core_invariants_hold_on_random_walks() -> None:
    CoreMachine.reached = Counter()
    run_state_machine_as_test(CoreMachine, settings=SETTINGS)
    # The walk is only worth something if it gets to the interesting places.
    missing = [name for name in MUST_REACH if not CoreMachine.reached[name]]
    assert not missing, (missing, CoreMachine.reached)
