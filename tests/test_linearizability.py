"""The payment-lock linearizability checker (bench/linearizability.py): it accepts concurrent
histories that have a valid order, and rejects hand-made bad ones."""

from __future__ import annotations

import random
from pathlib import Path

from bench.history import History
from bench.linearizability import (
    Acquire,
    Complete,
    Done,
    Granted,
    Input,
    Operation,
    OtherLock,
    Output,
    PaymentLockModel,
    Publish,
    Read,
    Refused,
    Release,
    Seen,
    check,
    from_json,
    main,
    to_json,
)
from tablelock import rules
from tablelock.model import OrderRecord

from .rules_helpers import ERP1, ERP2, MANAGER, T0, ctx, make_order

ORDER = "o1"


def op(client: str, call: float, ret: float | None, what: Input,
       out: Output | None) -> Operation:
    return Operation(client, call, ret, what, out)


def linearizable(*ops: Operation, model: PaymentLockModel | None = None) -> bool:
    return check(ops, model).ok


# --- histories that have a linearization ------------------------------------------------

def test_a_sequential_payment_is_linearizable() -> None:
    assert linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, Acquire(ORDER), Refused("PAYMENT_LOCKED")),
        op("a", 4, 5, Complete(ORDER, 5, "p1"), Done()),
        op("b", 6, 7, Acquire(ORDER, force=True), Refused("ORDER_PAID")),
        op("a", 8, 9, Read(ORDER), Seen(None, "paid")),
    )


def test_overlapping_operations_are_reordered() -> None:
    """a's request went first and came back last: its grant (7) must come after b's (6)."""
    assert linearizable(
        op("a", 0, 10, Acquire(ORDER), Granted(7, ())),
        op("b", 1, 3, Acquire(ORDER), Granted(6, ())),
        op("b", 4, 5, Release(ORDER, 6), Done()),
    )


def test_a_payment_that_answers_later_can_take_effect_first() -> None:
    assert linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("svc", 2, 20, Complete(ORDER, 5, "p1"), Done()),
        op("b", 3, 4, Complete(ORDER, 5, "p2"), Refused("ORDER_PAID")),
        op("svc", 21, 22, Complete(ORDER, None, "p1"), Done()),  # the retry, whatever its token
    )


def test_an_unanswered_request_may_have_taken_effect() -> None:
    assert linearizable(
        op("a", 0, None, Acquire(ORDER), None),
        op("b", 1, 2, Acquire(ORDER), Refused("PAYMENT_LOCKED")),
        op("c", 3, 4, Read(ORDER), Seen(9, "open")),  # a's token, first seen here
        op("b", 5, 6, Acquire(ORDER, force=True), Granted(10, (9,))),
    )


def test_an_unanswered_request_may_not_have_taken_effect() -> None:
    assert linearizable(
        op("a", 0, None, Acquire(ORDER), None),
        op("b", 1, 2, Acquire(ORDER), Granted(3, ())),
        op("a", 3, None, Complete(ORDER, 3, "p1"), None),
        op("b", 4, 5, Release(ORDER, 3), Done()),
        op("a", 6, 7, Read(ORDER), Seen(None, "open")),
    )


def test_an_unanswered_request_takes_effect_in_time_or_never() -> None:
    """b's forced acquire got no reply. A read 40 s later shows no lock and one at 60 s shows
    b's: only a grant 38 s after its request explains it, which a 30 s bound rules out."""
    history = [
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, None, Acquire(ORDER, force=True), None),
        op("a", 5, 6, Release(ORDER, 5), Done()),
        op("c", 40, 41, Read(ORDER), Seen(None, "open")),
        op("c", 60, 61, Read(ORDER), Seen(9, "open")),
    ]
    assert check(history).ok
    assert not check(history, PaymentLockModel(effect_within=30)).ok
    assert check(history[:4], PaymentLockModel(effect_within=30)).ok  # never applied
    in_time = [*history[:3], op("c", 13, 14, Read(ORDER), Seen(None, "open")),
               op("c", 20, 21, Read(ORDER), Seen(9, "open"))]  # granted 12 to 19 s after
    assert check(in_time, PaymentLockModel(effect_within=30)).ok
    assert not check(in_time, PaymentLockModel(effect_within=10)).ok


def test_many_unanswered_requests_are_searched_through() -> None:
    """Nine unanswered acquires, any of which may hold the lock: a read that finds none
    fits; a second holder after it does not, whatever they did (an exhaustive search)."""
    lost = [op(f"c{i}", i / 10, None, Acquire(ORDER, force=i % 2 == 0), None) for i in range(9)]
    fine = [*lost, op("r", 5, 6, Read(ORDER), Seen(None, "open")),
            op("y", 7, 8, Acquire(ORDER), Granted(1, ()))]
    assert check(fine).ok
    result = check([*fine, op("x", 9, 10, Acquire(ORDER), Granted(2, ()))])
    assert not result.ok and result.failures[0].configurations > 1_000


