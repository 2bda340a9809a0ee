"""Force takeover, fencing, pre-bills, auto-accept and payment retries (SCENARIOS 5, 6, 7, 10)."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Store

FENCED = "This order was taken over by another machine."
STALE_VERSION = "The order has changed. Please refresh it before paying."
PRESETTLE_LOCKED = "The bill has been printed; the order cannot be changed now."
ORDER_PAID = "This order has already been paid."
AMOUNT_MISMATCH = "The amount paid differs from the order total. Please refresh before paying."
ACCEPT_BLOCKED = {
    ("payment", "en"): ("This order is being paid on another machine or by the customer, "
                        "so it cannot be accepted now. Cancel the payment first."),
    ("payment", "zh-CN"): "订单正在其他机器/顾客端进行支付，暂不能接单，如需接单请先取消支付",
    ("presettle", "en"): ("The bill has been printed, so the order cannot be accepted now. "
                          "Cancel the pre-bill first."),
    ("presettle", "zh-CN"): "订单已预结，暂不能接单，如需接单请先取消预结",
}


def rejected(entries: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    found = [e for e in entries if e["kind"] == "payment.rejected"
             and e["detail"]["payment_ref"] == ref]
    assert len(found) == 1, (ref, entries)
    return found[0]


async def test_cashier_b_forces_past_cashier_a(store: Store) -> None:
    """SCENARIO 5: A is told once per connection, A's late payment is FENCED, B pays."""
    a_order_sub = await store.erp("cashier-a")  # A's screen subscribed to the order
    a_store_sub = await store.connect("erp_main", "cashier-a")  # A's screen on the store
    a_bare = await store.connect("erp_main", "cashier-a")  # A's screen subscribed to nothing
    b = await store.connect("erp_secondary", "cashier-b")
    await store.publish(a_order_sub, order_id="o5", amount_cents=4200)
    await a_order_sub.request("subscribe", channel=store.channel("o5"))
    await a_store_sub.request("subscribe", channel=store.channel())

    held = await a_bare.request("lock.acquire", order_id="o5", kind="payment")
    assert held["ok"], held
    a_lock = held["lock"]

    refused = await b.request("lock.acquire", order_id="o5", kind="payment")
    assert refused["error"]["code"] == "PAYMENT_LOCKED" and refused["error"]["can_force"] is True
    forced = await b.request("lock.acquire", order_id="o5", kind="payment", force=True,
                             operator="manager Li", reason="customer left the counter")
    assert forced["ok"], forced
    b_lock = forced["lock"]
    assert b_lock["token"] > a_lock["token"]
    assert [lock["token"] for lock in forced["forced"]] == [a_lock["token"]]

    # Each connection of A gets lock.forced exactly once: the channel event where it is
    # subscribed (order or store channel), the direct copy where it is not; never both.
    on_order = await a_order_sub.event("lock.forced")
    assert on_order["channel"] == store.channel("o5") and "direct" not in on_order
    on_store = await a_store_sub.event("lock.forced")
    assert on_store["channel"] == store.channel() and "direct" not in on_store
    direct = await a_bare.event("lock.forced")
    assert direct["direct"] is True and "channel" not in direct and "seq" not in direct
    for event in (on_order, on_store, direct):
        assert event["lock"]["token"] == a_lock["token"]
        assert event["by"]["terminal_id"] == "cashier-b"
    for client in (a_order_sub, a_store_sub, a_bare):
        await client.no_event("lock.forced", within=0.2)

    late = await a_bare.request("payment.complete", order_id="o5", token=a_lock["token"],
                                version=1, amount_cents=4200, payment_ref="a-late")
    assert late["ok"] is False
    assert late["error"]["code"] == "FENCED" and late["error"]["message"] == FENCED

    paid = await b.request("payment.complete", order_id="o5", token=b_lock["token"], version=1,
                           amount_cents=4200, payment_ref="b-pay")
    assert paid["ok"], paid
    assert paid["order"]["status"] == "paid"

    entries = await store.audit()
    force_entries = [e for e in entries if e["kind"] == "lock.forced"]
    assert len(force_entries) == 1
    assert force_entries[0]["detail"]["operator"] == "manager Li"
    assert force_entries[0]["detail"]["reason"] == "customer left the counter"
    entry = rejected(entries, "a-late")
    assert entry["detail"]["code"] == "FENCED" and entry["handled"] is False


