"""Time on the broker's clock: h5 TTL, disconnect grace, resume, renewal (SCENARIOS 4, 8, 12)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from .conftest import Store

TTL_MS = 5000  # the smallest h5_payment_lock_ttl_ms a store may set
LATE_MS = 250  # how late after expires_at lock.expired may arrive
LOCK_EXPIRED = "The payment timed out. Please reload the order and pay again."


async def test_h5_lock_expires_at_its_ttl_on_the_broker_clock(store: Store) -> None:
    """lock.expired reaches every screen no earlier than expires_at, at most 250 ms after."""
    await store.config(h5_payment_lock_ttl_ms=TTL_MS)
    cashier = await store.erp("cashier")
    phone = await store.connect("h5", "phone", table="t1")
    await store.publish(cashier, order_id="o")
    await cashier.request("subscribe", channel=store.channel("o"))
    offset, rtt = await cashier.clock_offset()

    before = (await cashier.request("ping"))["server_time"]
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    after = (await cashier.request("ping"))["server_time"]
    assert pay["ok"], pay
    lock = pay["lock"]
    # SCENARIO 12: the lock's times are the broker's, whatever the client's clock says.
    assert before <= lock["acquired_at"] <= after
    assert lock["expires_at"] - lock["acquired_at"] == TTL_MS

    on_channel = await cashier.event("lock.expired", timeout=TTL_MS / 1000 + 2)
    arrived = time.time() * 1000 + offset  # the arrival, on the broker's clock
    direct = await phone.event("lock.expired", timeout=1)  # the holder is not subscribed
    assert direct["direct"] is True and direct["lock"]["token"] == lock["token"]
    assert on_channel["lock"]["token"] == lock["token"]
    assert lock["expires_at"] <= on_channel["ts"] <= lock["expires_at"] + LATE_MS
    slack = rtt / 2 + 5  # how far off our estimate of the broker's clock may be
    assert arrived >= lock["expires_at"] - slack, (arrived - lock["expires_at"], rtt)
    assert arrived <= lock["expires_at"] + LATE_MS + slack, (arrived - lock["expires_at"], rtt)
    got = await cashier.request("order.get", order_id="o")
    assert got["locks"] == []


async def test_lapsed_h5_payment_is_rejected_then_paid_again(store: Store) -> None:
    """SCENARIO 4 end to end: lapse, a dish, LOCK_EXPIRED (recorded), re-fetch, re-lock, pay."""
    await store.config(h5_payment_lock_ttl_ms=TTL_MS, locale="en")  # the service's refusal
    cashier = await store.erp("cashier")
    screen = await store.connect("erp_secondary", "screen-2")
    phone = await store.connect("h5", "phone", table="t4")
    await store.publish(cashier, order_id="o4", table_id="t4", amount_cents=2000)
    await screen.request("subscribe", channel=store.channel())
    await phone.request("subscribe", channel=store.channel("o4"))

    pay = await phone.request("lock.acquire", order_id="o4", kind="payment")
    assert pay["ok"], pay
    old_token = pay["lock"]["token"]
    for client in (phone, screen):
        event = await client.event("lock.expired", timeout=TTL_MS / 1000 + 2)
        assert event["lock"]["token"] == old_token and "channel" in event
    await phone.no_event("lock.expired", within=0.1)  # subscribed: no direct copy as well

    dish = await store.publish(cashier, "add_items", order_id="o4", table_id="t4", version=2,
                               amount_cents=2600)
    assert dish["ok"], dish

    # The payment provider confirms late: the payment service records it with the old token.
    late = await store.service_pay("o4", token=old_token, version=1, amount_cents=2000,
                                   payment_ref="wx-late")
    assert late["status"] == 409 and late["error"]["code"] == "LOCK_EXPIRED"
    assert late["error"]["message"] == LOCK_EXPIRED
    # A release with the lapsed token is a write under that lock, too late.
    release = await phone.request("lock.release", order_id="o4", kind="payment",
                                  token=old_token)
    assert release["error"]["code"] == "LOCK_EXPIRED", release
    entries = [e for e in await store.audit("payment.rejected")
               if e["detail"]["payment_ref"] == "wx-late"]
    assert len(entries) == 1 and entries[0]["detail"]["code"] == "LOCK_EXPIRED"
    assert entries[0]["handled"] is False

    fresh = await phone.request("order.get", order_id="o4", fresh=True)
    assert fresh["ok"] and fresh["order"]["version"] == 2, fresh
    again = await phone.request("lock.acquire", order_id="o4", kind="payment")
    assert again["ok"], again
    assert again["lock"]["token"] > old_token and again["lock"]["order_version"] == 2
    paid = await store.service_pay("o4", token=again["lock"]["token"], version=2,
                                   amount_cents=2600, payment_ref="wx-ok")
    assert paid["ok"] and paid["order"]["status"] == "paid", paid


async def test_h5_lock_survives_the_phone_dropping_its_socket(store: Store) -> None:
    """The customer switches to the payment app: the h5 lock ends only at its TTL."""
    await store.config(disconnect_grace_ms=200)
    cashier = await store.erp("cashier")
    await store.publish(cashier, order_id="o")
    await cashier.request("subscribe", channel=store.channel("o"))
    phone = await store.connect("h5", "phone", table="t1")
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["ok"]
    await phone.close()
    await cashier.no_event("lock.released", within=0.6)
    got = await cashier.request("order.get", order_id="o")
    assert [lock["token"] for lock in got["locks"]] == [pay["lock"]["token"]]
    paid = await store.service_pay("o", token=pay["lock"]["token"], version=1,
                                   amount_cents=1000, payment_ref="back")
    assert paid["ok"], paid


async def test_erp_crash_releases_its_locks_after_the_grace(store: Store) -> None:
    """SCENARIO 8: the ERP's socket closes; after disconnect_grace_ms, holder_disconnected."""
    grace = 300
    await store.config(disconnect_grace_ms=grace)
    dashboard = await store.connect("manager", "dash")
    await dashboard.request("subscribe", channel=store.channel())
    crashing = await store.erp("cashier")
    await store.publish(crashing, order_id="a")
    await store.publish(crashing, order_id="b")
    held = {oid: await crashing.request("lock.acquire", order_id=oid, kind=kind)
            for oid, kind in (("a", "order"), ("b", "payment"))}
    assert all(reply["ok"] for reply in held.values())
    session_id = crashing.hello["session_id"]
    dashboard.drain_events()

    await crashing.close()
    offline = await dashboard.event("terminal.offline")
    assert offline["terminal"]["terminal_id"] == "cashier"
    released = await dashboard.collect(2, "lock.released", timeout=grace / 1000 + 2)
    assert {e["lock"]["order_id"]: e["reason"] for e in released} == {
        "a": "holder_disconnected", "b": "holder_disconnected"}
    for event in released:
        waited = event["ts"] - offline["ts"]
        assert grace <= waited <= grace + LATE_MS, waited

    watcher = await store.connect("erp_secondary", "screen")
    for oid in ("a", "b"):
        assert (await watcher.request("order.get", order_id=oid))["locks"] == []
    # Its session is gone as well: coming back after the grace is a fresh start.
    back = await store.erp("cashier", resume=session_id)
    assert back.hello["resumed"] is False


