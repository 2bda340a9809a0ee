"""The README's first minute: a payment lock taken, and its event seen by a second screen."""

from __future__ import annotations

from .conftest import Store


async def test_payment_lock_is_seen_by_a_subscribed_screen(store: Store) -> None:
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1")
    screen = await store.connect("erp_secondary", "screen-2")
    sub = await screen.request("subscribe", channel=f"order:{store.store_id}:o1")
    assert sub["ok"] and sub["snapshot"]["order"]["version"] == 1

    reply = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    assert reply["ok"], reply
    event = await screen.event("lock.acquired")
    assert event["lock"]["token"] == reply["lock"]["token"]
    assert event["seq"] == sub["seq"] + 1