async def test_forced_release_is_lock_forced_to_the_holder(store: Store) -> None:
    holder = await store.erp("cashier-a")
    boss = await store.connect("manager", "boss")
    await store.publish(holder, order_id="o")
    held = await holder.request("lock.acquire", order_id="o", kind="order")
    assert held["ok"]
    not_holder = await boss.request("lock.release", order_id="o", kind="order")
    assert not_holder["error"]["code"] == "NOT_HOLDER"
    released = await boss.request("lock.release", order_id="o", kind="order", force=True,
                                  operator="boss", reason="stuck screen")
    assert released["ok"], released
    event = await holder.event("lock.forced")
    assert event["direct"] is True and event["by"]["terminal_id"] == "boss"
    await holder.no_event("lock.released", within=0.2)


async def test_h5_force_is_forbidden_and_never_grants(store: Store) -> None:
    """SCENARIO 5, second half: an H5 trying the same force."""
    cashier = await store.erp("cashier")
    phone = await store.connect("h5", "phone", table="t1")
    await store.publish(cashier, order_id="held", table_id="t1")
    await store.publish(cashier, order_id="free", table_id="t1")
    held = await cashier.request("lock.acquire", order_id="held", kind="payment")
    assert held["ok"]

    for oid in ("held", "free"):
        reply = await phone.request("lock.acquire", order_id=oid, kind="payment", force=True)
        assert reply["ok"] is False and reply["error"]["code"] == "FORBIDDEN", reply
    release = await phone.request("lock.release", order_id="held", kind="payment", force=True)
    assert release["error"]["code"] == "FORBIDDEN"

    await cashier.no_event("lock.forced", within=0.2)
    assert [lk["token"] for lk in (await cashier.request("order.get", order_id="held"))["locks"]
            ] == [held["lock"]["token"]]
    assert (await cashier.request("order.get", order_id="free"))["locks"] == []


async def test_forced_publish_revokes_pre_bill_and_old_version_is_stale(store: Store) -> None:
    """SCENARIO 10: pre-bill printed, then a dish."""
    cashier_a = await store.erp("cashier-a")
    cashier_b = await store.connect("erp_secondary", "cashier-b")
    await store.publish(cashier_a, order_id="o10", amount_cents=5000)
    pre = await cashier_a.request("lock.acquire", order_id="o10", kind="presettle")
    assert pre["ok"], pre
    assert pre["lock"]["order_version"] == 1

    refused = await store.publish(cashier_b, "add_items", order_id="o10", version=2,
                                  amount_cents=5800)
    assert refused["error"]["code"] == "PRESETTLE_LOCKED"
    assert refused["error"]["message"] == PRESETTLE_LOCKED
    assert refused["error"]["can_force"] is True

    forced = await store.publish(cashier_b, "add_items", order_id="o10", version=2,
                                 amount_cents=5800, force=True, operator="b")
    assert forced["ok"], forced
    event = await cashier_a.event("lock.forced")
    assert event["lock"]["kind"] == "presettle" and event["lock"]["token"] == pre["lock"]["token"]
    got = await cashier_a.request("order.get", order_id="o10")
    assert got["order"]["version"] == 2 and got["locks"] == []

    # Cashier A takes payment against the printed pre-bill: version 1, 5000.
    pay = await cashier_a.request("lock.acquire", order_id="o10", kind="payment")
    assert pay["ok"] and pay["lock"]["order_version"] == 2
    stale = await cashier_a.request("payment.complete", order_id="o10",
                                    token=pay["lock"]["token"], version=1, amount_cents=5000,
                                    payment_ref="prebill-1")
    assert stale["error"]["code"] == "STALE_VERSION"
    assert stale["error"]["message"] == STALE_VERSION
    entry = rejected(await store.audit("payment.rejected"), "prebill-1")
    assert entry["detail"]["code"] == "STALE_VERSION" and entry["detail"]["version"] == 1

    ok = await cashier_a.request("payment.complete", order_id="o10", token=pay["lock"]["token"],
                                 version=2, amount_cents=5800, payment_ref="prebill-2")
    assert ok["ok"], ok