@pytest.mark.parametrize("resume", [True, False], ids=["with-resume", "without-resume"])
async def test_reconnect_within_grace_keeps_the_lock(store: Store, resume: bool) -> None:
    grace = 800
    await store.config(disconnect_grace_ms=grace)
    watcher = await store.connect("erp_secondary", "screen")
    cashier = await store.erp("cashier")
    await store.publish(cashier, order_id="o")
    await watcher.request("subscribe", channel=store.channel("o"))
    held = await cashier.request("lock.acquire", order_id="o", kind="payment")
    token = held["lock"]["token"]
    session_id = cashier.hello["session_id"]

    await store.disconnect(cashier)
    hello: dict[str, Any] = {"resume": session_id} if resume else {}
    back = await store.erp("cashier", **hello)
    assert back.hello["resumed"] is resume
    await watcher.no_event("lock.released", within=grace / 1000 + 0.4)
    got = await watcher.request("order.get", order_id="o")
    assert [lock["token"] for lock in got["locks"]] == [token]
    paid = await back.request("payment.complete", order_id="o", token=token, version=1,
                              amount_cents=1000, payment_ref="after-reconnect")
    assert paid["ok"], paid


async def test_one_of_two_connections_closing_starts_no_grace(store: Store) -> None:
    await store.config(disconnect_grace_ms=100)
    first = await store.erp("cashier")
    second = await store.connect("erp_main", "cashier")
    watcher = await store.connect("manager", "dash")
    await watcher.request("subscribe", channel=store.channel())
    await store.publish(first, order_id="o")
    assert (await first.request("lock.acquire", order_id="o", kind="order"))["ok"]
    await first.close()
    await watcher.no_event("lock.released", within=0.4)
    await watcher.no_event("terminal.offline", within=0.01)
    await second.close()
    event = await watcher.event("lock.released", timeout=2)
    assert event["reason"] == "holder_disconnected"


