"""Channels: snapshots, `since` recovery, presence, and what an h5 may see (invariants 5, 6)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .conftest import Store
from .support import BrokerProcess, WsClient, order

Event = dict[str, Any]


async def events_until(client: WsClient, done: Callable[[list[Event]], bool],
                       timeout: float = 5.0) -> list[Event]:
    """Every event, in order, until `done(all so far)` holds."""
    seen: list[Event] = []
    while not done(seen):
        seen.append(await client.event(None, timeout=timeout))
    return seen


def contiguous(events: list[Event], after: int) -> None:
    assert [e["seq"] for e in events] == list(range(after + 1, after + 1 + len(events))), [
        (e["seq"], e["event"]) for e in events]


async def test_since_recovers_exactly_the_missed_events(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    screen = await store.connect("erp_secondary", "screen")
    order_sub = await screen.request("subscribe", channel=store.channel("o"))
    store_sub = await screen.request("subscribe", channel=store.channel())
    await store.disconnect(screen)

    assert (await store.publish(erp, order_id="o", version=2))["ok"]
    held = await erp.request("lock.acquire", order_id="o", kind="order")
    assert (await erp.request("lock.release", order_id="o", kind="order",
                              token=held["lock"]["token"]))["ok"]
    assert (await store.publish(erp, order_id="o", version=3, amount_cents=3300))["ok"]

    back = await store.connect("erp_secondary", "screen")
    got = await back.request("subscribe", channel=store.channel("o"), since=order_sub["seq"])
    assert got["ok"] and got["recovered"] is True, got
    missed = got["missed"]
    contiguous(missed, order_sub["seq"])
    assert [e["event"] for e in missed] == ["order.updated", "lock.acquired", "lock.released",
                                            "order.updated"]
    assert all(e["channel"] == store.channel("o") for e in missed)
    assert got["seq"] == missed[-1]["seq"]
    assert missed[-1]["order"]["version"] == 3
    assert got["snapshot"]["order"]["version"] == 3 and got["snapshot"]["locks"] == []

    got = await back.request("subscribe", channel=store.channel(), since=store_sub["seq"])
    assert got["recovered"] is True
    contiguous(got["missed"], store_sub["seq"])
    assert got["seq"] == got["missed"][-1]["seq"]
    kinds = [e["event"] for e in got["missed"]]
    assert kinds.count("order.updated") == 2 and "terminal.offline" in kinds

    # Nothing missed: recovered, and an empty list.
    again = await back.request("subscribe", channel=store.channel("o"), since=missed[-1]["seq"])
    assert again["recovered"] is True and again["missed"] == []
    # The subscription is live and continues after the reply's seq.
    assert (await store.publish(erp, order_id="o", version=4))["ok"]
    live = await back.event("order.updated", where=lambda e: e["channel"] == store.channel("o"))
    assert live["seq"] == again["seq"] + 1


async def test_since_beyond_the_channel_gets_a_fresh_snapshot(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", amount_cents=700)
    lock = (await erp.request("lock.acquire", order_id="o", kind="payment"))["lock"]
    screen = await store.connect("manager", "dash")
    current = await screen.request("subscribe", channel=store.channel("o"))
    for since in (current["seq"] + 1, current["seq"] + 10_000):
        got = await screen.request("subscribe", channel=store.channel("o"), since=since)
        assert got["ok"] and got["recovered"] is False, got
        assert not got.get("missed")
        assert got["seq"] == current["seq"]
        assert got["snapshot"]["order"]["amount_cents"] == 700
        assert [held["token"] for held in got["snapshot"]["locks"]] == [lock["token"]]


SMALL_HISTORY = 16
BEYOND_HISTORY = 400  # far past the bound, even for Redis's approximate (~100) stream trimming


async def test_since_older_than_the_history_gets_a_fresh_snapshot(
        backend_url: str, broker_factory: Callable[..., BrokerProcess]) -> None:
    """History is bounded: far enough back, `recovered: false` and a snapshot to trust."""
    small = broker_factory(backend=backend_url, env={
        "TABLELOCK_HISTORY_SIZE": str(SMALL_HISTORY),
        "TABLELOCK_RATE_PER_S": "100000", "TABLELOCK_RATE_BURST": "100000",
        "TABLELOCK_DRAIN_WINDOW_S": "0"}).start()
    store = Store(small)
    try:
        erp = await store.erp("erp")
        screen = await store.connect("manager", "dash")
        await store.publish(erp, order_id="o")
        first = await screen.request("subscribe", channel=store.channel("o"))
        await screen.request("unsubscribe", channel=store.channel("o"))
        bodies = [order("o", version=v, amount_cents=v) for v in range(2, 2 + BEYOND_HISTORY)]
        for body in bodies:  # pipelined: sent back to back, answered in order
            await erp.send_raw(json.dumps({"id": f"p{body['version']}", "type": "order.publish",
                                           "order": body, "change": "modify"}))
        last = await erp.next_reply(f"p{bodies[-1]['version']}", timeout=20)
        assert last["ok"], last

        old = await screen.request("subscribe", channel=store.channel("o"), since=first["seq"])
        assert old["recovered"] is False, {k: v for k, v in old.items() if k != "missed"}
        assert not old.get("missed")
        assert old["snapshot"]["order"]["version"] == bodies[-1]["version"]
        assert old["seq"] == first["seq"] + len(bodies)
        recent = await screen.request("subscribe", channel=store.channel("o"),
                                      since=old["seq"] - 5)
        assert recent["recovered"] is True
        contiguous(recent["missed"], old["seq"] - 5)
        assert [e["order"]["version"] for e in recent["missed"]] == [
            b["version"] for b in bodies[-5:]]
    finally:
        await store.close()


async def test_presence_on_the_store_channel(store: Store) -> None:
    dash = await store.connect("manager", "dash")
    sub = await dash.request("subscribe", channel=store.channel())
    assert [t["terminal_id"] for t in sub["snapshot"]["terminals"]] == ["dash"]
    order_watcher = await store.erp("order-watcher")
    await store.publish(order_watcher, order_id="o")
    await order_watcher.request("subscribe", channel=store.channel("o"))
    online = await dash.event("terminal.online")
    assert online["terminal"]["terminal_id"] == "order-watcher"

    till = await store.connect("erp_main", "till")
    till_again = await store.connect("erp_main", "till")
    phone = await store.connect("h5", "phone", table="t5")
    events = await dash.collect(2, "terminal.online")
    assert [e["terminal"] for e in events] == [
        {"terminal_id": "till", "role": "erp_main", "name": "till",
         "store_id": store.store_id, "table_id": None},
        {"terminal_id": "phone", "role": "h5", "name": "phone", "store_id": store.store_id,
         "table_id": "t5"},
    ]
    snap = (await dash.request("subscribe", channel=store.channel()))["snapshot"]
    assert sorted(t["terminal_id"] for t in snap["terminals"]) == [
        "dash", "order-watcher", "phone", "till"]

    await till.close()
    await dash.no_event("terminal.offline", within=0.3)  # the till is still on another screen
    await till_again.close()
    await phone.close()
    offline = await dash.collect(2, "terminal.offline")
    assert sorted(e["terminal"]["terminal_id"] for e in offline) == ["phone", "till"]
    # Presence is on the store channel only.
    await order_watcher.no_event("terminal.online", within=0.05)
    assert not [e for e in order_watcher.drain_events() if e["event"].startswith("terminal.")]


def fold_order(snapshot: dict[str, Any], events: list[Event]) -> dict[str, Any]:
    state = {"order": snapshot["order"],
             "locks": {lock["kind"]: lock for lock in snapshot["locks"]}}
    for e in events:
        name = e["event"]
        if name in ("order.updated", "order.paid"):
            state["order"] = e["order"]
        elif name == "lock.acquired":
            state["locks"][e["lock"]["kind"]] = e["lock"]
        elif name in ("lock.released", "lock.expired", "lock.forced"):
            held = state["locks"].get(e["lock"]["kind"])
            assert held is not None and held["token"] == e["lock"]["token"], (e, held)
            del state["locks"][e["lock"]["kind"]]
    return state


def fold_store(snapshot: dict[str, Any], events: list[Event]) -> dict[str, Any]:
    orders = {o["order_id"]: o for o in snapshot["orders"]}
    locks = {(lock["order_id"], lock["kind"]): lock for lock in snapshot["locks"]}
    terminals = {t["terminal_id"]: t for t in snapshot["terminals"]}
    for e in events:
        name = e["event"]
        if name in ("order.updated", "order.paid"):
            if e["order"]["status"] == "open":
                orders[e["order"]["order_id"]] = e["order"]
            else:
                orders.pop(e["order"]["order_id"], None)
        elif name == "lock.acquired":
            locks[(e["lock"]["order_id"], e["lock"]["kind"])] = e["lock"]
        elif name in ("lock.released", "lock.expired", "lock.forced"):
            key = (e["lock"]["order_id"], e["lock"]["kind"])
            assert locks.get(key, {}).get("token") == e["lock"]["token"], (e, locks.get(key))
            del locks[key]
        elif name == "terminal.online":
            terminals[e["terminal"]["terminal_id"]] = e["terminal"]
        elif name == "terminal.offline":
            terminals.pop(e["terminal"]["terminal_id"], None)
    return {"orders": orders, "locks": locks, "terminals": terminals}


def comparable_lock(lock: dict[str, Any]) -> dict[str, Any]:
    """Renewals move an ERP lock's expires_at silently (invariant 6 allows it)."""
    if lock["holder"]["role"] == "h5":
        return lock
    return {k: v for k, v in lock.items() if k != "expires_at"}