async def test_payment_under_a_pre_bill_is_at_the_presettled_version(store: Store) -> None:
    cashier = await store.erp("cashier")
    phone = await store.connect("h5", "phone", table="t1")
    await cashier.request("subscribe", channel=store.channel("o"))
    await store.publish(cashier, order_id="o", amount_cents=3000)
    pre = await cashier.request("lock.acquire", order_id="o", kind="presettle")
    assert pre["ok"]
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["ok"], pay
    assert pay["lock"]["order_version"] == 1
    got = await cashier.request("order.get", order_id="o")
    assert sorted(lock["kind"] for lock in got["locks"]) == ["payment", "presettle"]
    paid = await store.service_pay("o", token=pay["lock"]["token"], version=1,
                                   amount_cents=3000, payment_ref="p")
    assert paid["ok"], paid
    released = await cashier.collect(2, "lock.released")
    assert sorted((e["lock"]["kind"], e["reason"]) for e in released) == [
        ("payment", "paid"), ("presettle", "paid")]


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
async def test_accept_is_blocked_during_payment_and_pre_bill(store: Store, locale: str) -> None:
    """SCENARIO 6: auto-accept of a scanned order while someone pays or a pre-bill is out."""
    payer = await store.erp("cashier-pay")
    printer = await store.connect("erp_secondary", "cashier-print")
    acceptor = await store.connect("erp_secondary", "auto-accept", locale=locale)
    await store.publish(payer, order_id="o6")

    assert (await acceptor.request("check", order_id="o6", action="accept"))["allowed"] is True
    # The pre-bill is printed, then the customer pays at the counter (allowed under it).
    pre = await printer.request("lock.acquire", order_id="o6", kind="presettle")
    pay = await payer.request("lock.acquire", order_id="o6", kind="payment")
    assert pay["ok"] and pre["ok"], (pay, pre)

    # Both held: the payment lock is named first.
    check = await acceptor.request("check", order_id="o6", action="accept")
    assert check["ok"] is True and check["allowed"] is False
    assert check["code"] == "ACCEPT_BLOCKED" and check["can_force"] is False
    assert check["message"] == ACCEPT_BLOCKED[("payment", locale)]
    assert check["lock"]["token"] == pay["lock"]["token"]

    # The payment is cancelled: the pre-bill still blocks, with its own toast.
    assert (await payer.request("lock.release", order_id="o6", kind="payment",
                                token=pay["lock"]["token"]))["ok"]
    check = await acceptor.request("check", order_id="o6", action="accept")
    assert check["allowed"] is False and check["code"] == "ACCEPT_BLOCKED"
    assert check["message"] == ACCEPT_BLOCKED[("presettle", locale)]
    assert check["lock"]["token"] == pre["lock"]["token"]

    assert (await printer.request("lock.release", order_id="o6", kind="presettle",
                                  token=pre["lock"]["token"]))["ok"]
    check = await acceptor.request("check", order_id="o6", action="accept")
    assert check == {"id": check["id"], "ok": True, "allowed": True}


async def test_accept_blocked_by_h5_payment_only(store: Store) -> None:
    cashier = await store.erp("cashier", locale="zh-CN")
    phone = await store.connect("h5", "phone", table="t1")
    await store.publish(cashier, order_id="o")
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["ok"], pay
    check = await cashier.request("check", order_id="o", action="accept")
    assert check["code"] == "ACCEPT_BLOCKED"
    assert check["message"] == ACCEPT_BLOCKED[("payment", "zh-CN")]
    # The lock table has no force for accept.
    assert check["can_force"] is False
    # The h5 itself may not accept orders at all.
    own = await phone.request("check", order_id="o", action="accept")
    assert own["allowed"] is False and own["code"] == "FORBIDDEN"
    assert (await phone.request("lock.release", order_id="o", kind="payment",
                                token=pay["lock"]["token"]))["ok"]
    assert (await cashier.request("check", order_id="o", action="accept"))["allowed"] is True


