"""Every cell of the lock table of PROTOCOL.md section 2, through `rules.step` only.

Rows are what another party attempts, columns the lock held by someone else.
The expected table is written out here from the spec, not imported from rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tablelock.model import Lock, LockKind, OrderRecord, Terminal, holder_key, holder_of
from tablelock.rules import Acquire, Acquired, Check, Outcome, Publish, Pulled

from .rules_helpers import (
    ERP1,
    ERP2,
    H5,
    MANAGER,
    T0,
    make_lock,
    make_order,
    make_record,
    names,
    step,
)

Expect = tuple[str, bool] | None  # (code, ERP may force) or None: allowed

F = True  # "ERP may force"
SPEC_TABLE: dict[str, dict[LockKind, Expect]] = {
    "edit": {"order": ("ORDER_LOCKED", F), "payment": ("PAYMENT_LOCKED", F),
             "presettle": ("PRESETTLE_LOCKED", F)},
    "add_items": {"order": None, "payment": ("PAYMENT_LOCKED", F),
                  "presettle": ("PRESETTLE_LOCKED", F)},
    "modify": {"order": ("ORDER_LOCKED", F), "payment": ("PAYMENT_LOCKED", F),
               "presettle": ("PRESETTLE_LOCKED", F)},
    "pay": {"order": ("ORDER_LOCKED", F), "payment": ("PAYMENT_LOCKED", F), "presettle": None},
    "presettle": {"order": ("ORDER_LOCKED", F), "payment": ("PAYMENT_LOCKED", F),
                  "presettle": ("PRESETTLE_LOCKED", F)},
    "accept": {"order": None, "payment": ("ACCEPT_BLOCKED", False),
               "presettle": ("ACCEPT_BLOCKED", False)},
}
KIND_OF_ACTION: dict[str, LockKind] = {"edit": "order", "pay": "payment",
                                        "presettle": "presettle"}
PUBLISH_ACTIONS = ("add_items", "modify")
HELD_TOKEN = T0 + 7
VERSION = 3


def held_lock(kind: LockKind) -> Lock:
    """The lock of `kind` held by someone else (ERP2), taken at the order's version."""
    return make_lock(kind, ERP2, HELD_TOKEN, version=VERSION)


def record_with(kind: LockKind) -> OrderRecord:
    return make_record(make_order(version=VERSION, amount_cents=2500), [held_lock(kind)])


def attempt(rec: OrderRecord, action: str, actor: Terminal, force: bool) -> Outcome:
    """The real request behind a row of the table (an h5's ERP pull answered with the order)."""
    if action in KIND_OF_ACTION:
        kind = KIND_OF_ACTION[action]
        out = step(rec, Acquire(kind, force=force), actor)
        if out.pull_first:
            assert actor.role == "h5" and out.refusal is None and not out.events
            out = step(rec, Acquire(kind, force=force, pulled=Pulled(rec.order)), actor)
        return out
    assert action in PUBLISH_ACTIONS
    newer = make_order(version=rec.order.version + 1, amount_cents=3000)
    return step(rec, Publish(newer, action, force=force), actor)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Cell:
    action: str
    held: LockKind
    actor: Terminal
    force: bool

    @property
    def expect(self) -> Expect:
        return SPEC_TABLE[self.action][self.held]

    def __str__(self) -> str:
        return f"{self.action}-vs-{self.held}-by-{self.actor.role}{'-force' if self.force else ''}"


def cells() -> list[Cell]:
    found = []
    for action, row in SPEC_TABLE.items():
        for held in row:
            actors: list[Terminal] = [ERP1]
            if action in KIND_OF_ACTION:
                actors.append(MANAGER)  # a manager may force too (section 2)
            if action == "pay":
                actors.append(H5)
            for actor in actors:
                found.append(Cell(action, held, actor, False))
                if action != "accept":  # accept is only ever a check: nothing to force
                    found.append(Cell(action, held, actor, True))
    return found