def test_unavailable_changed_nothing_and_partitions_are_separate() -> None:
    assert linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, Acquire(ORDER, force=True), Refused("UNAVAILABLE")),
        op("a", 4, 5, Release(ORDER, 5), Done()),
        op("b", 0, 1, Acquire("o2"), Granted(2, ())),  # another order: its own tokens
    )


def test_a_lock_may_lapse_once_its_lifetime_can_have_passed() -> None:
    history = [
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 30, 31, Acquire(ORDER), Granted(6, ())),
        op("a", 32, 33, Release(ORDER, 5), Refused("FENCED")),
    ]
    assert not check(history).ok  # without lapses, b could not take it
    assert not check(history, PaymentLockModel(min_lifetime=60)).ok
    assert check(history, PaymentLockModel(min_lifetime=15)).ok
    # The lapsed token is LOCK_EXPIRED until someone takes the lock again, then FENCED.
    expired = [history[0], op("a", 32, 33, Release(ORDER, 5), Refused("LOCK_EXPIRED"))]
    assert check(expired, PaymentLockModel(min_lifetime=15)).ok
    assert not check([*history[:2], expired[1]], PaymentLockModel(min_lifetime=15)).ok


# --- hand-made bad histories ---------------------------------------------------------

def test_two_holders_are_not_linearizable() -> None:
    result = check([
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, Acquire(ORDER), Granted(6, ())),
    ])
    assert not result.ok
    [failure] = result.failures
    assert failure.order_id == ORDER and len(failure.longest) == 1


def test_two_concurrent_holders_are_not_linearizable() -> None:
    assert not linearizable(
        op("a", 0, 5, Acquire(ORDER), Granted(5, ())),
        op("b", 1, 6, Acquire(ORDER), Granted(6, ())),
    )


def test_a_token_going_backwards_is_not_linearizable() -> None:
    assert not linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(7, ())),
        op("a", 2, 3, Release(ORDER, 7), Done()),
        op("b", 4, 5, Acquire(ORDER), Granted(6, ())),
    )
    # Nor a forced grant that names a token it did not revoke, nor a repeated token.
    assert not linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(7, ())),
        op("b", 2, 3, Acquire(ORDER, force=True), Granted(8, (6,))),
    )
    assert not linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(7, ())),
        op("b", 2, 3, Acquire(ORDER, force=True), Granted(7, (7,))),
    )


def test_two_payments_are_not_linearizable() -> None:
    assert not linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("svc", 2, 3, Complete(ORDER, 5, "p1"), Done()),
        op("svc", 4, 5, Complete(ORDER, 5, "p2"), Done()),
    )
    assert not linearizable(  # at once, each with the token it held
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, Acquire(ORDER, force=True), Granted(6, (5,))),
        op("a", 4, 9, Complete(ORDER, 5, "p1"), Done()),
        op("b", 4, 9, Complete(ORDER, 6, "p2"), Done()),
    )


def test_a_force_must_name_the_lock_it_revoked() -> None:
    assert not linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, Acquire(ORDER, force=True), Granted(6, ())),
    )
    assert not linearizable(  # an order lock forced over a's payment lock, just the same
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, OtherLock(ORDER, force=True), Granted(6, ())),
    )
    assert linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, OtherLock(ORDER, force=True), Granted(6, (5,))),
    )


def test_an_order_lock_below_the_floor_is_only_a_re_acquire_of_ones_own() -> None:
    granted = [op("a", 0, 1, OtherLock(ORDER), Granted(3, ())),
               op("b", 2, 3, Acquire(ORDER), Granted(4, ()))]
    assert linearizable(*granted, op("a", 4, 5, OtherLock(ORDER), Granted(3, ())))
    assert not linearizable(*granted, op("c", 4, 5, OtherLock(ORDER), Granted(3, ())))
    assert not linearizable(*granted, op("a", 4, 5, OtherLock(ORDER), Granted(2, ())))
    # An unanswered grant's token is known only to top the floor it found.
    lost = [op("a", 0, None, OtherLock(ORDER), None), granted[1]]
    assert linearizable(*lost, op("a", 4, 5, OtherLock(ORDER), Granted(1, ())))
    assert not linearizable(*lost, op("c", 4, 5, OtherLock(ORDER), Granted(1, ())))


def test_a_payment_refused_for_its_version_held_the_current_token() -> None:
    """Section 2's precedence: a stale token is FENCED before its version is looked at."""
    forced = [op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
              op("b", 2, 3, Acquire(ORDER, force=True), Granted(6, (5,)))]
    assert linearizable(*forced, op("b", 4, 5, Complete(ORDER, 6, "p1"),
                                    Refused("STALE_VERSION")))
    assert not linearizable(*forced, op("a", 4, 5, Complete(ORDER, 5, "p1"),
                                        Refused("STALE_VERSION")))
    assert not linearizable(*forced, op("a", 4, 5, Complete(ORDER, 5, "p1"),
                                        Refused("AMOUNT_MISMATCH")))


