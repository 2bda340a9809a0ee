"""The refusal codes and the other lock rules of PROTOCOL.md section 2, on `rules.step`."""

from __future__ import annotations

from typing import Any

import pytest

from tablelock.model import CONFIG_RANGES, Lock, StoreConfig, Terminal, holder_key, holder_of
from tablelock.rules import (
    Acquire,
    Acquired,
    Check,
    Checked,
    Complete,
    ConfigError,
    Ingest,
    Publish,
    Published,
    Pulled,
    Release,
    ReleaseAll,
    Renew,
    Renewed,
    Tick,
    patch_config,
)

from .rules_helpers import (
    CONFIG,
    ERP1,
    ERP2,
    ERP_TTL,
    GRACE,
    H5,
    H5_AS_TILL,
    H5_OTHER_TABLE,
    H5_SAME_TABLE,
    H5_TTL,
    MANAGER,
    SERVICE,
    T0,
    Sim,
    View,
    make_lock,
    make_order,
    make_record,
    names,
    only,
    refusal_code,
    step,
)

LOOSE = StoreConfig(strong_link=False)


def open_order(version: int = 1, amount_cents: int = 1000) -> Sim:
    sim = Sim()
    out = sim.publish(ERP1, version=version, amount_cents=amount_cents)
    assert out.refusal is None
    return sim


def paid_order() -> tuple[Sim, Lock]:
    sim = open_order()
    lock = sim.grant(ERP1, "payment")
    out = sim.step(ERP1, Complete(lock.token, 1, 1000, "pay-1"))
    assert out.refusal is None and sim.order.status == "paid"
    return sim, lock


def assert_refused(out: Any, code: str, *, unchanged: Any = None) -> None:
    assert refusal_code(out) == code, (out.refusal, out.result)
    assert out.events == []
    assert out.result is None
    if unchanged is not None:
        assert out.record == unchanged


# --- FORBIDDEN -------------------------------------------------------------------

def test_h5_force_is_forbidden_even_with_nothing_held() -> None:
    sim = open_order()
    before = sim.record
    assert_refused(sim.step(H5, Acquire("payment", force=True)), "FORBIDDEN", unchanged=before)
    lock = sim.grant(H5, "payment")
    out = sim.step(H5, Release("payment", lock.token, force=True))
    assert_refused(out, "FORBIDDEN")
    assert sim.record is not None and sim.record.locks["payment"] == lock


@pytest.mark.parametrize("kind", ["order", "presettle"])
def test_h5_takes_only_payment_locks(kind: Any) -> None:
    sim = open_order()
    before = sim.record
    assert_refused(sim.step(H5, Acquire(kind)), "FORBIDDEN", unchanged=before)
    assert_refused(sim.step(H5, Release(kind)), "FORBIDDEN")


@pytest.mark.parametrize("action,allowed", [
    ("edit", False), ("modify", False), ("presettle", False), ("accept", False),
    ("add_items", True), ("pay", True)])
def test_h5_check_answers_forbidden_for_erp_actions(action: Any, allowed: bool) -> None:
    sim = open_order()
    out = sim.step(H5, Check(action))
    assert out.result is not None and out.result.allowed is allowed
    if not allowed:
        assert out.result.refusal.code == "FORBIDDEN"
        assert out.result.refusal.can_force is False


def test_h5_may_not_publish_or_renew() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    order = make_order(version=2)
    assert_refused(sim.step(H5, Publish(order, "add_items")), "FORBIDDEN")
    assert_refused(sim.step(H5, Renew("payment", lock.token)), "FORBIDDEN")
    assert sim.record is not None and sim.record.locks["payment"] == lock  # not renewed


def test_h5_of_another_table_touches_nothing() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    before = sim.record
    assert_refused(sim.step(H5_OTHER_TABLE, Acquire("payment")), "FORBIDDEN", unchanged=before)
    assert_refused(sim.step(H5_OTHER_TABLE, Release("payment", lock.token)), "FORBIDDEN",
                   unchanged=before)
    out = sim.step(H5_OTHER_TABLE, Complete(lock.token, 1, 1000, "x"))
    assert_refused(out, "FORBIDDEN", unchanged=before)
    out = sim.step(H5_OTHER_TABLE, Check("pay"))
    assert out.result is not None and out.result.refusal.code == "FORBIDDEN"
    assert out.direct == []  # not even a contention reaches the holder


def test_h5_of_another_table_is_forbidden_after_the_erp_pull() -> None:
    """The pull decides again on the fresh order: an order of another table is FORBIDDEN."""
    first = step(None, Acquire("payment"), H5_OTHER_TABLE)
    assert first.pull_first and first.refusal is None and first.record is None
    out = step(None, Acquire("payment", pulled=Pulled(make_order(table_id="t1"))), H5_OTHER_TABLE)
    assert refusal_code(out) == "FORBIDDEN"
    assert out.record is not None and out.record.locks == {}  # the pulled order is stored
    assert names(out) == ["order.updated"]


@pytest.mark.parametrize("command", [
    Acquire("payment"), Acquire("order"), Release("payment"), Renew("order", 1),
    Publish(make_order(version=2), "modify")], ids=repr)
def test_service_takes_no_locks_and_publishes_nothing(command: Any) -> None:
    sim = open_order()
    assert_refused(sim.step(SERVICE, command), "FORBIDDEN")


def test_service_check_is_forbidden() -> None:
    sim = open_order()
    out = sim.step(SERVICE, Check("pay"))
    assert out.result is not None and out.result.refusal.code == "FORBIDDEN"


def test_manager_may_not_publish() -> None:
    sim = open_order()
    assert_refused(sim.publish(MANAGER, version=2, change="add_items"), "FORBIDDEN")


@pytest.mark.parametrize("action", ["add_items", "modify"])
def test_manager_check_agrees_with_manager_publish(action: str) -> None:
    """For an action its role may never take, check answers FORBIDDEN."""
    sim = open_order()
    real = sim.publish(MANAGER, version=2, change=action)
    assert refusal_code(real) == "FORBIDDEN"
    checked = sim.step(MANAGER, Check(action))  # type: ignore[arg-type]
    assert checked.result is not None and checked.result.allowed is False
    assert checked.result.refusal.code == "FORBIDDEN"


