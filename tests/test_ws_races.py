"""Terminals racing for the same order (SCENARIOS 1, 2, 3 and 11), over real sockets."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from .conftest import Store
from .support import WsClient, order

ROUNDS = 30

ERP_PAYMENT_LOCKED = ("This order is being checked out on another machine or by the customer. "
                      "Checking out now may cause a duplicate payment. Continue?")
H5_PAYMENT_LOCKED = "This order is being paid elsewhere. Please try again shortly."
ORDER_LOCKED = "The order is being changed at the counter. Please pay when it is done."
STALE_VERSION = "The order has changed. Please refresh it before paying."


async def acquire_after(client: WsClient, delay_ms: int, order_id: str) -> dict[str, Any]:
    """A press of the pay button `delay_ms` after the round starts (SCENARIO 1: 5 ms apart)."""
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    return await client.request("lock.acquire", order_id=order_id, kind="payment")


async def test_payment_race_grants_exactly_one_lock_per_round(store: Store) -> None:
    """SCENARIO 1: an erp_main, an erp_secondary and an h5 press pay together, 30 times."""
    cashier = await store.erp("cashier-main")
    second = await store.connect("erp_secondary", "cashier-2")
    phone = await store.connect("h5", "phone-1", table="t1")
    dashboard = await store.connect("manager", "dash")
    await dashboard.request("subscribe", channel=store.channel())
    racers = {"cashier-main": cashier, "cashier-2": second, "phone-1": phone}
    names = list(racers)
    wins: Counter[str] = Counter()

    for i in range(ROUNDS):
        oid = f"race-{i}"
        assert (await store.publish(cashier, order_id=oid, table_id="t1",
                                    amount_cents=1000 + i))["ok"]
        # Rotate who presses first; every third round the others press 5 ms later.
        first = names[i % 3]
        delays = {name: (0 if name == first or i % 3 == 0 else 5) for name in names}
        replies = dict(zip(names, await asyncio.gather(
            *(acquire_after(racers[n], delays[n], oid) for n in names)), strict=True))

        granted = [n for n, r in replies.items() if r["ok"]]
        assert len(granted) == 1, f"round {i}: {replies}"
        winner = granted[0]
        wins[winner] += 1
        lock = replies[winner]["lock"]
        assert lock["kind"] == "payment" and lock["holder"]["terminal_id"] == winner
        assert lock["order_version"] == 1
        assert 0 < lock["token"] < 2**53  # JavaScript reads it exactly

        for loser in (n for n in names if n != winner):
            error = replies[loser]["error"]
            assert error["code"] == "PAYMENT_LOCKED", (i, loser, replies[loser])
            assert error["lock"]["token"] == lock["token"]
            if loser == "phone-1":
                assert error["message"] == H5_PAYMENT_LOCKED
                assert error["can_force"] is False
            else:
                assert error["message"] == ERP_PAYMENT_LOCKED
                assert error["can_force"] is True

        # The winner's screen hears of both refused attempts, directly.
        contended = await racers[winner].collect(
            2, "lock.contended", where=lambda e, oid=oid: e["lock"]["order_id"] == oid)
        assert sorted(e["by"]["terminal_id"] for e in contended) == sorted(
            n for n in names if n != winner)
        for event in contended:
            assert event["direct"] is True and "channel" not in event and "seq" not in event
            assert event["action"] == "pay"
            assert event["lock"]["token"] == lock["token"]

        got = await cashier.request("order.get", order_id=oid)
        assert [held["token"] for held in got["locks"]] == [lock["token"]]

    # Losers were never told of a contention; the dashboard saw one grant per order.
    for name in names:
        stray = [e for e in racers[name].drain_events() if e["event"] == "lock.contended"]
        assert stray == [], f"{name} got contended events it should not: {stray}"
    acquired = await dashboard.collect(ROUNDS, "lock.acquired")
    await dashboard.no_event("lock.acquired", within=0.2)
    grants = Counter(e["lock"]["order_id"] for e in acquired)
    assert grants == Counter({f"race-{i}": 1 for i in range(ROUNDS)})
    assert sum(wins.values()) == ROUNDS, wins


async def test_two_cashiers_race_for_the_order_lock(store: Store) -> None:
    """Two ERPs open the same cart at once: one edits, the other sees ORDER_LOCKED."""
    a = await store.erp("cashier-a")
    b = await store.connect("erp_secondary", "cashier-b")
    for i in range(10):
        oid = f"cart-{i}"
        await store.publish(a, order_id=oid)
        ra, rb = await asyncio.gather(
            a.request("lock.acquire", order_id=oid, kind="order"),
            b.request("lock.acquire", order_id=oid, kind="order"))
        assert [ra["ok"], rb["ok"]].count(True) == 1, (ra, rb)
        loser = rb if ra["ok"] else ra
        assert loser["error"]["code"] == "ORDER_LOCKED"
        assert loser["error"]["can_force"] is True


async def test_counter_edit_blocks_h5_pay_until_placed(store: Store) -> None:
    """SCENARIO 2: the ERP edits the cart; dishes may still be added, H5 pay waits."""
    cashier = await store.erp("cashier")
    waiter = await store.connect("erp_secondary", "waiter-pad")
    phone = await store.connect("h5", "phone", table="t7")
    await store.publish(cashier, order_id="o2", table_id="t7", amount_cents=1800)
    edit = await cashier.request("lock.acquire", order_id="o2", kind="order")
    assert edit["ok"], edit

    # A dish added from the H5 side (scan-to-order, published by the ERP side) is allowed.
    check = await phone.request("check", order_id="o2", action="add_items")
    assert check["ok"] and check["allowed"] is True, check
    added = await store.publish(waiter, "add_items", order_id="o2", table_id="t7", version=2,
                                amount_cents=2600)
    assert added["ok"], added

    pay = await phone.request("lock.acquire", order_id="o2", kind="payment")
    assert not pay["ok"]
    assert pay["error"]["code"] == "ORDER_LOCKED"
    assert pay["error"]["message"] == ORDER_LOCKED
    assert pay["error"]["can_force"] is False
    assert pay["error"]["lock"]["token"] == edit["lock"]["token"]
    contended = await cashier.event("lock.contended")
    assert contended["by"]["terminal_id"] == "phone" and contended["action"] == "pay"

    # The cashier places the order (version 3) and releases the cart.
    placed = await store.publish(cashier, order_id="o2", table_id="t7", version=3,
                                 amount_cents=3100, token=edit["lock"]["token"])
    assert placed["ok"], placed
    released = await cashier.request("lock.release", order_id="o2", kind="order",
                                     token=edit["lock"]["token"])
    assert released["ok"], released

    pay = await phone.request("lock.acquire", order_id="o2", kind="payment")
    assert pay["ok"], pay
    assert pay["lock"]["order_version"] == 3 and pay["order"]["amount_cents"] == 3100
    paid = await store.service_pay("o2", token=pay["lock"]["token"], version=3,
                                   amount_cents=3100, payment_ref="wx-o2")
    assert paid["ok"], paid
    assert paid["order"]["status"] == "paid"


async def test_dish_added_under_h5_payment_lock_offers_force(store: Store) -> None:
    """SCENARIO 3: a dish added while the customer pays is refused; the ERP may force."""
    cashier = await store.erp("cashier")
    phone = await store.connect("h5", "phone", table="t3")
    await store.publish(cashier, order_id="o3", table_id="t3")
    pay = await phone.request("lock.acquire", order_id="o3", kind="payment")
    assert pay["ok"], pay

    check = await cashier.request("check", order_id="o3", action="add_items")
    assert check["allowed"] is False and check["code"] == "PAYMENT_LOCKED"
    assert check["can_force"] is True and check["message"] == ERP_PAYMENT_LOCKED

    refused = await store.publish(cashier, "add_items", order_id="o3", table_id="t3", version=2,
                                  amount_cents=1500)
    assert refused["ok"] is False
    assert refused["error"]["code"] == "PAYMENT_LOCKED"
    assert refused["error"]["message"] == ERP_PAYMENT_LOCKED
    assert refused["error"]["can_force"] is True
    assert refused["error"]["lock"]["token"] == pay["lock"]["token"]
    contended = await phone.event("lock.contended")
    assert contended["direct"] is True and contended["action"] == "add_items"

    forced = await store.publish(cashier, "add_items", order_id="o3", table_id="t3", version=2,
                                 amount_cents=1500, force=True)
    assert forced["ok"], forced
    revoked = await phone.event("lock.forced")
    assert revoked["direct"] is True
    assert revoked["lock"]["token"] == pay["lock"]["token"]
    assert revoked["by"]["terminal_id"] == "cashier"
    got = await cashier.request("order.get", order_id="o3")
    assert got["order"]["version"] == 2 and got["locks"] == []


async def test_same_version_publishes_race_exactly_one_wins(store: Store) -> None:
    """SCENARIO 11: two terminals add dishes under someone else's order lock."""
    holder = await store.erp("cashier")
    pad_a = await store.connect("erp_secondary", "pad-a")
    pad_b = await store.connect("erp_secondary", "pad-b")
    for i in range(20):
        oid = f"dup-{i}"
        await store.publish(holder, order_id=oid)
        assert (await holder.request("lock.acquire", order_id=oid, kind="order"))["ok"]
        bodies = {
            "pad-a": order(oid, version=2, amount_cents=1500, items=[{"sku": "tea", "qty": 1}]),
            "pad-b": order(oid, version=2, amount_cents=1700, items=[{"sku": "soup", "qty": 1}]),
        }
        ra, rb = await asyncio.gather(
            pad_a.request("order.publish", order=bodies["pad-a"], change="add_items"),
            pad_b.request("order.publish", order=bodies["pad-b"], change="add_items"))
        assert [ra["ok"], rb["ok"]].count(True) == 1, (ra, rb)
        winner, (loser_client, loser) = ("pad-a", (pad_b, rb)) if ra["ok"] else (
            "pad-b", (pad_a, ra))
        assert loser["error"]["code"] == "STALE_VERSION"
        assert loser["error"]["message"] == STALE_VERSION
        # Nothing was overwritten silently: the stored order is the winner's.
        current = (await loser_client.request("order.get", order_id=oid))["order"]
        assert current == bodies[winner]
        # The loser re-reads and publishes again on top of it.
        merged = order(oid, version=current["version"] + 1, amount_cents=2400,
                       items=[*current["items"], {"sku": "extra", "qty": 1}])
        again = await loser_client.request("order.publish", order=merged, change="add_items")
        assert again["ok"], again
        assert (await holder.request("order.get", order_id=oid))["order"] == merged


async def test_publish_with_an_old_or_equal_version_is_stale(store: Store) -> None:
    erp = await store.erp()
    await store.publish(erp, order_id="o", version=5)
    for version in (5, 4):
        reply = await store.publish(erp, order_id="o", version=version, amount_cents=1)
        assert reply["error"]["code"] == "STALE_VERSION", reply
    got = await erp.request("order.get", order_id="o")
    assert got["order"]["version"] == 5 and got["order"]["amount_cents"] == 1000