async def test_payment_retry_with_same_ref_is_recorded_once(store: Store) -> None:
    """SCENARIO 7: the network drops after paying; the retry gets the same success."""
    cashier = await store.erp("cashier")
    watcher = await store.connect("manager", "dash")
    await watcher.request("subscribe", channel=store.channel("o7"))
    await store.publish(cashier, order_id="o7", amount_cents=2300)
    pay = await cashier.request("lock.acquire", order_id="o7", kind="payment")
    token = pay["lock"]["token"]
    params = {"order_id": "o7", "version": 1, "amount_cents": 2300, "payment_ref": "wx-777"}

    first = await cashier.request("payment.complete", token=token, **params)
    assert first["ok"], first
    again = await cashier.request("payment.complete", token=token, **params)
    stale_token = await cashier.request("payment.complete", token=1, **params)
    for retry in (again, stale_token):
        assert retry["ok"], retry
        assert {k: v for k, v in retry.items() if k != "id"} == {
            k: v for k, v in first.items() if k != "id"}
    status, body = await store.http("POST", "/orders/o7/payment", role="service",
                                    body={"token": token, "version": 1, "amount_cents": 2300,
                                          "payment_ref": "wx-777"})
    assert status == 200 and body["order"] == first["order"], body

    # A different payment_ref is a second payment.
    second = await cashier.request("payment.complete", token=token,
                                   **{**params, "payment_ref": "wx-778"})
    assert second["error"]["code"] == "ORDER_PAID"
    assert second["error"]["message"] == ORDER_PAID

    paid_events = await watcher.collect(1, "order.paid")
    assert paid_events[0]["payment"]["payment_ref"] == "wx-777"
    await watcher.no_event("order.paid", within=0.2)
    entries = await store.audit()
    payments = [e for e in entries if e["kind"].startswith("payment.")
                and e["kind"] != "payment.rejected"]
    assert len(payments) == 1, payments
    assert payments[0]["detail"]["payment_ref"] == "wx-777"
    assert rejected(entries, "wx-778")["detail"]["code"] == "ORDER_PAID"


async def test_refused_payments_are_listed_until_handled(store: Store) -> None:
    cashier = await store.erp("cashier")
    await store.publish(cashier, order_id="r", amount_cents=900)
    pay = await cashier.request("lock.acquire", order_id="r", kind="payment")
    token = pay["lock"]["token"]
    attempts = {
        "ref-fenced": ({"token": token - 1, "version": 1, "amount_cents": 900}, "FENCED"),
        "ref-stale": ({"token": token, "version": 7, "amount_cents": 900}, "STALE_VERSION"),
        "ref-amount": ({"token": token, "version": 1, "amount_cents": 901}, "AMOUNT_MISMATCH"),
    }
    for ref, (params, code) in attempts.items():
        reply = await cashier.request("payment.complete", order_id="r", payment_ref=ref,
                                      **params)
        assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"] == AMOUNT_MISMATCH
    assert (await cashier.request("payment.complete", order_id="r", token=token, version=1,
                                  amount_cents=900, payment_ref="ref-ok"))["ok"]
    status, body = await store.http("POST", "/orders/r/payment", role="service",
                                    body={"token": token, "version": 1, "amount_cents": 900,
                                          "payment_ref": "ref-http-dup"})
    assert status == 409 and body["error"]["code"] == "ORDER_PAID", body

    entries = await store.audit("payment.rejected")
    assert {e["detail"]["payment_ref"] for e in entries} == {*attempts, "ref-http-dup"}
    for ref, (params, code) in attempts.items():
        entry = rejected(entries, ref)
        assert entry["handled"] is False and entry["order_id"] == "r"
        assert entry["detail"]["code"] == code
        assert entry["detail"]["amount_cents"] == params["amount_cents"]
        assert entry["detail"]["version"] == params["version"]
    others = [e for e in await store.audit() if e["kind"] != "payment.rejected"]
    assert others and all(e["handled"] is None for e in others)

    target = rejected(entries, "ref-stale")["id"]
    status, body = await store.http("POST", f"/audit/{target}/handled")
    assert status == 200, body
    after = await store.audit("payment.rejected")
    assert rejected(after, "ref-stale")["handled"] is True
    assert rejected(after, "ref-fenced")["handled"] is False

    status, _ = await store.http("POST", "/audit/999999999/handled")
    assert status == 404
    status, _ = await store.http("POST", f"/audit/{target}/handled", role="erp_main")
    assert status == 403