async def test_resume_restores_order_subscription_and_replays_in_order(store: Store) -> None:
    grace = 5000
    await store.config(disconnect_grace_ms=grace)
    screen = await store.erp("screen")
    other = await store.connect("erp_secondary", "other")
    await store.publish(other, order_id="o")
    sub = await screen.request("subscribe", channel=store.channel("o"))
    seq = sub["seq"]
    session_id = screen.hello["session_id"]
    await store.disconnect(screen)

    for version in (2, 3, 4):
        assert (await store.publish(other, order_id="o", version=version))["ok"]
    assert (await other.request("lock.acquire", order_id="o", kind="order"))["ok"]

    back = await store.erp("screen", resume=session_id)
    assert back.hello["resumed"] is True
    replayed = await back.collect(4)
    assert [e["seq"] for e in replayed] == [seq + 1, seq + 2, seq + 3, seq + 4]
    assert [e["event"] for e in replayed] == ["order.updated"] * 3 + ["lock.acquired"]
    assert [e["order"]["version"] for e in replayed[:3]] == [2, 3, 4]
    # The subscription is live again: the next event follows without a gap.
    assert (await store.publish(other, order_id="o", version=5, token=replayed[3]["lock"]["token"])
            )["ok"]
    live = await back.event("order.updated")
    assert live["seq"] == seq + 5 and live["order"]["version"] == 5
    # ...and nothing came before the hello reply.
    assert back.frames[0]["id"] == 1 and back.frames[0]["ok"] is True


async def test_resume_replays_missed_store_channel_events(store: Store) -> None:
    """The terminal's own terminal.online on its return must not jump ahead of the replay."""
    await store.config(disconnect_grace_ms=5000)
    screen = await store.erp("screen")
    other = await store.connect("erp_secondary", "other")
    sub = await screen.request("subscribe", channel=store.channel())
    session_id = screen.hello["session_id"]
    await store.disconnect(screen)
    delivered = max([sub["seq"]] + [e["seq"] for e in screen.frames if e.get("type") == "event"])

    for version in (1, 2, 3):
        assert (await store.publish(other, order_id="o", version=version))["ok"]

    back = await store.erp("screen", resume=session_id)
    assert back.hello["resumed"] is True
    await back.request("ping")  # the replay is queued before this reply
    # The hello reply comes first; the missed events follow, in order and without a gap.
    assert back.frames[0].get("id") == 1, back.frames[0]
    events = [e for e in back.frames if e.get("type") == "event"]
    assert [e["seq"] for e in events] == list(range(delivered + 1, delivered + 1 + len(events)))
    assert [e["order"]["version"] for e in events if e["event"] == "order.updated"] == [1, 2, 3]
    assert events[-1]["event"] == "terminal.online"
    assert events[-1]["terminal"]["terminal_id"] == "screen"