ATTEMPTS = [c for c in cells() if c.action != "accept"]
REFUSED = [c for c in ATTEMPTS if not c.force and c.expect is not None]
FORCED = [c for c in ATTEMPTS if c.force and c.actor.role != "h5"]
ALLOWED = [c for c in ATTEMPTS if not c.force and c.expect is None]


def assert_granted(out: Outcome, cell: Cell) -> None:
    assert out.refusal is None, out.refusal
    assert out.result is not None
    if cell.action in KIND_OF_ACTION:
        lock = out.result.lock
        assert isinstance(lock, Lock)
        assert lock.kind == KIND_OF_ACTION[cell.action]
        assert lock.holder == holder_of(cell.actor)
        assert lock.token > HELD_TOKEN
        assert out.record is not None and out.record.locks[lock.kind] == lock
        assert "lock.acquired" in names(out)
    else:
        assert out.record is not None
        assert out.record.order.version == VERSION + 1
        assert "order.updated" in names(out)


@pytest.mark.parametrize("cell", REFUSED, ids=str)
def test_refused_cell(cell: Cell) -> None:
    rec = record_with(cell.held)
    out = attempt(rec, cell.action, cell.actor, cell.force)
    assert cell.expect is not None
    code, erp_may_force = cell.expect
    assert out.refusal is not None, out.result
    assert out.refusal.code == code
    assert out.refusal.can_force is (erp_may_force and cell.actor.role != "h5")
    assert out.refusal.lock == held_lock(cell.held)
    assert out.refusal.variant == ("h5" if code == "PAYMENT_LOCKED" and cell.actor.role == "h5"
                                   else "")
    # Decided before any ERP pull; nothing changed: no event, no lock, the held lock intact.
    assert not out.pull_first
    assert out.events == []
    assert out.record is not None and out.record.locks == rec.locks
    assert out.record.order == rec.order
    # The blocking holder alone is told who tried what.
    [(to, contended)] = out.direct
    assert to == holder_key(ERP2)
    assert contended.event == "lock.contended"
    assert contended.lock == held_lock(cell.held)
    assert contended.by == cell.actor
    assert contended.action == cell.action


@pytest.mark.parametrize("cell", ALLOWED, ids=str)
def test_allowed_cell(cell: Cell) -> None:
    rec = record_with(cell.held)
    out = attempt(rec, cell.action, cell.actor, cell.force)
    assert_granted(out, cell)
    # The lock held by someone else stays, untouched and unannounced.
    assert out.record is not None and out.record.locks[cell.held] == held_lock(cell.held)
    assert "lock.forced" not in names(out)
    assert out.direct == []
    if cell.action == "pay":  # at the presettled version
        assert out.result is not None
        assert out.result.lock.order_version == held_lock("presettle").order_version


@pytest.mark.parametrize("cell", FORCED, ids=str)
def test_forced_cell(cell: Cell) -> None:
    rec = record_with(cell.held)
    out = attempt(rec, cell.action, cell.actor, cell.force)
    assert_granted(out, cell)
    assert out.result is not None and out.record is not None
    revoked = held_lock(cell.held)
    if cell.expect is None:  # allowed anyway: force revokes nothing
        assert "lock.forced" not in names(out)
        assert out.record.locks[cell.held] == revoked
        assert not isinstance(out.result, Acquired) or not out.result.forced
        return
    forced = [e for e in out.events if e.event == "lock.forced"]
    assert len(forced) == 1
    assert forced[0].lock == revoked
    assert forced[0].by == cell.actor
    assert forced[0].notify == holder_key(ERP2)  # the revoked holder is told
    assert forced[0].table_id == "t1"
    assert out.direct == []  # a force is not a contention
    if cell.action in KIND_OF_ACTION:
        assert out.result.forced == [revoked]
        assert out.record.locks.get(cell.held) != revoked  # replaced by the actor's, or gone
        assert names(out).index("lock.forced") < names(out).index("lock.acquired")
    else:
        assert cell.held not in out.record.locks
    audits = [a for a in out.audit if a.kind == "lock.forced"]
    assert len(audits) == 1 and audits[0].detail["token"] == HELD_TOKEN