# --- NOT_FOUND ---------------------------------------------------------------------

@pytest.mark.parametrize("actor,command", [
    (ERP1, Acquire("order")), (ERP1, Acquire("payment")), (MANAGER, Acquire("presettle")),
    (ERP1, Release("order")), (ERP2, Release("payment", T0 + 1)),
    (MANAGER, Release("order", force=True)), (ERP1, Renew("order", T0 + 1)),
    (SERVICE, Complete(T0 + 1, 1, 1000, "p")), (ERP1, Complete(T0 + 1, 1, 1000, "p")),
    (None, Complete(T0 + 1, 1, 1000, "p")),
], ids=lambda v: getattr(v, "role", None) or type(v).__name__)
def test_unknown_order_is_not_found(actor: Terminal | None, command: Any) -> None:
    out = step(None, command, actor)
    assert refusal_code(out) == "NOT_FOUND"
    assert out.record is None and out.events == [] and not out.pull_first


@pytest.mark.parametrize("actor", [ERP1, ERP2, MANAGER, H5, H5_OTHER_TABLE, SERVICE],
                         ids=lambda t: t.terminal_id)
@pytest.mark.parametrize("action", ["edit", "pay", "accept", "add_items"])
def test_check_of_an_unknown_order_is_not_found_from_any_role(actor: Terminal,
                                                               action: Any) -> None:
    out = step(None, Check(action), actor)
    assert refusal_code(out) == "NOT_FOUND"
    assert out.record is None


def test_first_publish_creates_the_order() -> None:
    out = step(None, Publish(make_order(version=5), "add_items"), ERP2)
    assert out.refusal is None and out.result == Published(make_order(version=5))
    assert out.record is not None and out.record.order == make_order(version=5)
    assert out.record.fence >= T0
    assert names(out) == ["order.updated"]
    assert out.changed


# --- ORDER_PAID --------------------------------------------------------------------

@pytest.mark.parametrize("actor,command", [
    (ERP1, Acquire("order")), (ERP1, Acquire("payment")), (ERP2, Acquire("presettle")),
    (MANAGER, Acquire("order", force=True)), (H5, Acquire("payment")),
    (ERP1, Release("payment")), (ERP1, Release("payment", force=True)),
    (ERP1, Renew("payment", T0 + 1)),
    (ERP1, Publish(make_order(version=2), "add_items")),
    (ERP1, Publish(make_order(version=2), "modify")),
    (ERP2, Publish(make_order(version=2), "modify", force=True)),
], ids=lambda v: getattr(v, "terminal_id", None) or repr(v))
def test_paid_order_refuses_changes(actor: Terminal, command: Any) -> None:
    sim, _ = paid_order()
    before = sim.record
    out = sim.step(actor, command)
    assert_refused(out, "ORDER_PAID", unchanged=before)
    assert not out.pull_first


@pytest.mark.parametrize("action", ["edit", "add_items", "modify", "pay", "presettle", "accept"])
@pytest.mark.parametrize("actor", [ERP1, ERP2, MANAGER], ids=lambda t: t.role)
def test_check_on_a_paid_order(actor: Terminal, action: Any) -> None:
    sim, _ = paid_order()
    out = sim.step(actor, Check(action))
    assert out.refusal is None and out.result is not None
    assert out.result.allowed is False
    # FORBIDDEN first: a manager never publishes nor accepts (it takes locks).
    forbidden = actor.role == "manager" and action in ("add_items", "modify", "accept")
    assert out.result.refusal.code == ("FORBIDDEN" if forbidden else "ORDER_PAID")


def test_check_on_a_paid_order_from_h5() -> None:
    sim, _ = paid_order()
    pay = sim.step(H5, Check("pay"))
    assert pay.result is not None and pay.result.refusal.code == "ORDER_PAID"
    edit = sim.step(H5, Check("edit"))  # FORBIDDEN comes first
    assert edit.result is not None and edit.result.refusal.code == "FORBIDDEN"


def test_status_publish_closes_a_paid_order() -> None:
    sim, _ = paid_order()
    assert refusal_code(sim.publish(ERP1, version=1, change="status", status="closed")) == \
        "STALE_VERSION"
    out = sim.publish(ERP1, version=2, change="status", status="closed")
    assert out.refusal is None
    assert sim.order.status == "closed" and sim.order.version == 2
    assert names(out) == ["order.updated"]


def test_paid_order_cannot_be_reopened_into_a_second_payment() -> None:
    """Regression: change:status with status open reopened a paid order."""
    sim, _ = paid_order()
    reopen = sim.publish(ERP1, version=2, change="status", status="open")
    assert refusal_code(reopen) == "ORDER_PAID"
    second = sim.acquire(ERP2, "payment")
    token = second.result.lock.token if second.result and second.result.lock else None
    out = sim.step(ERP2, Complete(token, 2, 1000, "pay-2"))
    assert refusal_code(out) == "ORDER_PAID"
    assert sim.record is not None and sim.record.payment is not None
    assert sim.record.payment.payment_ref == "pay-1"


def test_paid_then_closed_order_cannot_be_paid_again() -> None:
    """Regression: a modify publish reopened a paid-then-closed order."""
    sim, _ = paid_order()
    assert sim.publish(ERP1, version=2, change="status", status="closed").refusal is None
    assert refusal_code(sim.publish(ERP1, version=3, change="modify")) == "ORDER_PAID"
    second = sim.acquire(ERP2, "payment")
    token = second.result.lock.token if second.result and second.result.lock else None
    out = sim.step(ERP2, Complete(token, 3, 1000, "pay-2"))
    assert refusal_code(out) == "ORDER_PAID"
    assert sim.step(ERP1, Complete(None, 1, 1000, "pay-1")).refusal is None  # still the retry


def test_closed_unpaid_order_may_be_reopened_by_the_erp() -> None:
    """Only a paid order is final: an order closed unpaid reopens with a newer version."""
    sim = open_order()
    assert sim.publish(ERP1, version=2, change="status", status="closed").refusal is None
    out = sim.publish(ERP1, version=3, change="modify")
    assert out.refusal is None and sim.order.status == "open"
    assert sim.record is not None and sim.record.ended_at is None
    assert sim.grant(ERP2, "payment").order_version == 3