def store_state(snapshot: dict[str, Any]) -> dict[str, Any]:
    return fold_store(snapshot, [])


async def test_snapshot_plus_events_is_the_current_state(store: Store) -> None:
    """Invariant 6, on an order channel and on the store channel, through a busy minute."""
    erp1 = await store.erp("erp1")
    erp2 = await store.connect("erp_secondary", "erp2")
    await store.publish(erp1, order_id="a", table_id="t1")
    await store.publish(erp1, order_id="b", table_id="t2", amount_cents=2000)
    edit_a = (await erp1.request("lock.acquire", order_id="a", kind="order"))["lock"]
    phone = await store.connect("h5", "phone", table="t2")

    observer = await store.connect("manager", "observer")
    snap_store = await observer.request("subscribe", channel=store.channel())
    snap_a = await observer.request("subscribe", channel=store.channel("a"))

    # The busy minute.
    assert (await store.publish(erp2, order_id="c", table_id="t3"))["ok"]
    assert (await erp1.request("lock.renew", order_id="a", kind="order",
                               token=edit_a["token"]))["ok"]
    assert (await store.publish(erp1, order_id="a", table_id="t1", version=2,
                                amount_cents=1500, token=edit_a["token"]))["ok"]
    pay_a = await erp1.request("lock.acquire", order_id="a", kind="payment")  # upgrade
    assert [lk["token"] for lk in pay_a["released"]] == [edit_a["token"]]
    phone_pay = await phone.request("lock.acquire", order_id="b", kind="payment")
    assert phone_pay["ok"], phone_pay
    forced = await erp2.request("lock.acquire", order_id="b", kind="payment", force=True)
    assert forced["ok"], forced
    assert (await erp2.request("payment.complete", order_id="b", token=forced["lock"]["token"],
                               version=1, amount_cents=2000, payment_ref="b-1"))["ok"]
    pre_c = (await erp1.request("lock.acquire", order_id="c", kind="presettle"))["lock"]
    assert (await erp2.request("lock.release", order_id="c", kind="presettle", force=True))["ok"]
    assert pre_c["token"]
    assert (await store.publish(erp2, "status", order_id="c", table_id="t3", version=2,
                                status="closed"))["ok"]
    await phone.close()
    late = await store.connect("erp_secondary", "late")
    assert (await store.publish(late, order_id="sentinel"))["ok"]

    def settled(seen: list[Event]) -> bool:
        names = [(e["event"], (e.get("order") or {}).get("order_id")) for e in seen]
        return (("order.updated", "sentinel") in names
                and any(e["event"] == "terminal.offline" for e in seen))

    events = await events_until(observer, settled)
    store_events = [e for e in events if e["channel"] == store.channel()]
    a_events = [e for e in events if e["channel"] == store.channel("a")]
    contiguous(store_events, snap_store["seq"])
    contiguous(a_events, snap_a["seq"])

    now_store = await observer.request("subscribe", channel=store.channel())
    now_a = await observer.request("subscribe", channel=store.channel("a"))
    assert now_store["seq"] == store_events[-1]["seq"]
    assert now_a["seq"] == a_events[-1]["seq"]

    folded = fold_store(snap_store["snapshot"], store_events)
    current = store_state(now_store["snapshot"])
    assert folded["orders"] == current["orders"]
    assert folded["terminals"] == current["terminals"]
    assert {k: comparable_lock(v) for k, v in folded["locks"].items()} == {
        k: comparable_lock(v) for k, v in current["locks"].items()}
    assert sorted(current["orders"]) == ["a", "sentinel"]

    folded_a = fold_order(snap_a["snapshot"], a_events)
    assert folded_a["order"] == now_a["snapshot"]["order"]
    assert {k: comparable_lock(v) for k, v in folded_a["locks"].items()} == {
        lock["kind"]: comparable_lock(lock) for lock in now_a["snapshot"]["locks"]}