async def test_a_paid_order_refuses_every_change_but_closing(store: Store) -> None:
    cashier = await store.erp("cashier")
    other = await store.connect("erp_secondary", "other")
    phone = await store.connect("h5", "phone", table="t1")
    await store.publish(cashier, order_id="o")
    lock = (await cashier.request("lock.acquire", order_id="o", kind="payment"))["lock"]
    assert (await cashier.request("payment.complete", order_id="o", token=lock["token"],
                                  version=1, amount_cents=1000, payment_ref="p1"))["ok"]
    for client, type_, params in [
        (other, "lock.acquire", {"order_id": "o", "kind": "order"}),
        (other, "lock.acquire", {"order_id": "o", "kind": "payment", "force": True}),
        (phone, "lock.acquire", {"order_id": "o", "kind": "payment"}),
        (cashier, "lock.release", {"order_id": "o", "kind": "payment", "token": lock["token"]}),
        (other, "order.publish", {"order": {"order_id": "o", "table_id": "t1", "version": 2,
                                            "amount_cents": 1}, "change": "add_items"}),
    ]:
        reply = await client.request(type_, **params)
        assert reply["error"]["code"] == "ORDER_PAID", (type_, reply)
        assert reply["error"]["message"] == ORDER_PAID
    check = await other.request("check", order_id="o", action="edit")
    assert check["allowed"] is False and check["code"] == "ORDER_PAID"
    closed = await store.publish(cashier, "status", order_id="o", version=2, status="closed")
    assert closed["ok"], closed


async def test_strong_link_off_enforces_nothing(store: Store) -> None:
    cashier = await store.erp("cashier")
    other = await store.connect("erp_secondary", "other")
    watcher = await store.connect("manager", "dash")
    await store.publish(cashier, order_id="o", amount_cents=800)
    await store.publish(cashier, order_id="p", amount_cents=900)
    held = await cashier.request("lock.acquire", order_id="o", kind="payment")
    assert held["ok"] and held.get("enforced", True) is True
    await watcher.request("subscribe", channel=store.channel())

    await store.config(strong_link=False)
    released = await watcher.event("lock.released")
    assert released["reason"] == "released" and released["lock"]["token"] == held["lock"]["token"]
    free = await other.request("lock.acquire", order_id="p", kind="payment")
    assert free["ok"] and free["enforced"] is False and free["lock"] is None, free
    await watcher.no_event("lock.acquired", within=0.2)
    assert (await cashier.request("order.get", order_id="p"))["locks"] == []
    stale = await other.request("payment.complete", order_id="p", version=2, amount_cents=900,
                                payment_ref="weak-0")
    assert stale["error"]["code"] == "STALE_VERSION"
    paid = await other.request("payment.complete", order_id="p", version=1, amount_cents=900,
                               payment_ref="weak-1")
    assert paid["ok"] and paid["order"]["status"] == "paid", paid
    again = await cashier.request("payment.complete", order_id="p", version=1, amount_cents=900,
                                  payment_ref="weak-2")
    assert again["error"]["code"] == "ORDER_PAID"