# --- refusal precedence --------------------------------------------------------------

def test_forbidden_before_not_found() -> None:
    assert refusal_code(step(None, Acquire("order"), H5)) == "FORBIDDEN"
    assert refusal_code(step(None, Acquire("payment", force=True), H5)) == "FORBIDDEN"
    assert refusal_code(step(None, Acquire("payment"), SERVICE)) == "FORBIDDEN"
    assert refusal_code(step(None, Release("payment", force=True), H5)) == "FORBIDDEN"
    assert refusal_code(step(None, Renew("order", 5), H5)) == "FORBIDDEN"
    assert refusal_code(step(None, Publish(make_order(), "modify"), MANAGER)) == "FORBIDDEN"


def test_forbidden_before_order_paid() -> None:
    sim, _ = paid_order()
    assert refusal_code(sim.step(H5, Acquire("payment", force=True))) == "FORBIDDEN"
    assert refusal_code(sim.step(H5_OTHER_TABLE, Acquire("payment"))) == "FORBIDDEN"
    assert refusal_code(sim.step(H5_OTHER_TABLE, Complete(1, 1, 1000, "pay-1"))) == "FORBIDDEN"
    assert refusal_code(sim.step(H5, Acquire("order"))) == "FORBIDDEN"


def test_order_paid_before_token_checks() -> None:
    sim = open_order()
    old = sim.grant(ERP1, "payment")
    sim.step(ERP1, Release("payment", old.token))
    lock = sim.grant(ERP2, "payment")
    assert sim.step(ERP2, Complete(lock.token, 1, 1000, "pay-1")).refusal is None
    for actor, command in [
            (ERP1, Complete(old.token, 0, 5, "late")),
            (ERP1, Release("payment", old.token)),
            (ERP2, Renew("payment", lock.token)),
            (ERP1, Publish(make_order(version=1), "modify", token=old.token))]:
        assert refusal_code(sim.step(actor, command)) == "ORDER_PAID", command


def test_token_before_version_before_amount() -> None:
    sim = open_order(version=4, amount_cents=1200)
    lock = sim.grant(H5, "payment")
    sim.now += H5_TTL  # the phone's lock lapses
    expired = sim.step(SERVICE, Complete(lock.token, 3, 1, "a"))
    assert refusal_code(expired) == "LOCK_EXPIRED"
    fresh = sim.grant(H5_SAME_TABLE, "payment")
    assert refusal_code(sim.step(SERVICE, Complete(lock.token, 3, 1, "b"))) == "FENCED"
    assert refusal_code(sim.step(SERVICE, Complete(fresh.token, 3, 1, "c"))) == "STALE_VERSION"
    assert refusal_code(sim.step(SERVICE, Complete(fresh.token, 4, 1, "d"))) == \
        "AMOUNT_MISMATCH"
    assert sim.step(SERVICE, Complete(fresh.token, 4, 1200, "e")).refusal is None


def test_publish_token_before_version_before_conflict() -> None:
    sim = open_order(version=2)
    mine = sim.grant(ERP1, "order")
    sim.step(ERP1, Release("order", mine.token))
    held = sim.grant(ERP2, "presettle")
    stale = make_order(version=2)
    out = sim.step(ERP1, Publish(stale, "modify", token=mine.token))
    assert refusal_code(out) == "FENCED"
    out = sim.step(ERP1, Publish(stale, "modify"))
    assert refusal_code(out) == "STALE_VERSION" and out.direct == []
    out = sim.step(ERP1, Publish(make_order(version=3), "modify"))
    assert refusal_code(out) == "PRESETTLE_LOCKED" and out.refusal is not None
    assert out.refusal.lock == held


def test_conflicts_name_payment_then_presettle_then_order() -> None:
    order_lock = make_lock("order", ERP2, T0 + 1)
    presettle = make_lock("presettle", MANAGER, T0 + 2)
    payment = make_lock("payment", H5, T0 + 3)
    rec = make_record(make_order(), [order_lock, presettle, payment])
    for locks, blocking in [((order_lock, presettle, payment), payment),
                            ((order_lock, presettle), presettle), ((order_lock,), order_lock)]:
        rec = make_record(make_order(), locks)
        out = step(rec, Acquire("order"), ERP1)
        assert out.refusal is not None and out.refusal.lock == blocking
        assert out.refusal.code == f"{blocking.kind.upper()}_LOCKED"
        checked = step(rec, Check("edit"), ERP1)
        assert checked.result is not None and checked.result.refusal.lock == blocking
    accept = step(make_record(make_order(), [presettle, payment]), Check("accept"), ERP1)
    assert accept.result is not None
    assert (accept.result.refusal.code, accept.result.refusal.variant) == (
        "ACCEPT_BLOCKED", "")
    assert accept.result.refusal.lock == payment
    accept = step(make_record(make_order(), [order_lock, presettle]), Check("accept"), ERP1)
    assert accept.result is not None
    assert accept.result.refusal.variant == "presettle"
    assert accept.result.refusal.lock == presettle


def test_force_revokes_every_conflicting_lock() -> None:
    locks = [make_lock("order", ERP2, T0 + 1), make_lock("presettle", MANAGER, T0 + 2),
             make_lock("payment", H5, T0 + 3)]
    rec = make_record(make_order(), locks)
    out = step(rec, Acquire("order", force=True, operator="boss", reason="stuck"), ERP1)
    assert out.result is not None
    assert [lock.kind for lock in out.result.forced] == ["payment", "presettle", "order"]
    assert names(out) == ["lock.forced"] * 3 + ["lock.acquired"]
    assert [e.notify for e in out.events[:3]] == [holder_key(t) for t in (H5, MANAGER, ERP2)]
    assert out.record is not None and list(out.record.locks) == ["order"]
    audits = [a for a in out.audit if a.kind == "lock.forced"]
    assert [a.detail["operator"] for a in audits] == ["boss"] * 3
    assert [a.detail["reason"] for a in audits] == ["stuck"] * 3