async def test_renewal_moves_expires_at_and_publishes_nothing(store: Store) -> None:
    ttl = 60_000
    await store.config(erp_lock_ttl_ms=ttl)
    cashier = await store.erp("cashier")
    other = await store.connect("erp_secondary", "other")
    phone = await store.connect("h5", "phone", table="t1")
    await store.publish(cashier, order_id="o")
    watcher = await store.connect("manager", "dash")
    await watcher.request("subscribe", channel=store.channel("o"))
    held = await cashier.request("lock.acquire", order_id="o", kind="order")
    lock = held["lock"]
    assert lock["expires_at"] - lock["acquired_at"] == ttl
    await watcher.event("lock.acquired")

    await asyncio.sleep(0.02)  # let the broker's clock move on, so that a renewal shows
    before = (await cashier.request("ping"))["server_time"]
    renewed = await cashier.request("lock.renew", order_id="o", kind="order",
                                    token=lock["token"])
    assert renewed["ok"], renewed
    new = renewed["lock"]
    assert new["token"] == lock["token"] and new["acquired_at"] == lock["acquired_at"]
    assert new["expires_at"] > lock["expires_at"]
    assert new["expires_at"] - ttl >= before

    await asyncio.sleep(0.02)
    again = await cashier.request("lock.acquire", order_id="o", kind="order")  # idempotent
    assert again["ok"] and again["lock"]["token"] == lock["token"]
    assert again["lock"]["expires_at"] > new["expires_at"]
    await watcher.no_event(None, within=0.3)
    got = await watcher.request("order.get", order_id="o")
    assert got["locks"][0]["expires_at"] == again["lock"]["expires_at"]

    assert (await other.request("lock.renew", order_id="o", kind="order", token=lock["token"])
            )["error"]["code"] == "NOT_HOLDER"
    assert (await cashier.request("lock.renew", order_id="o", kind="order",
                                  token=lock["token"] - 1))["error"]["code"] == "FENCED"
    assert (await phone.request("lock.renew", order_id="o", kind="payment", token=lock["token"])
            )["error"]["code"] == "FORBIDDEN"


async def test_a_session_of_another_terminal_is_not_resumed(store: Store) -> None:
    await store.config(disconnect_grace_ms=5000)
    victim = await store.erp("victim")
    await store.publish(victim, order_id="o")
    await victim.request("subscribe", channel=store.channel("o"))
    session_id = victim.hello["session_id"]
    await store.disconnect(victim)
    thief = await store.erp("thief", resume=session_id)
    assert thief.hello["resumed"] is False and thief.hello["session_id"] != session_id
    assert (await store.publish(thief, order_id="o",
                                version=2))["ok"]
    await thief.no_event(None, within=0.2)  # the victim's subscription was not handed over


async def test_h5_reacquire_returns_its_lock_without_renewing_it(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    phone = await store.connect("h5", "phone", table="t1")
    first = await phone.request("lock.acquire", order_id="o", kind="payment")
    await asyncio.sleep(0.02)  # let the broker's clock move on, so that a renewal would show
    again = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert again["ok"] and again["lock"] == first["lock"], (first, again)
    other = await store.connect("erp_secondary", "other")
    for params in ({}, {"token": first["lock"]["token"]}):
        reply = await other.request("lock.release", order_id="o", kind="payment", **params)
        assert reply["error"]["code"] == "NOT_HOLDER", reply
    assert (await other.request("lock.release", order_id="o", kind="order"))["error"][
        "code"] == "NOT_HOLDER"