async def test_h5_sees_only_its_own_tables_order_events(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="mine", table_id="t1")
    phone = await store.connect("h5", "phone", table="t1")
    mine = await phone.request("subscribe", channel=store.channel("mine"))
    assert mine["ok"] and mine["snapshot"]["order"]["table_id"] == "t1"
    # Subscribing to an order not seen yet is allowed; it turns out to be another table's.
    later = await phone.request("subscribe", channel=store.channel("later"))
    assert later["ok"] and later["snapshot"]["order"] is None

    assert (await store.publish(erp, order_id="later", table_id="t2"))["ok"]
    held = await erp.request("lock.acquire", order_id="later", kind="payment")
    assert held["ok"]
    assert (await store.publish(erp, order_id="mine", table_id="t1", version=2))["ok"]
    seen = await phone.event("order.updated")
    assert seen["channel"] == store.channel("mine") and seen["order"]["version"] == 2
    await phone.no_event(None, within=0.3)

    # The order moves to table t2: from then on the phone sees nothing of it.
    assert (await store.publish(erp, order_id="mine", table_id="t2", version=3))["ok"]
    assert (await erp.request("lock.acquire", order_id="mine", kind="order"))["ok"]
    await phone.no_event(None, within=0.3)
    assert (await phone.request("order.get", order_id="mine"))["error"]["code"] == "FORBIDDEN"