def test_conflict_before_erp_unavailable() -> None:
    sim = open_order()
    held = sim.grant(ERP1, "order")
    out = sim.step(H5, Acquire("payment", pulled=Pulled(None)))
    assert refusal_code(out) == "ORDER_LOCKED" and out.refusal is not None
    assert out.refusal.lock == held and out.refusal.can_force is False
    sim.step(ERP1, Release("order", held.token))
    out = sim.step(H5, Acquire("payment", pulled=Pulled(None)))
    assert refusal_code(out) == "ERP_UNAVAILABLE"
    assert sim.record is not None and sim.record.locks == {}


# --- LOCK_EXPIRED, FENCED, NOT_HOLDER on release / renew / complete ---------------------

def test_lapsed_erp_lock_token_is_lock_expired_until_the_kind_is_taken_again() -> None:
    sim = open_order()
    lock = sim.grant(ERP1, "order")
    sim.now = lock.expires_at
    assert refusal_code(sim.step(ERP1, Renew("order", lock.token))) == "LOCK_EXPIRED"
    assert refusal_code(sim.step(ERP1, Release("order", lock.token))) == "LOCK_EXPIRED"
    sim.grant(ERP2, "presettle")  # another kind does not matter
    assert refusal_code(sim.step(ERP1, Release("order", lock.token))) == "LOCK_EXPIRED"
    sim.grant(ERP2, "order")
    assert refusal_code(sim.step(ERP1, Release("order", lock.token))) == "FENCED"
    assert refusal_code(sim.step(ERP1, Renew("order", lock.token))) == "FENCED"


def test_forced_holder_is_fenced() -> None:
    sim = open_order()
    a = sim.grant(ERP1, "payment")
    b = sim.grant(ERP2, "payment", force=True)
    assert refusal_code(sim.step(ERP1, Complete(a.token, 1, 1000, "late"))) == "FENCED"
    assert refusal_code(sim.step(ERP1, Release("payment", a.token))) == "FENCED"
    assert refusal_code(sim.step(ERP1, Renew("payment", a.token))) == "FENCED"
    assert refusal_code(sim.step(ERP1, Release("payment", 12345))) == "FENCED"
    assert sim.step(ERP2, Complete(b.token, 1, 1000, "ok")).refusal is None


def test_not_holder() -> None:
    sim = open_order()
    lock = sim.grant(ERP1, "order")
    before = sim.record
    for actor, command in [
            (ERP2, Release("order")),  # without a token
            (ERP2, Release("order", lock.token)),  # the current token of a lock it does not hold
            (ERP2, Renew("order", lock.token)),
            (MANAGER, Renew("order", lock.token)),
            (ERP1, Release("presettle")),  # no lock of that kind
            (ERP1, Release("presettle", force=True)),
            (ERP2, Release("payment", force=True))]:
        assert_refused(sim.step(actor, command), "NOT_HOLDER", unchanged=before)


def test_payment_complete_by_a_non_holder_terminal_is_refused() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    out = sim.step(ERP1, Complete(lock.token, 1, 1000, "p"))
    assert refusal_code(out) == "NOT_HOLDER"
    assert sim.order.status == "open"


@pytest.mark.parametrize("config", [CONFIG, LOOSE], ids=["strong", "loose"])
def test_a_phone_never_records_a_payment(config: StoreConfig) -> None:
    sim = Sim(config=config)
    sim.publish(ERP1)
    out = sim.acquire(H5, "payment")
    token = out.result.lock.token if out.result and out.result.lock else None
    before = sim.record
    for attempt in (Complete(token, 1, 1000, "wx-1"), Complete(token, 9, 1, "forged")):
        out = sim.step(H5, attempt)
        assert refusal_code(out) == "FORBIDDEN"
        assert out.audit == [] and out.events == [] and sim.record == before
    # Unknown order: FORBIDDEN first, not NOT_FOUND (nothing is read for a phone).
    assert refusal_code(step(None, Complete(token, 1, 1000, "x"), H5)) == "FORBIDDEN"
    assert sim.step(SERVICE, Complete(token, 1, 1000, "wx-1")).refusal is None


def test_a_phone_with_a_tills_sub_is_not_the_till() -> None:
    sim = open_order()
    order_lock = sim.grant(ERP1, "order")
    assert refusal_code(sim.step(H5_AS_TILL, Release("payment"))) == "NOT_HOLDER"
    assert refusal_code(sim.step(H5_AS_TILL, Release("payment", order_lock.token))) == "FENCED"
    # Its pay is blocked by the till's order lock (no `upgraded` takeover), and the till hears.
    out = sim.acquire(H5_AS_TILL, "payment")
    assert refusal_code(out) == "ORDER_LOCKED"
    assert [to for to, _ in out.direct] == [holder_key(ERP1)]
    assert sim.record is not None and sim.record.locks == {"order": order_lock}
    # The till's own payment lock is not the phone's either.
    sim.step(ERP1, Release("order", order_lock.token))
    pay = sim.grant(ERP1, "payment")
    assert refusal_code(sim.acquire(H5_AS_TILL, "payment")) == "PAYMENT_LOCKED"
    assert refusal_code(sim.step(H5_AS_TILL, Release("payment", pay.token))) == "NOT_HOLDER"
    assert refusal_code(sim.step(H5_AS_TILL, Complete(pay.token, 1, 1000, "p"))) == "FORBIDDEN"
    assert sim.record is not None and sim.record.locks == {"payment": pay}


def test_service_completes_with_the_current_token() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    assert refusal_code(sim.step(SERVICE, Complete(None, 1, 1000, "p0"))) == "FENCED"
    out = sim.step(SERVICE, Complete(lock.token, 1, 1000, "p1"))
    assert out.refusal is None and sim.order.status == "paid"
    assert out.result is not None and out.result.payment.by == SERVICE


