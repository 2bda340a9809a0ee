"""A phone is not trusted: each attack of the internet edge (trust part), on real brokers.

Every test performs the attack against a broker process and asserts what must happen
instead; the `store` fixture runs each on both backends.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tablelock.prompts import prompt

from .conftest import Store
from .redis_support import RedisServer
from .support import BrokerProcess, WsClient, unique
from .test_hardening import BrokerFactory, metric, refused_hello, scrape, start_broker

MAX_SAFE_INT = 2**53 - 1


async def service_pays(store: Store, order_id: str, **body: Any) -> tuple[int, Any]:
    """The platform's payment service records a phone's payment (HTTP, role `service`)."""
    return await store.http("POST", f"/orders/{order_id}/payment", role="service", body=body)


def raw_http(method: str, url: str, token: str, data: bytes) -> tuple[int, Any]:
    """An HTTP call with a body sent as is (json.dumps cannot even build the nested ones)."""
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def say_hello(store: Store, role: str, sub: str | None = None, table: str | None = None,
                    **hello: Any) -> tuple[dict[str, Any], int | None, WsClient]:
    """A hello that may be refused: its reply, the close code if it was closed, the client."""
    client = await WsClient.connect(store.broker.url, hello=False)
    store.clients.append(client)
    reply = await client.request("hello", token=store.token(role, sub, table), protocol=1,
                                 locale="en", **hello)
    code = None if reply["ok"] else await client.closed()
    return reply, code, client


# --- 1. a phone never records a payment ----------------------------------------------------

@pytest.mark.parametrize("strong_link", [True, False], ids=["strong", "loose"])
async def test_a_phone_that_records_its_own_payment_is_forbidden(store: Store,
                                                                 strong_link: bool) -> None:
    await store.config(strong_link=strong_link)
    erp = await store.erp("till")
    await store.publish(erp, order_id="o1", amount_cents=1000)
    phone = await store.connect("h5", table="t1")
    pay = await phone.request("lock.acquire", order_id="o1", kind="payment")
    assert pay["ok"], pay
    token = pay["lock"]["token"] if strong_link else None
    assert (token is not None) == strong_link
    for attempt in ({"version": 1, "amount_cents": 1000, "payment_ref": "wx-1"},
                    {"version": 1, "amount_cents": 1, "payment_ref": "forged"}):
        refused = await phone.request("payment.complete", order_id="o1", token=token, **attempt)
        assert refused["error"]["code"] == "FORBIDDEN", refused
    got = await erp.request("order.get", order_id="o1")
    assert got["order"]["status"] == "open"
    assert [lock["kind"] for lock in got["locks"]] == (["payment"] if strong_link else [])
    # Nothing was written: no payment of any kind in the audit log.
    assert not [e for e in await store.audit() if e["kind"].startswith("payment.")]
    # The payment service records it, with the phone's lock token.
    status, body = await service_pays(store, "o1", token=token, version=1, amount_cents=1000,
                                      payment_ref="wx-1")
    assert status == 200 and body["order"]["status"] == "paid", body
    # An ERP or manager holder still records its own counter payment.
    await store.publish(erp, order_id="o2", table_id="t2", amount_cents=500)
    manager = await store.connect("manager")
    held = await manager.request("lock.acquire", order_id="o2", kind="payment")
    paid = await manager.request("payment.complete", order_id="o2", version=1, amount_cents=500,
                                 payment_ref="cash-1",
                                 token=held["lock"]["token"] if strong_link else None)
    assert paid["ok"] and paid["order"]["status"] == "paid", paid


# --- 2. only an ERP terminal may answer order.fetch ----------------------------------------

async def test_a_phone_that_claims_order_authority_cannot_forge_orders(store: Store) -> None:
    # No erp_main is online: the attacker offers to answer the store's pulls, with its own
    # bill at 1 cent.
    forged: list[dict[str, Any]] = []
    reply, code, attacker = await say_hello(store, "h5", table="t1", order_authority=True)

    async def forge(frame: dict[str, Any]) -> dict[str, Any]:
        forged.append(frame)
        order = {"order_id": frame["params"].get("order_id", "o1"), "table_id": "t1",
                 "version": 1, "amount_cents": 1, "items": []}
        return {"ok": True, "result": {"order": order}}

    attacker.rpc_handler = forge
    assert reply["error"]["code"] == "FORBIDDEN" and code == 4003, reply
    for role in ("manager", "service"):
        reply, code, _ = await say_hello(store, role, order_authority=True)
        assert reply["error"]["code"] == "FORBIDDEN" and code == 4003, (role, reply)
    phone = await store.connect("h5", table="t1")
    pulled = await phone.request("lock.acquire", order_id="o1", kind="payment", timeout=10)
    assert pulled["error"]["code"] == "ERP_UNAVAILABLE", pulled
    fresh = await phone.request("order.get", table_id="t1", fresh=True, timeout=10)
    assert fresh["error"]["code"] == "ERP_UNAVAILABLE", fresh
    assert forged == []
    # An ERP terminal that says it is still welcome, and it is the one asked.
    backup = await store.erp("backup", role="erp_secondary", order_authority=True)
    await store.publish(backup, order_id="o1", amount_cents=4200)
    pay = await phone.request("lock.acquire", order_id="o1", kind="payment", timeout=10)
    assert pay["ok"] and pay["order"]["amount_cents"] == 4200, pay


# --- 3. HTTP refusals in the store's locale ------------------------------------------------

@pytest.mark.parametrize("locale", ["en", "zh-CN"])
async def test_http_refusals_speak_the_stores_locale(store: Store, locale: str) -> None:
    await store.config(locale=locale)
    erp = await store.erp("till")
    await store.publish(erp, order_id="o1")
    pay = await erp.request("lock.acquire", order_id="o1", kind="payment")
    token = pay["lock"]["token"]
    status, body = await service_pays(store, "o1", token=token, version=2, amount_cents=1000,
                                      payment_ref="p1")
    assert status == 409 and body["error"]["code"] == "STALE_VERSION", body
    assert body["error"]["message"] == {
        "en": "The order has changed. Please refresh it before paying.",
        "zh-CN": "订单已变更，请刷新后再支付"}[locale]
    assert (await service_pays(store, "o1", token=token, version=1, amount_cents=1000,
                               payment_ref="p2"))[0] == 200
    status, body = await service_pays(store, "o1", token=token, version=1, amount_cents=1000,
                                      payment_ref="p3")
    assert status == 409 and body["error"]["message"] == {
        "en": "This order has already been paid.", "zh-CN": "订单已支付"}[locale], body
    # Other errors of a known store: unknown order, wrong role, bad body.
    for (status, body), (expected, code) in [
            (await store.http("GET", "/orders/nope"), (404, "NOT_FOUND")),
            (await store.http("GET", "/audit", role="erp_main"), (403, "FORBIDDEN")),
            (await store.http("PUT", "/config", body={"locale": "fr"}), (400, "BAD_REQUEST"))]:
        assert status == expected and body["error"]["code"] == code, body
        assert body["error"]["message"].startswith(prompt(code, locale)), body


# --- 4. a phone whose sub is a till's is not the till --------------------------------------

async def test_a_phone_with_a_tills_sub_is_not_the_till(store: Store) -> None:
    till = await store.erp("till-1")
    await store.publish(till, order_id="o1")
    order_lock = (await till.request("lock.acquire", order_id="o1", kind="order"))["lock"]
    impostor = await store.connect("h5", "till-1", table="t1")
    assert impostor.hello["terminal"]["terminal_id"] == "till-1"  # the wire keeps the sub
    released = await impostor.request("lock.release", order_id="o1", kind="payment")
    assert released["error"]["code"] == "NOT_HOLDER", released
    # It once took the till's order lock over as `upgraded`: now the lock blocks it.
    upgraded = await impostor.request("lock.acquire", order_id="o1", kind="payment")
    assert upgraded["error"]["code"] == "ORDER_LOCKED", upgraded
    contended = await till.event("lock.contended")
    assert contended["direct"] and contended["by"]["role"] == "h5", contended
    got = await till.request("order.get", order_id="o1")
    assert got["locks"] == [order_lock]
    # The till's payment lock is not the phone's to release or to pay under either.
    assert (await till.request("lock.release", order_id="o1", kind="order",
                               token=order_lock["token"]))["ok"]
    pay = (await till.request("lock.acquire", order_id="o1", kind="payment"))["lock"]
    for kind, params in [("lock.release", {"kind": "payment", "token": pay["token"]}),
                         ("payment.complete", {"token": pay["token"], "version": 1,
                                               "amount_cents": 1000, "payment_ref": "p"})]:
        refused = await impostor.request(kind, order_id="o1", **params)
        assert refused["error"]["code"] in ("NOT_HOLDER", "FORBIDDEN"), refused
    # Direct events for the till (it subscribes to nothing) never reach the phone.
    other = await store.erp("till-2", role="erp_secondary")
    assert (await other.request("lock.acquire", order_id="o1", kind="payment")
            )["error"]["code"] == "PAYMENT_LOCKED"
    await till.event("lock.contended", where=lambda e: e["by"]["terminal_id"] == "till-2")
    assert (await other.request("lock.acquire", order_id="o1", kind="payment", force=True))["ok"]
    forced = await till.event("lock.forced")
    assert forced["direct"] and forced["lock"]["token"] == pay["token"], forced
    await impostor.request("ping")
    await impostor.no_event(None, within=0.5)
    assert not [f for f in impostor.frames if f.get("type") == "event"]


async def test_a_phone_online_with_a_tills_sub_does_not_keep_the_tills_locks(
        store: Store) -> None:
    await store.config(disconnect_grace_ms=0)
    watcher = await store.connect("manager")
    await watcher.request("subscribe", channel=store.channel())
    till = await store.erp("till-1")
    await store.publish(till, order_id="o1")
    assert (await till.request("lock.acquire", order_id="o1", kind="order"))["ok"]
    await store.connect("h5", "till-1", table="t1")  # the phone stays online
    await store.disconnect(till)
    released = await watcher.event("lock.released")
    assert released["reason"] == "holder_disconnected", released
    assert released["lock"]["holder"] == {"terminal_id": "till-1", "role": "erp_main",
                                          "name": "till-1"}


# --- 5. one set of input bounds for the WebSocket and HTTP ---------------------------------

OUT_OF_BOUNDS = {
    "negative amount": {"amount_cents": -1},
    "amount past 2^53": {"amount_cents": MAX_SAFE_INT + 1},
    "amount 2^70": {"amount_cents": 2**70},
    "negative version": {"version": -1},
    "version 2^70": {"version": 2**70},
    "token 2^70": {"token": 2**70},
    "negative token": {"token": -5},
    "long payment_ref": {"payment_ref": "r" * 129},
    "1 MB payment_ref": {"payment_ref": "r" * 1_000_000},
}


@pytest.mark.parametrize("bad", list(OUT_OF_BOUNDS), ids=list(OUT_OF_BOUNDS))
async def test_out_of_bounds_payments_are_refused_alike_by_websocket_and_http(
        store: Store, bad: str) -> None:
    erp = await store.erp("till")
    await store.publish(erp, order_id="o1")
    token = (await erp.request("lock.acquire", order_id="o1", kind="payment"))["lock"]["token"]
    body = {"token": token, "version": 1, "amount_cents": 1000, "payment_ref": "p1",
            **OUT_OF_BOUNDS[bad]}
    frame = json.dumps({"id": 7, "type": "payment.complete", "order_id": "o1", **body})
    if len(frame) < 60_000:  # a WebSocket frame that size is refused before it is read
        reply = await erp.raw_request(frame, reply_id=7)
        assert reply["error"]["code"] == "BAD_REQUEST", reply
    status, answer = await service_pays(store, "o1", **body)
    if status == 413:  # a body bound in front of the route may refuse the megabyte first
        assert bad == "1 MB payment_ref", answer
    else:
        assert status == 400 and answer["error"]["code"] == "BAD_REQUEST", answer
    got = await erp.request("order.get", order_id="o1")
    assert got["order"]["status"] == "open" and got["locks"][0]["token"] == token


async def test_the_bounds_themselves_are_accepted(store: Store) -> None:
    erp = await store.erp("till")
    top = await store.publish(erp, order_id="o" * 128, table_id="t" * 128, version=MAX_SAFE_INT,
                              amount_cents=MAX_SAFE_INT)
    assert top["ok"], top
    token = (await erp.request("lock.acquire", order_id="o" * 128, kind="payment")
             )["lock"]["token"]
    status, body = await service_pays(store, "o" * 128, token=token, version=MAX_SAFE_INT,
                                      amount_cents=MAX_SAFE_INT, payment_ref="r" * 128)
    assert status == 200, body


@pytest.mark.parametrize("order_id", ["o" * 129, "o\nx", "o\x00", "o\x7f", ""])
async def test_ids_out_of_bounds_are_refused(store: Store, order_id: str) -> None:
    erp = await store.erp("till")
    for kind, params in [("order.publish", {"order": {"order_id": order_id, "table_id": "t1",
                                                      "version": 1, "amount_cents": 1},
                                            "change": "modify"}),
                         ("order.publish", {"order": {"order_id": "o1", "table_id": order_id,
                                                      "version": 1, "amount_cents": 1},
                                            "change": "modify"}),
                         ("lock.acquire", {"order_id": order_id, "kind": "order"}),
                         ("order.get", {"order_id": order_id}),
                         ("subscribe", {"channel": store.channel(order_id)}),
                         ("ping", {"store_id": order_id})]:
        reply = await erp.request(kind, **params)
        assert reply["error"]["code"] == "BAD_REQUEST", (kind, reply)
    if order_id:
        quoted = urllib.request.quote(order_id, safe="")
        status, body = await service_pays(store, quoted, token=1, version=1, amount_cents=1,
                                          payment_ref="p")
        assert status == 400 and body["error"]["code"] == "BAD_REQUEST", body


async def test_a_newline_in_an_order_id_no_longer_delivers_lock_forced_twice(
        store: Store) -> None:
    holder = await store.erp("till-1")
    forcer = await store.erp("till-2", role="erp_secondary")
    for order_id in ("o\nx", f"o\n{store.channel()}"):
        refused = await store.publish(holder, order_id=order_id)
        assert refused["error"]["code"] == "BAD_REQUEST", refused
    await store.publish(holder, order_id="o1")
    await holder.request("subscribe", channel=store.channel("o1"))
    assert (await holder.request("lock.acquire", order_id="o1", kind="order"))["ok"]
    assert (await forcer.request("lock.acquire", order_id="o1", kind="order", force=True))["ok"]
    forced = await holder.event("lock.forced")
    assert "direct" not in forced and forced["channel"] == store.channel("o1"), forced
    await store.publish(forcer, order_id="o1", version=2, change="add_items")
    await holder.event("order.updated")  # everything the force sent has arrived by now
    assert [f for f in holder.frames if f.get("event") == "lock.forced"] == [forced]


# --- 6. malformed but harmless input gets a plain answer -----------------------------------

async def test_a_deeply_nested_json_body_is_400_not_500(store: Store) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for role, path in [("manager", "/config"), ("service", "/orders/o1/payment")]:
        url = f"{store.broker.http}/v1/stores/{store.store_id}{path}"
        method = "PUT" if path == "/config" else "POST"
        for body in (nested, b'{"version": ' + nested + b"}"):
            status, answer = await asyncio.to_thread(raw_http, method, url, store.token(role),
                                                     body)
            assert status == 400 and answer["error"]["code"] == "BAD_REQUEST", answer
    assert (await store.http("GET", "/config"))[0] == 200


@pytest.mark.parametrize("since", [2**64, 2**64 + 1, 2**70, MAX_SAFE_INT, 10**40])
async def test_a_since_beyond_every_seq_is_not_recovered(store: Store, since: int) -> None:
    erp = await store.erp("till")
    await store.publish(erp, order_id="o1")
    for channel in (store.channel("o1"), store.channel()):
        reply = await erp.request("subscribe", channel=channel, since=since)
        assert reply["ok"] and reply["recovered"] is False, reply
        assert reply["snapshot"]["scope"] in ("order", "store")
    assert reply["snapshot"]["orders"][0]["order_id"] == "o1"


@pytest.mark.parametrize("entry_id", ["99999999999999999999999-0", "1-99999999999999999999",
                                      "9" * 40, "x" * 500, "%0A"])
async def test_an_absurd_audit_id_is_not_found(store: Store, entry_id: str) -> None:
    status, body = await store.http("POST", f"/audit/{entry_id}/handled")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND", body


# --- 7. refused hellos are logged and counted; UNAVAILABLE speaks the hello's locale -------

async def test_refused_hellos_are_logged_and_counted_without_the_token(
        broker_factory: BrokerFactory, capfd: pytest.CaptureFixture[str]) -> None:
    broker = start_broker(broker_factory, log_format="json", log_level="INFO")
    store = Store(broker)
    try:
        phone_token = store.token("h5", "phone-1", "t1")
        client = await WsClient.connect(broker.url, hello=False)
        store.clients.append(client)
        reply = await client.request("hello", token=phone_token, protocol=1,
                                     order_authority=True)
        assert reply["error"]["code"] == "FORBIDDEN" and await client.closed() == 4003
        forged = phone_token[:-4] + "AAAA"
        assert (await refused_hello(broker, forged))[1] == 4003
        old = await WsClient.connect(broker.url, hello=False)
        store.clients.append(old)
        assert (await old.request("hello", token=phone_token, protocol=0))["error"]["code"] == \
            "UNSUPPORTED_PROTOCOL"
        samples = await scrape(broker)
        for reason in ("forbidden", "auth_failed", "unsupported_protocol"):
            assert metric(samples, "tablelock_hello_refused_total", reason=reason) == 1, reason
    finally:
        await store.close()
    err = capfd.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    refused = [r for r in records if r["msg"].startswith("hello refused")]
    assert {r["reason"] for r in refused} == {"forbidden", "auth_failed",
                                               "unsupported_protocol"}, refused
    [forbidden] = [r for r in refused if r["reason"] == "forbidden"]
    assert forbidden["role"] == "h5" and forbidden["terminal"] == "phone-1", forbidden
    assert phone_token not in err and forged not in err
    assert phone_token.split(".")[2] not in err  # not even the signature


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


async def test_unavailable_at_hello_speaks_the_hellos_locale(
        broker_factory: BrokerFactory, own_redis: RedisServer) -> None:
    broker: BrokerProcess = start_broker(broker_factory, backend=own_redis.url)
    own_redis.stop()
    for locale in ("en", "zh-CN"):
        client = await WsClient.connect(broker.url, hello=False)
        try:
            token = Store(broker, unique()).token("erp_main")  # a store never read: no cache
            reply = await client.request("hello", token=token, protocol=1, locale=locale)
            assert reply["error"]["code"] == "UNAVAILABLE", reply
            assert reply["error"]["message"] == prompt("UNAVAILABLE", locale), reply
            assert await client.closed() == 1013
        finally:
            await client.close()
    samples = await scrape(broker)
    assert metric(samples, "tablelock_hello_refused_total", reason="unavailable") == 2
