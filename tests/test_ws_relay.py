"""Pulling the latest order from the ERP (`order.fetch`) for h5 payment locks (SCENARIO 9)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from .conftest import Store
from .support import WsClient, order

ERP_UNAVAILABLE = {
    "en": "Could not get the latest order. Please pay at the front desk.",
    "zh-CN": "获取订单失败，请到前台结账",
}
FETCH_TIMEOUT_MS = 500


def recording(client: WsClient, answer: dict[str, Any] | None,
              ) -> list[dict[str, Any]]:
    """Make `client` answer every rpc with `answer` (None: stay silent); returns the calls."""
    calls: list[dict[str, Any]] = []

    async def handler(frame: dict[str, Any]) -> dict[str, Any] | None:
        calls.append(frame)
        return answer

    client.rpc_handler = handler
    return calls


async def test_h5_payment_lock_is_taken_on_the_freshly_pulled_order(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", table_id="t1", amount_cents=1000)
    # The ERP has moved on (version 3, 1600) without publishing it yet.
    latest = order("o", table_id="t1", version=3, amount_cents=1600)
    calls = recording(erp, {"ok": True, "result": {"order": latest}})
    phone = await store.connect("h5", "phone", table="t1")

    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["ok"], pay
    assert pay["lock"]["order_version"] == 3 and pay["order"] == latest
    assert len(calls) == 1
    call = calls[0]
    assert call["type"] == "rpc" and call["method"] == "order.fetch"
    assert call["params"] == {"order_id": "o"} and call["rid"]
    got = await erp.request("order.get", order_id="o")
    assert got["order"] == latest
    paid = await store.service_pay("o", token=pay["lock"]["token"], version=3,
                                   amount_cents=1600, payment_ref="fresh")
    assert paid["ok"], paid


async def test_h5_payment_lock_on_an_order_the_broker_never_saw(store: Store) -> None:
    erp = await store.erp("erp")
    erp.orders["new"] = order("new", table_id="t2", version=4, amount_cents=700)  # type: ignore[attr-defined]
    phone = await store.connect("h5", "phone", table="t2")
    pay = await phone.request("lock.acquire", order_id="new", kind="payment")
    assert pay["ok"], pay
    assert pay["lock"]["order_version"] == 4 and pay["order"]["amount_cents"] == 700


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
async def test_silent_erp_gives_erp_unavailable_after_the_timeout(store: Store,
                                                                  locale: str) -> None:
    """SCENARIO 9: the ERP does not answer; the phone is told to pay at the front desk."""
    await store.config(erp_fetch_timeout_ms=FETCH_TIMEOUT_MS)
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    calls = recording(erp, None)
    phone = await store.connect("h5", "phone", table="t1", locale=locale)

    started = time.monotonic()
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    waited = (time.monotonic() - started) * 1000
    assert pay["ok"] is False
    assert pay["error"]["code"] == "ERP_UNAVAILABLE"
    assert pay["error"]["message"] == ERP_UNAVAILABLE[locale]
    assert pay["error"]["can_force"] is False
    assert FETCH_TIMEOUT_MS - 20 <= waited <= FETCH_TIMEOUT_MS + 1000, waited
    assert len(calls) == 1
    got = await erp.request("order.get", order_id="o")
    assert got["locks"] == []


async def test_other_frames_are_served_while_a_pull_is_pending(store: Store) -> None:
    await store.config(erp_fetch_timeout_ms=FETCH_TIMEOUT_MS)
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    recording(erp, None)
    phone = await store.connect("h5", "phone", table="t1")
    pending = asyncio.ensure_future(phone.request("lock.acquire", order_id="o", kind="payment"))
    started = time.monotonic()
    assert (await phone.request("ping"))["ok"]
    assert time.monotonic() - started < FETCH_TIMEOUT_MS / 1000 / 2
    assert (await pending)["error"]["code"] == "ERP_UNAVAILABLE"


async def test_no_erp_online_gives_erp_unavailable_at_once(store: Store) -> None:
    await store.config(erp_fetch_timeout_ms=5000)
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    await store.disconnect(erp)
    phone = await store.connect("h5", "phone", table="t1")
    for oid in ("o", "never-seen"):
        started = time.monotonic()
        pay = await phone.request("lock.acquire", order_id=oid, kind="payment")
        assert time.monotonic() - started < 1.0
        assert pay["error"]["code"] == "ERP_UNAVAILABLE", pay
        assert pay["error"]["message"] == ERP_UNAVAILABLE["en"]
    screen = await store.connect("manager", "dash")
    assert (await screen.request("order.get", order_id="o"))["locks"] == []
    assert (await screen.request("order.get", order_id="never-seen"))["error"]["code"] == (
        "NOT_FOUND")


async def test_erp_answering_an_error_gives_erp_unavailable(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    calls = recording(erp, {"ok": False, "error": {"code": "DB_DOWN", "message": "db down"}})
    phone = await store.connect("h5", "phone", table="t1")
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["error"]["code"] == "ERP_UNAVAILABLE", pay
    assert len(calls) == 1
    assert (await erp.request("order.get", order_id="o"))["locks"] == []


async def test_pulled_order_of_another_table_is_forbidden(store: Store) -> None:
    erp = await store.erp("erp")
    erp.orders["x"] = order("x", table_id="t9")  # type: ignore[attr-defined]
    phone = await store.connect("h5", "phone", table="t1")
    pay = await phone.request("lock.acquire", order_id="x", kind="payment")
    assert pay["error"]["code"] == "FORBIDDEN", pay
    got = await erp.request("order.get", order_id="x")
    assert got["locks"] == []


async def test_order_get_fresh_pulls_from_the_erp(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", table_id="t1")
    erp.orders["o"] = order("o", table_id="t1", version=2, amount_cents=2000)  # type: ignore[attr-defined]
    phone = await store.connect("h5", "phone", table="t1")

    stale = await phone.request("order.get", order_id="o")
    assert stale["order"]["version"] == 1
    fresh = await phone.request("order.get", order_id="o", fresh=True)
    assert fresh["ok"] and fresh["order"]["version"] == 2, fresh
    by_table = await phone.request("order.get", table_id="t1", fresh=True)
    assert by_table["ok"] and by_table["order"]["amount_cents"] == 2000, by_table
    assert (await erp.request("order.get", order_id="o"))["order"]["version"] == 2

    await store.disconnect(erp)
    gone = await phone.request("order.get", order_id="o", fresh=True)
    assert gone["error"]["code"] == "ERP_UNAVAILABLE"


async def test_order_authority_secondary_answers_without_an_erp_main(store: Store) -> None:
    main = await store.erp("main")
    await store.publish(main, order_id="o", table_id="t1")
    backup = await store.erp("backup", role="erp_secondary", order_authority=True)
    plain = await store.erp("plain", role="erp_secondary")
    backup.orders["o"] = order("o", table_id="t1", version=2, amount_cents=1200)  # type: ignore[attr-defined]
    main_calls = recording(main, {"ok": True, "result": {
        "order": order("o", table_id="t1", version=5, amount_cents=5000)}})
    plain_calls = recording(plain, None)
    phone = await store.connect("h5", "phone", table="t1")

    # While the erp_main is online, it is the one asked.
    first = await phone.request("order.get", order_id="o", fresh=True)
    assert first["order"]["version"] == 5 and len(main_calls) == 1

    await store.disconnect(main)
    backup.orders["o"] = order("o", table_id="t1", version=6, amount_cents=1200)  # type: ignore[attr-defined]
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["ok"], pay
    assert pay["lock"]["order_version"] == 6
    assert plain_calls == []


async def test_only_the_asked_terminal_may_answer(store: Store) -> None:
    """An rpc.result from a terminal that was not asked is ignored."""
    await store.config(erp_fetch_timeout_ms=FETCH_TIMEOUT_MS)
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", amount_cents=1000)
    asked = recording(erp, None)
    intruder = await store.connect("erp_secondary", "intruder")
    phone = await store.connect("h5", "phone", table="t1")
    pending = asyncio.ensure_future(phone.request("lock.acquire", order_id="o", kind="payment"))
    while not asked:  # the rpc reaches the ERP after one round trip
        await erp.request("ping")
    forged = order("o", table_id="t1", version=9, amount_cents=1)
    await intruder.send_raw(json.dumps({"type": "rpc.result", "rid": asked[0]["rid"],
                                        "ok": True, "result": {"order": forged}}))
    reply = await pending
    assert reply["error"]["code"] == "ERP_UNAVAILABLE", reply
    got = await erp.request("order.get", order_id="o")
    assert got["order"]["version"] == 1 and got["locks"] == []


async def test_an_answer_about_another_order_is_not_taken(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    recording(erp, {"ok": True, "result": {"order": order("other", table_id="t1", version=7)}})
    phone = await store.connect("h5", "phone", table="t1")
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    assert pay["error"]["code"] == "ERP_UNAVAILABLE", pay
    assert (await erp.request("order.get", order_id="o"))["locks"] == []


async def test_h5_pay_under_a_pre_bill_stays_at_the_presettled_version(store: Store) -> None:
    """PROTOCOL.md 2: a payment lock taken while a presettle lock is held is granted at the
    presettled version; nothing is overwritten silently."""
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", amount_cents=1000)
    pre = await erp.request("lock.acquire", order_id="o", kind="presettle")
    assert pre["ok"], pre
    # The ERP's own copy moved on after the bill was printed, without a publish.
    erp.orders["o"] = order("o", version=2, amount_cents=5555)  # type: ignore[attr-defined]
    phone = await store.connect("h5", "phone", table="t1")
    pay = await phone.request("lock.acquire", order_id="o", kind="payment")
    if pay["ok"]:
        assert pay["lock"]["order_version"] == pre["lock"]["order_version"], pay["lock"]
    got = await erp.request("order.get", order_id="o")
    assert got["order"]["version"] == 1 and got["order"]["amount_cents"] == 1000, got["order"]