def test_release_and_renew_by_the_holder() -> None:
    sim = open_order()
    lock = sim.grant(ERP1, "order")
    sim.now += 1000
    renewed = sim.step(ERP1, Renew("order", lock.token))
    assert renewed.refusal is None and renewed.events == []
    assert renewed.result is not None
    assert renewed.result.lock == Lock(**{**_fields(lock), "expires_at": sim.now + ERP_TTL})
    out = sim.step(ERP1, Release("order"))  # the holder may omit the token
    assert out.refusal is None and names(out) == ["lock.released"]
    assert out.events[0].reason == "released"
    assert sim.record is not None and sim.record.locks == {}


def test_forced_release_is_lock_forced() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    out = sim.step(MANAGER, Release("payment", force=True, operator="ann", reason="walked out"))
    assert out.refusal is None
    event = only(out, "lock.forced")
    assert event.lock == lock and event.by == MANAGER and event.notify == holder_key(H5)
    assert out.audit[0].detail["operator"] == "ann"


def _fields(lock: Lock) -> dict[str, Any]:
    return {name: getattr(lock, name) for name in lock.__struct_fields__}


# --- STALE_VERSION and AMOUNT_MISMATCH -------------------------------------------------

def test_equal_versions_first_publish_wins() -> None:
    sim = open_order()
    first = make_order(version=2, amount_cents=1500)
    second = make_order(version=2, amount_cents=9900)
    assert sim.step(ERP1, Publish(first, "add_items")).refusal is None
    out = sim.step(ERP2, Publish(second, "add_items"))
    assert_refused(out, "STALE_VERSION")
    assert sim.order == first
    assert_refused(sim.publish(ERP2, version=1, change="modify"), "STALE_VERSION")
    assert sim.order == first


def test_add_items_under_someone_elses_order_lock_grows_the_version() -> None:
    sim = open_order()
    sim.grant(ERP2, "order")
    out = sim.publish(ERP1, version=2, amount_cents=1800, change="add_items")
    assert out.refusal is None and sim.order.version == 2
    assert refusal_code(sim.publish(ERP1, version=2, change="add_items")) == "STALE_VERSION"


@pytest.mark.parametrize("version,amount,code", [
    (0, 1000, "STALE_VERSION"), (2, 1000, "STALE_VERSION"), (2, 999, "STALE_VERSION"),
    (1, 999, "AMOUNT_MISMATCH"), (1, 1001, "AMOUNT_MISMATCH")])
def test_payment_version_and_amount(version: int, amount: int, code: str) -> None:
    sim = open_order()
    lock = sim.grant(ERP1, "payment")
    out = sim.step(ERP1, Complete(lock.token, version, amount, "ref-9"))
    assert_refused(out, code)
    assert sim.order.status == "open"
    [entry] = out.audit
    assert entry.kind == "payment.rejected" and entry.handled is False
    assert entry.order_id == "o1"
    assert entry.detail["code"] == code
    assert entry.detail["payment_ref"] == "ref-9"
    assert entry.detail["amount_cents"] == amount
    assert entry.detail["version"] == version


@pytest.mark.parametrize("make", ["lapsed", "fenced", "paid"])
def test_every_refused_payment_is_audited(make: str) -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    if make == "lapsed":
        sim.now = lock.expires_at
        code = "LOCK_EXPIRED"
    elif make == "fenced":
        sim.grant(ERP1, "payment", force=True)
        code = "FENCED"
    else:
        assert sim.step(SERVICE, Complete(lock.token, 1, 1000, "first")).refusal is None
        code = "ORDER_PAID"
    out = sim.step(SERVICE, Complete(lock.token, 1, 1000, "second"))
    assert refusal_code(out) == code
    rejected = [a for a in out.audit if a.kind == "payment.rejected"]
    assert len(rejected) == 1
    assert rejected[0].handled is False
    assert {k: rejected[0].detail[k] for k in ("payment_ref", "code", "amount_cents",
                                                  "version")} == {
        "payment_ref": "second", "code": code, "amount_cents": 1000, "version": 1}
    assert rejected[0].terminal == holder_of(SERVICE)


# --- re-acquire, upgrade, presettle ------------------------------------------------------

def test_erp_reacquire_renews_silently() -> None:
    sim = open_order()
    lock = sim.grant(ERP1, "order")
    sim.now += 5000
    out = sim.acquire(ERP1, "order")
    assert out.refusal is None and out.events == [] and out.direct == []
    assert out.result is not None
    again = out.result.lock
    assert again.token == lock.token and again.acquired_at == lock.acquired_at
    assert again.expires_at == sim.now + ERP_TTL
    assert sim.record is not None and sim.record.locks["order"] == again
    assert sim.record.fence == lock.token


def test_h5_reacquire_returns_the_lock_unrenewed() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    sim.now += 5000
    out = sim.acquire(H5, "payment")
    assert out.refusal is None and out.events == [] and not out.pull_first
    assert out.result is not None and out.result.lock == lock
    sim.now = lock.expires_at
    assert only(sim.step(None, Tick()), "lock.expired").lock == lock


def test_reacquiring_a_held_lock_returns_it_whatever_else_is_held() -> None:
    """Own locks never block: the presettle holder gets its lock back under a payment lock.

    (check "presettle" names the payment lock in this state: see the report's ambiguities.)
    """
    sim = open_order()
    presettle = sim.grant(ERP2, "presettle")
    sim.grant(H5, "payment")
    out = sim.acquire(ERP2, "presettle")
    assert out.refusal is None and out.events == [] and out.direct == []
    assert out.result is not None and out.result.lock.token == presettle.token


def test_closed_order_takes_no_lock() -> None:
    sim = open_order()
    sim.grant(ERP1, "order")
    out = sim.publish(ERP1, version=2, change="status", status="closed")
    assert names(out) == ["order.updated", "lock.released"]
    assert out.events[1].reason == "released"
    assert sim.record is not None and sim.record.ended_at == T0
    assert refusal_code(sim.acquire(ERP2, "order")) == "ORDER_PAID"
    assert refusal_code(sim.acquire(H5, "payment")) == "ORDER_PAID"