@pytest.mark.parametrize("cell", [c for c in ATTEMPTS if c.force and c.actor.role == "h5"],
                         ids=str)
def test_h5_force_is_forbidden(cell: Cell) -> None:
    rec = record_with(cell.held)
    out = attempt(rec, cell.action, cell.actor, cell.force)
    assert out.refusal is not None and out.refusal.code == "FORBIDDEN"
    assert not out.refusal.can_force
    assert out.events == [] and out.direct == [] and not out.pull_first
    assert out.record is not None and out.record.locks == rec.locks


CHECKED = [c for c in cells() if not c.force] + [
    Cell("add_items", held, H5, False) for held in ("order", "payment", "presettle")]


@pytest.mark.parametrize("cell", CHECKED, ids=str)
def test_check_answers_like_the_attempt(cell: Cell) -> None:
    rec = record_with(cell.held)
    out = step(rec, Check(cell.action), cell.actor)  # type: ignore[arg-type]
    assert out.refusal is None and out.result is not None
    assert out.events == [] and out.direct == [] and out.audit == []
    assert out.record is not None and out.record.locks == rec.locks
    allowed = out.result.allowed
    # Against the spec's table ...
    if cell.expect is None:
        assert allowed is True
    else:
        assert allowed is False
        refusal = out.result.refusal
        assert refusal.code == cell.expect[0]
        assert refusal.can_force is (cell.expect[1] and cell.actor.role != "h5")
        assert refusal.lock == held_lock(cell.held)
        if cell.action == "accept":
            assert refusal.variant == ("presettle" if cell.held == "presettle" else "")
    # ... and against the real request, where there is one.
    if cell.action == "accept" or (cell.action == "add_items" and cell.actor.role == "h5"):
        return
    real = attempt(rec, cell.action, cell.actor, force=False)
    assert allowed is (real.refusal is None)
    if real.refusal is not None:
        refusal = out.result.refusal
        assert (refusal.code, refusal.can_force, refusal.lock, refusal.variant) == (
            real.refusal.code, real.refusal.can_force, real.refusal.lock, real.refusal.variant)


def test_table_covers_every_cell() -> None:
    rows = {c.action for c in cells()}
    assert rows == set(SPEC_TABLE)
    assert {(c.action, c.held) for c in REFUSED + ALLOWED} | {
        (c.action, c.held) for c in CHECKED} == {
        (a, k) for a, row in SPEC_TABLE.items() for k in row}


@pytest.mark.parametrize("action", list(SPEC_TABLE), ids=str)
def test_payment_column_when_a_phone_holds_the_lock(action: str) -> None:
    """The payment column reads the same whoever holds the lock (here a customer's phone)."""
    phone_lock = make_lock("payment", H5, HELD_TOKEN, version=VERSION)
    rec = make_record(make_order(version=VERSION, amount_cents=2500), [phone_lock])
    expect = SPEC_TABLE[action]["payment"]
    assert expect is not None
    checked = step(rec, Check(action), ERP1)  # type: ignore[arg-type]
    assert checked.result is not None and checked.result.allowed is False
    assert checked.result.refusal.code == expect[0]
    assert checked.result.refusal.can_force is expect[1]
    assert checked.result.refusal.lock == phone_lock
    if action == "accept":
        return
    out = attempt(rec, action, ERP1, force=False)
    assert out.refusal is not None and out.refusal.code == expect[0]
    assert [to for to, _ in out.direct] == [holder_key(H5)]
    forced = attempt(rec, action, ERP1, force=True)
    assert forced.refusal is None
    assert [e.notify for e in forced.events if e.event == "lock.forced"] == [holder_key(H5)]