def test_a_release_answered_fenced_after_it_took_effect_is_not_linearizable() -> None:
    history = [
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("a", 2, 3, Release(ORDER, 5), Refused("FENCED")),
        op("b", 4, 5, Acquire(ORDER), Granted(6, ())),
    ]
    assert not check(history, PaymentLockModel(min_lifetime=10)).ok
    # Had the lock been old enough to end with its holder's grace, FENCED would be true.
    assert check(history, PaymentLockModel(min_lifetime=1)).ok


def test_unavailable_after_it_was_applied_is_not_linearizable() -> None:
    """Issue 14, section 0: a forced acquire answered UNAVAILABLE whose grant was applied."""
    history = [
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("b", 2, 3, Acquire(ORDER, force=True), Refused("UNAVAILABLE")),
        op("a", 4, 5, Release(ORDER, 5), Refused("FENCED")),
    ]
    assert not check(history).ok
    unknown = [*history[:1], op("b", 2, None, Acquire(ORDER, force=True), None), history[2]]
    assert check(unknown).ok  # "outcome unknown" may have applied


def test_a_read_that_contradicts_the_writes_is_not_linearizable() -> None:
    assert not linearizable(
        op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
        op("c", 2, 3, Read(ORDER), Seen(None, "open")),
        op("a", 4, 5, Release(ORDER, 5), Done()),
    )


def test_a_search_over_its_budget_says_unknown() -> None:
    history = [op(c, 0, 10, Acquire(ORDER), Refused("PAYMENT_LOCKED")) for c in "abcdef"]
    history.append(op("g", 0, 10, Acquire(ORDER), Granted(5, ())))
    result = check(history, budget=3)
    assert not result.ok and result.failures == [] and len(result.unknown) == 1
    assert check(history).ok


# --- a run's requests, as the chaos harness records them ----------------------------------

def test_wire_requests_and_replies_become_operations() -> None:
    history = History()
    lock5 = {"kind": "payment", "token": 5}
    order = {"order_id": "o1", "status": "open"}
    history.record("s1", "erp", "lock.acquire", {"order_id": "o1", "kind": "payment"},
                   0.0, 0.1, {"ok": True, "lock": lock5, "order": order})
    history.record("s1", "erp", "lock.renew", {"order_id": "o1", "kind": "payment",
                                               "token": 5}, 0.2, 0.3, {"ok": True})
    history.record("s1", "erp-2", "lock.acquire",
                   {"order_id": "o1", "kind": "payment", "force": True}, 0.4, 0.5,
                   {"ok": True, "lock": {"kind": "payment", "token": 7}, "order": order,
                    "forced": [{"kind": "order", "token": 6}, lock5]})
    history.record("s1", "erp", "payment.complete",
                   {"order_id": "o1", "token": 5, "payment_ref": "r1"}, 0.6, 0.7, None)
    history.record("s1", "erp", "lock.release", {"order_id": "o1", "kind": "payment",
                                                 "token": 5}, 0.8, 5.9,
                   {"ok": False, "error": {"code": "UNAVAILABLE", "outcome": "unknown"}})
    history.record("s1", "phone", "order.get", {"table_id": "t1"}, 6.0, 6.1,
                   {"ok": True, "order": order, "locks": [{"kind": "payment", "token": 7}]})
    history.record("s2", "erp", "lock.acquire", {"order_id": "o1", "kind": "order"}, 0.0, 0.1,
                   {"ok": False, "error": {"code": "PAYMENT_LOCKED"}})
    assert [(o.client, o.input, o.output, o.ret) for o in history.operations] == [
        ("s1/erp", Acquire("s1/o1"), Granted(5, ()), 0.1),
        ("s1/erp-2", Acquire("s1/o1", True), Granted(7, (5,)), 0.5),
        ("s1/erp", Complete("s1/o1", 5, "r1"), None, None),
        ("s1/erp", Release("s1/o1", 5), None, None),
        ("s1/phone", Read("s1/o1"), Seen(7, "open"), 6.1),
        ("s2/erp", OtherLock("s2/o1"), Refused("PAYMENT_LOCKED"), 0.1),
    ]
    result = history.check(min_lifetime=4.5)
    assert not result.ok  # store s2's order lock cannot be refused: nobody holds its payment
    assert [p.order_id for p in result.failures] == ["s2/o1"]