def test_order_lock_holder_upgrades_to_payment() -> None:
    sim = open_order()
    order_lock = sim.grant(ERP1, "order")
    out = sim.acquire(ERP1, "payment")
    assert out.refusal is None and out.result is not None
    assert names(out) == ["lock.released", "lock.acquired"]
    assert out.events[0].lock == order_lock and out.events[0].reason == "upgraded"
    assert out.result.released == [order_lock]
    assert out.result.lock.token > order_lock.token
    assert sim.record is not None and list(sim.record.locks) == ["payment"]


def test_payment_while_presettle_is_held_keeps_it_until_paid() -> None:
    sim = open_order(version=3, amount_cents=4200)
    presettle = sim.grant(ERP2, "presettle")
    payment = sim.grant(H5, "payment")
    assert payment.order_version == presettle.order_version == 3
    assert sim.record is not None and sim.record.locks["presettle"] == presettle
    assert refusal_code(sim.publish(ERP1, version=4, change="add_items")) == "PAYMENT_LOCKED"
    out = sim.step(SERVICE, Complete(payment.token, 3, 4200, "wx-1"))
    assert out.refusal is None
    assert names(out) == ["order.paid", "lock.released", "lock.released"]
    assert {e.lock.kind for e in out.events[1:] if e.lock} == {"payment", "presettle"}
    assert {e.reason for e in out.events[1:]} == {"paid"}
    assert sim.record is not None and sim.record.locks == {}


def test_h5_payment_under_presettle_is_at_the_presettled_version_after_the_pull() -> None:
    sim = open_order(version=1, amount_cents=1000)
    presettle = sim.grant(ERP2, "presettle")
    assert sim.step(H5, Acquire("payment")).pull_first
    pulled = make_order(version=2, amount_cents=5000)  # the ERP's copy moved on unpublished
    out = sim.step(H5, Acquire("payment", pulled=Pulled(pulled)))
    assert out.refusal is None or out.refusal.code == "PRESETTLE_LOCKED"
    if out.refusal is None:
        assert out.result is not None
        assert out.result.lock.order_version == presettle.order_version


# --- payment.complete ---------------------------------------------------------------

def test_payment_complete_success_and_idempotent_retry() -> None:
    sim = open_order(version=2, amount_cents=3100)
    sim.grant(ERP2, "order")
    assert refusal_code(sim.acquire(H5, "payment")) == "ORDER_LOCKED"
    sim.step(ERP2, Release("order"))
    lock = sim.grant(H5, "payment")
    sim.now += 100
    out = sim.step(SERVICE, Complete(lock.token, 2, 3100, "wx-42"))
    assert out.refusal is None and out.result is not None
    paid = only(out, "order.paid")
    assert paid.order is not None and paid.order.status == "paid" and paid.order.version == 2
    assert paid.payment is not None
    assert (paid.payment.token, paid.payment.amount_cents, paid.payment.payment_ref) == (
        lock.token, 3100, "wx-42")
    assert paid.payment.by == SERVICE
    released = only(out, "lock.released")
    assert released.lock == lock and released.reason == "paid"
    assert out.result.order.status == "paid"
    assert sim.record is not None and sim.record.ended_at == sim.now
    assert [a.kind for a in out.audit] == ["lock.released", "payment.completed"]
    assert out.deadline == sim.now + CONFIG.order_retention_ms

    # A retry by payment_ref, whatever its token, gets the same success and changes nothing.
    before = sim.record
    for token in (lock.token, None, 999):
        retry = sim.step(SERVICE, Complete(token, 2, 3100, "wx-42"))
        assert retry.refusal is None and retry.result == out.result
        assert retry.events == [] and retry.audit == [] and retry.record == before
    # Anything else is a second payment.
    second = sim.step(ERP1, Complete(lock.token, 2, 3100, "cash-1"))
    assert_refused(second, "ORDER_PAID")
    assert [a.kind for a in second.audit] == ["payment.rejected"]
    assert sim.record is not None and sim.record.payment is not None
    assert sim.record.payment.payment_ref == "wx-42"


# --- TTLs, renewals and presence -----------------------------------------------------

def test_h5_lock_expires_exactly_at_its_ttl() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    assert lock.expires_at == T0 + H5_TTL
    assert sim.outcomes[-1].deadline == lock.expires_at
    sim.now = lock.expires_at - 1
    out = sim.step(None, Tick())
    assert out.events == [] and not out.changed
    assert sim.record is not None and sim.record.locks == {"payment": lock}
    sim.now = lock.expires_at
    out = sim.step(None, Tick())
    expired = only(out, "lock.expired")
    assert expired.lock == lock and expired.notify == holder_key(H5) and expired.table_id == "t1"
    assert out.deadline is None and sim.record is not None and sim.record.locks == {}
    # The lapsed token: LOCK_EXPIRED, then FENCED once someone else takes a payment lock.
    assert refusal_code(sim.step(SERVICE, Complete(lock.token, 1, 1000, "a"))) == "LOCK_EXPIRED"
    assert refusal_code(sim.step(H5, Release("payment", lock.token))) == "LOCK_EXPIRED"
    sim.grant(ERP1, "payment")
    assert refusal_code(sim.step(SERVICE, Complete(lock.token, 1, 1000, "b"))) == "FENCED"


def test_expiry_happens_on_any_step_not_only_tick() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    sim.now = lock.expires_at
    out = sim.acquire(ERP1, "payment")
    assert out.refusal is None
    assert names(out) == ["lock.expired", "lock.acquired"]
    assert out.events[0].lock == lock


def test_erp_ttl_and_renew() -> None:
    config = StoreConfig(erp_lock_ttl_ms=60_000)
    sim = Sim(config=config)
    sim.publish(ERP1)
    lock = sim.grant(ERP1, "presettle")
    assert lock.expires_at == T0 + 60_000
    sim.now = T0 + 50_000
    renewed = sim.step(ERP1, Renew("presettle", lock.token))
    assert renewed.result is not None and renewed.result.lock.expires_at == T0 + 110_000
    assert renewed.events == [] and renewed.deadline == T0 + 110_000
    sim.now = T0 + 60_000
    assert sim.step(None, Tick()).events == []
    sim.now = T0 + 110_000
    expired = only(sim.step(None, Tick()), "lock.expired")
    assert expired.lock is not None and expired.lock.token == lock.token
    assert expired.notify == holder_key(ERP1)


def test_disconnect_grace_releases_erp_locks() -> None:
    sim = open_order()
    lock = sim.grant(ERP1, "order")
    since = T0 + 100
    sim.offline = {holder_key(ERP1): since}
    sim.now = since
    assert sim.step(None, Tick()).deadline == since + GRACE
    sim.now = since + GRACE - 1
    assert sim.step(None, Tick()).events == []
    sim.now = since + GRACE
    out = sim.step(None, Tick())
    released = only(out, "lock.released")
    assert released.lock == lock and released.reason == "holder_disconnected"
    assert sim.record is not None and sim.record.locks == {}
    # Released, not lapsed: the token is simply not the current one any more.
    assert refusal_code(sim.step(ERP1, Release("order", lock.token))) == "FENCED"


def test_reconnect_within_grace_keeps_the_locks() -> None:
    sim = open_order()
    lock = sim.grant(MANAGER, "order")
    sim.offline = {holder_key(MANAGER): T0}
    sim.now = T0 + GRACE - 1
    sim.step(None, Tick())
    sim.offline = {}  # back online
    sim.now = T0 + GRACE + 10
    out = sim.step(None, Tick())
    assert out.events == [] and sim.record is not None
    assert sim.record.locks == {"order": lock}
    assert out.deadline == lock.expires_at


def test_grace_longer_than_the_ttl_expires_at_the_ttl() -> None:
    config = StoreConfig(erp_lock_ttl_ms=10_000, disconnect_grace_ms=600_000)
    sim = Sim(config=config)
    sim.publish(ERP1)
    lock = sim.grant(ERP1, "order")
    sim.offline = {holder_key(ERP1): T0}
    sim.now = lock.expires_at
    assert only(sim.step(None, Tick()), "lock.expired").lock == lock


def test_h5_locks_ignore_presence() -> None:
    sim = open_order()
    lock = sim.grant(H5, "payment")
    sim.offline = {holder_key(H5): T0}
    sim.now = T0 + 1  # with a disconnect grace shorter than the TTL
    sim.config = StoreConfig(disconnect_grace_ms=0)
    out = sim.step(None, Tick())
    assert out.events == [] and out.deadline == lock.expires_at
    sim.now = lock.expires_at
    assert only(sim.step(None, Tick()), "lock.expired").lock == lock


# --- strong_link off ---------------------------------------------------------------------

def test_strong_link_off_enforces_nothing() -> None:
    sim = Sim(config=LOOSE)
    sim.publish(ERP1, amount_cents=700)
    for actor, kind in [(ERP1, "order"), (ERP2, "payment"), (H5, "payment"),
                        (MANAGER, "presettle")]:
        out = sim.step(actor, Acquire(kind))  # type: ignore[arg-type]
        assert out.refusal is None and not out.pull_first
        assert out.result is not None
        assert out.result.enforced is False and out.result.lock is None
        assert out.events == [] and not out.changed
        assert sim.record is not None and sim.record.locks == {}
    renew = sim.step(ERP1, Renew("order", 5))
    assert renew.result == Renewed(enforced=False, lock=None)
    checked = sim.step(H5, Check("pay"))
    assert checked.result == Checked(None)
    assert refusal_code(sim.step(SERVICE, Complete(None, 2, 700, "a"))) == "STALE_VERSION"
    assert refusal_code(sim.step(SERVICE, Complete(None, 1, 701, "b"))) == "AMOUNT_MISMATCH"
    out = sim.step(SERVICE, Complete(None, 1, 700, "c"))
    assert out.refusal is None and sim.order.status == "paid"
    assert names(out) == ["order.paid"]
    assert refusal_code(sim.step(SERVICE, Complete(None, 1, 700, "d"))) == "ORDER_PAID"


def test_strong_link_off_publish_ignores_locks_and_h5_needs_no_fetch() -> None:
    sim = open_order()
    sim.grant(ERP2, "presettle")
    sim.config = LOOSE
    assert sim.publish(ERP1, version=2, change="modify").refusal is None
    out = step(None, Acquire("payment"), H5, config=LOOSE)
    assert out.result == Acquired(enforced=False, lock=None, order=None)


def test_release_all() -> None:
    locks = [make_lock("order", ERP2, T0 + 1), make_lock("presettle", MANAGER, T0 + 2),
             make_lock("payment", H5, T0 + 3)]
    out = step(make_record(make_order(), locks), ReleaseAll())
    assert names(out) == ["lock.released"] * 3
    assert {e.reason for e in out.events} == {"released"}
    assert {e.lock.token for e in out.events if e.lock} == {T0 + 1, T0 + 2, T0 + 3}
    assert out.record is not None and out.record.locks == {} and out.deadline is None
    assert step(None, ReleaseAll()).record is None


# --- retention --------------------------------------------------------------------------

def test_paid_order_is_forgotten_after_retention() -> None:
    config = StoreConfig(order_retention_ms=60_000)
    sim = Sim(config=config)
    sim.publish(ERP1)
    lock = sim.grant(ERP1, "payment")
    paid = sim.step(ERP1, Complete(lock.token, 1, 1000, "p"))
    assert paid.deadline == T0 + 60_000
    sim.now = T0 + 59_999
    assert sim.step(None, Tick()).record is not None
    sim.now = T0 + 60_000
    out = sim.step(None, Tick())
    assert out.record is None and out.changed and out.deadline is None
    assert refusal_code(sim.step(ERP1, Complete(lock.token, 1, 1000, "p"))) == "NOT_FOUND"


def test_open_order_is_kept() -> None:
    sim = open_order()
    sim.now += 10 * CONFIG.order_retention_ms
    out = sim.step(None, Tick())
    assert out.record is not None and not out.changed and out.deadline is None


# --- fencing tokens and events ----------------------------------------------------------