def test_a_saved_history_is_checked_from_the_command_line(tmp_path: Path) -> None:
    history = History()
    history.operations += [op("a", 0, 1, Acquire(ORDER), Granted(5, ())),
                           op("b", 2, None, Acquire(ORDER, force=True), None)]
    good = tmp_path / "good.jsonl"
    history.save(good)
    assert main([str(good)]) == 0
    history.operations.append(op("c", 3, 4, Acquire(ORDER), Granted(4, ())))
    bad = tmp_path / "bad.jsonl"
    history.save(bad)
    assert main([str(bad), "--min-lifetime", "4.5"]) == 1


# --- against the real rules: histories made by rules.step are linearizable -------------

def rules_history(seed: int, count: int = 40) -> list[Operation]:
    """Concurrent requests of three terminals, applied by `rules.step` at a random instant
    inside each request's interval (its linearization point), some left unanswered."""
    rng = random.Random(seed)
    terminals = [ERP1, ERP2, MANAGER]
    planned = []
    for i in range(count):
        call = rng.uniform(0, count)
        planned.append((call + rng.uniform(0, 3) * rng.random(), call, i))
    record: OrderRecord | None = rules.step(None, rules.Publish(make_order(), "modify"),
                                            ctx(ERP1)).record
    held: dict[str, int] = {}
    ops = []
    for point, call, i in sorted(planned):
        actor = terminals[i % 3]
        name = actor.terminal_id
        choice = rng.random()
        now = T0 + int(point * 1000)
        what: Input
        command: rules.Command
        force = rng.random() < 0.3
        assert record is not None
        version = record.order.version
        if choice < 0.3:
            what, command = Acquire(ORDER, force), rules.Acquire("payment", force=force)
        elif choice < 0.5:
            token = held.get(name, 1)
            what, command = Release(ORDER, token), rules.Release("payment", token)
        elif choice < 0.65:
            token = held.get(name, 1)
            ref = f"p{rng.randrange(2)}"
            what, command = Complete(ORDER, token, ref), rules.Complete(
                token, version - (rng.random() < 0.1), 1000, ref)
        elif choice < 0.75:
            kind = rng.choice(["order", "presettle"])
            what, command = OtherLock(ORDER, force), rules.Acquire(kind, force=force)  # type: ignore[arg-type]
        elif choice < 0.85:
            status = rng.choice(["open", "open", "open", "closed"])
            order = make_order(version=version + 1, status=status)  # type: ignore[arg-type]
            change = "status" if status == "closed" or rng.random() < 0.2 else "modify"
            what, command = Publish(ORDER, force, status), rules.Publish(order, change,
                                                                         force=force)
        else:
            what, command = Read(ORDER), rules.Tick()
        out = rules.step(record, command, ctx(actor, now))
        record = out.record
        assert record is not None
        answer: Output
        if isinstance(what, Read):
            lock = record.locks.get("payment")
            answer = Seen(lock.token if lock else None, record.order.status)
        elif out.refusal is not None:
            answer = Refused(out.refusal.code)
        elif isinstance(what, (Acquire, OtherLock)):
            assert isinstance(out.result, rules.Acquired)
            lock = out.result.lock
            assert lock is not None
            if isinstance(what, Acquire):
                held[name] = lock.token
            forced = tuple(f.token for f in out.result.forced or () if f.kind == "payment")
            answer = Granted(lock.token, forced)
        else:
            answer = Done()
        lost = rng.random() < 0.1
        ret = None if lost else point + rng.uniform(0, 3)
        ops.append(op(name, call, ret, what, None if lost else answer))
    return ops


def test_histories_made_by_the_rules_are_linearizable() -> None:
    for seed in range(300):
        history = rules_history(seed, count=40 + seed % 2 * 40)
        result = check(history)
        assert result.ok, (seed, [str(o) for o in result.failures[0].longest])
        # Each took effect within 3 s of its call, answered or not.
        bounded = check(history, PaymentLockModel(effect_within=3))
        assert bounded.ok, (seed, [str(o) for o in bounded.failures[0].longest])
        assert [from_json(to_json(o)) for o in history] == history


def test_a_corrupted_rules_history_is_caught() -> None:
    """Answer a grant with a token under one granted before it was asked: always caught."""
    tried = caught = 0
    for seed in range(30):
        history = rules_history(seed)
        grants = [i for i, o in enumerate(history)
                  if isinstance(o.output, Granted) and isinstance(o.input, Acquire)]
        first = history[grants[0]]
        assert isinstance(first.output, Granted) and first.ret is not None
        later = [i for i in grants if history[i].call > first.ret]
        if not later:
            continue
        victim = history[later[-1]]
        assert isinstance(victim.output, Granted)
        history[later[-1]] = op(victim.client, victim.call, victim.ret, victim.input,
                                Granted(first.output.token - 1, victim.output.forced))
        tried += 1
        caught += not check(history).ok
    assert tried >= 15 and caught == tried