def test_fencing_tokens_strictly_increase_across_kinds() -> None:
    sim = open_order()
    tokens = [sim.grant(ERP1, "order").token, sim.grant(ERP1, "presettle").token]
    tokens.append(sim.grant(ERP1, "payment").token)  # upgrades the order lock
    sim.step(ERP1, Release("payment"))
    tokens.append(sim.grant(ERP2, "payment").token)
    tokens.append(sim.grant(ERP1, "order", force=True).token)
    assert tokens == sorted(set(tokens)) and len(tokens) == 5
    assert tokens[0] > T0  # above the record's creation clock
    assert all(t < 2**53 for t in tokens)
    assert sim.record is not None and sim.record.fence == tokens[-1]


def test_tokens_keep_growing_when_granted_within_one_millisecond() -> None:
    sim = open_order()
    seen = []
    for _ in range(5):
        lock = sim.grant(ERP1, "order")
        seen.append(lock.token)
        sim.step(ERP1, Release("order"))
    assert seen == sorted(set(seen))


def test_events_carry_table_id_and_replay_to_the_record() -> None:
    sim = Sim()
    view = View()
    sim.publish(ERP1, table_id="t9")
    sim.grant(ERP1, "order")
    sim.grant(ERP2, "presettle", force=True)
    sim.publish(ERP2, version=2, change="modify", table_id="t9", force=True)
    sim.grant(ERP1, "payment")
    sim.now += ERP_TTL
    sim.step(None, Tick())
    events = [e for out in sim.outcomes for e in out.events]
    assert events and {e.table_id for e in events} == {"t9"}
    view.apply(events)
    view.assert_matches(sim.record)


def test_contended_goes_to_the_blocking_holder_alone() -> None:
    sim = open_order()
    held = sim.grant(ERP1, "payment")
    out = sim.acquire(H5, "payment")
    assert refusal_code(out) == "PAYMENT_LOCKED" and out.refusal is not None
    assert out.refusal.variant == "h5" and out.refusal.can_force is False
    assert out.events == []
    [(to, event)] = out.direct
    assert to == holder_key(ERP1)
    assert (event.event, event.lock, event.by, event.action) == (
        "lock.contended", held, H5, "pay")
    checked = sim.step(H5, Check("pay"))
    assert checked.direct == []  # a check is not an attempt


# --- the ERP pull for an h5 payment lock ------------------------------------------------

def test_h5_pay_on_an_unknown_order_pulls_it_first() -> None:
    first = step(None, Acquire("payment"), H5)
    assert first.pull_first and first.refusal is None and first.result is None
    assert first.record is None and first.events == []
    fresh = make_order(version=3, amount_cents=2000)
    out = step(None, Acquire("payment", pulled=Pulled(fresh)), H5)
    assert out.refusal is None and out.result is not None
    assert names(out) == ["order.updated", "lock.acquired"]
    assert out.result.lock.order_version == 3
    assert out.record is not None and out.record.order == fresh
    failed = step(None, Acquire("payment", pulled=Pulled(None)), H5)
    assert refusal_code(failed) == "ERP_UNAVAILABLE" and failed.record is None


def test_h5_pay_on_a_known_order_pulls_and_decides_again() -> None:
    sim = open_order()
    first = sim.step(H5, Acquire("payment"))
    assert first.pull_first and first.refusal is None and first.events == []
    # Meanwhile the counter takes the order lock: the second pass is refused.
    held = sim.grant(ERP1, "order")
    fresh = make_order(version=2, amount_cents=1300)
    out = sim.step(H5, Acquire("payment", pulled=Pulled(fresh)))
    assert refusal_code(out) == "ORDER_LOCKED" and out.refusal is not None
    assert out.refusal.lock == held
    assert sim.order == fresh  # the pulled order is stored all the same
    sim.step(ERP1, Release("order"))
    newer = make_order(version=3, amount_cents=1400)
    out = sim.step(H5, Acquire("payment", pulled=Pulled(newer)))
    assert out.refusal is None and out.result is not None
    assert out.result.lock.order_version == 3 and out.result.order == newer
    assert names(out) == ["order.updated", "lock.acquired"]
    # An older pulled copy never rolls the order back.
    stale = sim.step(H5_SAME_TABLE, Ingest(make_order(version=2)))
    assert stale.events == [] and sim.order == newer


def test_h5_pay_erp_unavailable_takes_no_lock() -> None:
    sim = open_order()
    out = sim.step(H5, Acquire("payment", pulled=Pulled(None)))
    assert_refused(out, "ERP_UNAVAILABLE")
    assert sim.record is not None and sim.record.locks == {}


# --- store config --------------------------------------------------------------------------

def test_patch_config_applies_a_partial_patch() -> None:
    patched = patch_config(CONFIG, {"strong_link": False, "locale": "en",
                                    "h5_payment_lock_ttl_ms": 5000})
    assert patched == StoreConfig(strong_link=False, locale="en", h5_payment_lock_ttl_ms=5000)
    assert patch_config(CONFIG, {}) == CONFIG


@pytest.mark.parametrize("name", sorted(CONFIG_RANGES))
def test_patch_config_ranges_are_inclusive(name: str) -> None:
    low, high = CONFIG_RANGES[name]
    assert getattr(patch_config(CONFIG, {name: low}), name) == low
    assert getattr(patch_config(CONFIG, {name: high}), name) == high
    for bad in (low - 1, high + 1, True, False, float(low), str(low), None):
        with pytest.raises(ConfigError):
            patch_config(CONFIG, {name: bad})


def test_patch_config_ranges_match_the_spec() -> None:
    assert CONFIG_RANGES == {
        "h5_payment_lock_ttl_ms": (5000, 300000),
        "erp_lock_ttl_ms": (10000, 3600000),
        "disconnect_grace_ms": (0, 600000),
        "erp_fetch_timeout_ms": (500, 30000),
        "order_retention_ms": (60000, 2592000000),
    }
    defaults = StoreConfig(True, 15000, 600000, 30000, 3000, "zh-CN", 86400000)
    assert defaults == CONFIG


@pytest.mark.parametrize("patch", [
    {"unknown": 1}, {"strong_link": 1}, {"strong_link": "true"}, {"strong_link": None},
    {"locale": "fr"}, {"locale": None}, {"ttl": 5000, "locale": "en"}])
def test_patch_config_refuses_bad_fields(patch: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        patch_config(CONFIG, patch)
