"""Who may do what: hello, scoping of stores, tables and roles, and the HTTP routes."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from .conftest import Store
from .support import SECRET, BrokerProcess, WsClient, mint, unique


async def raw(broker: BrokerProcess) -> WsClient:
    return await WsClient.connect(broker.url, hello=False)


def forged(store: str, **claims: Any) -> str:
    body = {"sub": "x", "store": store, "role": "erp_main", "exp": 2**31, **claims}
    return jwt.encode(body, "not-the-broker-secret-0123456789abcdef", algorithm="HS256")


BAD_TOKENS = {
    "bad-signature": lambda store: forged(store),
    "expired": lambda store: mint(store, "erp_main", "x", ttl_s=-60),
    "garbage": lambda store: "not.a.jwt",
    "empty": lambda store: "",
    "no-role": lambda store: jwt.encode({"sub": "x", "store": store, "exp": 2**31}, SECRET,
                                        algorithm="HS256"),
    "h5-without-table": lambda store: jwt.encode(
        {"sub": "x", "store": store, "role": "h5", "exp": 2**31}, SECRET, algorithm="HS256"),
}


async def refused_hello(broker: BrokerProcess, **params: Any) -> tuple[dict[str, Any] | None,
                                                                      int | None]:
    """Send a hello; (its reply, or None if none came, and the close code)."""
    client = await raw(broker)
    try:
        reply: dict[str, Any] | None = await client.request("hello", **params)
    except ConnectionError:
        reply = None
    return reply, await client.closed()


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_token_is_auth_failed_then_4003(broker: BrokerProcess, kind: str) -> None:
    reply, code = await refused_hello(broker, token=BAD_TOKENS[kind](unique()), protocol=1,
                                      locale="en")
    assert reply is not None, f"no AUTH_FAILED reply, close code {code}"
    assert reply["ok"] is False and reply["id"] == 1
    assert reply["error"]["code"] == "AUTH_FAILED"
    assert code == 4003


@pytest.mark.parametrize("token_kind", ["valid", "bad"])
async def test_protocol_2_is_unsupported_before_the_token(broker: BrokerProcess,
                                                          token_kind: str) -> None:
    token = mint(unique(), "erp_main", "x") if token_kind == "valid" else "garbage"
    reply, code = await refused_hello(broker, token=token, protocol=2)
    assert reply is not None, f"no UNSUPPORTED_PROTOCOL reply, close code {code}"
    assert reply["error"]["code"] == "UNSUPPORTED_PROTOCOL"
    assert code == 4002


async def test_hello_names_the_store_of_the_token(store: Store) -> None:
    """The token decides the store and the terminal; the config comes with hello."""
    client = await store.connect("erp_secondary", "till-2", name="Till 2")
    hello = client.hello
    assert hello["terminal"] == {"terminal_id": "till-2", "role": "erp_secondary",
                                 "name": "till-2", "store_id": store.store_id,
                                 "table_id": None}
    assert hello["store"]["store_id"] == store.store_id
    assert hello["store"]["config"]["strong_link"] is True
    assert isinstance(hello["session_id"], str) and hello["resumed"] is False
    assert hello["heartbeat_ms"] > 0 and hello["server_time"] > 0
    named = await WsClient.connect(store.broker.url, store.token("h5", "p", "t1", name="Ann"))
    store.clients.append(named)
    assert named.hello["terminal"]["name"] == "Ann"
    assert named.hello["terminal"]["table_id"] == "t1"


async def test_hello_with_another_store_id_is_refused(store: Store) -> None:
    reply, code = await refused_hello(store.broker, token=store.token("erp_main"), protocol=1,
                                      store_id=unique())
    assert reply is not None, f"no reply, close code {code}"
    assert reply["ok"] is False
    # PROTOCOL.md says both "a store_id other than the token's is FORBIDDEN" and "a failed
    # hello gets AUTH_FAILED or UNSUPPORTED_PROTOCOL": accept either code, but it must close.
    assert reply["error"]["code"] in ("AUTH_FAILED", "FORBIDDEN")
    assert code in (4003, 4001)


async def test_another_stores_channel_and_store_id_are_forbidden(store: Store) -> None:
    other = Store(store.broker)
    erp_other = await other.erp("erp")
    await other.publish(erp_other, order_id="o")
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o")
    try:
        for channel in (other.channel(), other.channel("o")):
            reply = await erp.request("subscribe", channel=channel)
            assert reply["error"]["code"] == "FORBIDDEN", reply
        for type_, params in [
            ("ping", {}),
            ("order.get", {"order_id": "o"}),
            ("lock.acquire", {"order_id": "o", "kind": "order"}),
            ("check", {"order_id": "o", "action": "edit"}),
            ("subscribe", {"channel": store.channel()}),
        ]:
            reply = await erp.request(type_, store_id=other.store_id, **params)
            assert reply["error"]["code"] == "FORBIDDEN", (type_, reply)
        # The same requests with its own store id are fine.
        assert (await erp.request("ping", store_id=store.store_id))["ok"]
        assert (await erp.request("order.get", order_id="o", store_id=store.store_id))["ok"]
        # Nothing leaked into the other store.
        assert (await erp_other.request("order.get", order_id="o"))["locks"] == []
    finally:
        await other.close()


async def test_h5_is_confined_to_its_table(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="mine", table_id="t1")
    await store.publish(erp, order_id="theirs", table_id="t2")
    phone = await store.connect("h5", "phone", table="t1")

    denied = [
        ("subscribe", {"channel": store.channel("theirs")}),
        ("subscribe", {"channel": store.channel()}),
        ("lock.acquire", {"order_id": "theirs", "kind": "payment"}),
        ("order.get", {"order_id": "theirs"}),
        ("order.get", {"table_id": "t2"}),
        ("lock.acquire", {"order_id": "mine", "kind": "order"}),
        ("lock.acquire", {"order_id": "mine", "kind": "presettle"}),
        ("lock.acquire", {"order_id": "mine", "kind": "payment", "force": True}),
        ("order.publish", {"order": {"order_id": "mine", "table_id": "t1", "version": 9,
                                     "amount_cents": 1}, "change": "modify"}),
        ("payment.complete", {"order_id": "theirs", "token": 1, "version": 1,
                              "amount_cents": 1000, "payment_ref": "x"}),
    ]
    for type_, params in denied:
        reply = await phone.request(type_, **params)
        assert reply["ok"] is False and reply["error"]["code"] == "FORBIDDEN", (type_, reply)

    for action in ("edit", "modify", "presettle", "accept"):
        check = await phone.request("check", order_id="mine", action=action)
        assert check["ok"] and check["allowed"] is False and check["code"] == "FORBIDDEN"
    for action in ("add_items", "pay"):
        check = await phone.request("check", order_id="theirs", action=action)
        assert check["allowed"] is False and check["code"] == "FORBIDDEN", check
        check = await phone.request("check", order_id="mine", action=action)
        assert check["allowed"] is True, check

    assert (await erp.request("order.get", order_id="theirs"))["locks"] == []
    assert (await erp.request("order.get", order_id="mine"))["locks"] == []
    assert (await phone.request("order.get", order_id="mine"))["ok"]
    assert (await phone.request("subscribe", channel=store.channel("mine")))["ok"]


async def test_unknown_orders_are_not_found(store: Store) -> None:
    erp = await store.erp("erp")
    manager = await store.connect("manager", "m")
    phone = await store.connect("h5", "phone", table="t1")
    for client in (erp, manager):
        for type_, params in [
            ("order.get", {"order_id": "nope"}),
            ("lock.acquire", {"order_id": "nope", "kind": "order"}),
            ("lock.release", {"order_id": "nope", "kind": "order"}),
            ("check", {"order_id": "nope", "action": "edit"}),
        ]:
            reply = await client.request(type_, **params)
            assert reply["error"]["code"] == "NOT_FOUND", (type_, reply)
    assert (await phone.request("check", order_id="nope", action="pay"))["error"]["code"] == (
        "NOT_FOUND")
    sub = await phone.request("subscribe", channel=store.channel("nope"))
    assert sub["ok"] and sub["snapshot"]["order"] is None and sub["snapshot"]["locks"] == []


# --- HTTP -------------------------------------------------------------------------------

async def test_http_order_route_auth(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", table_id="t1")
    assert (await store.http("GET", "/orders/o", role=None))[0] == 401
    assert (await store.http("GET", "/orders/o", token="garbage"))[0] == 401
    expired = mint(store.store_id, "manager", "m", ttl_s=-60)
    assert (await store.http("GET", "/orders/o", token=expired))[0] == 401
    assert (await store.http("GET", "/orders/o", token=mint(unique(), "manager", "m")))[0] == 403
    status, body = await store.http("GET", "/orders/o", role="erp_secondary")
    assert status == 200 and body["order"]["order_id"] == "o" and body["locks"] == []
    assert (await store.http("GET", "/orders/nope"))[0] == 404
    other_table = store.token("h5", "p", "t2")
    assert (await store.http("GET", "/orders/o", token=other_table))[0] == 403
    assert (await store.http("GET", "/orders/o", token=store.token("h5", "p", "t1")))[0] == 200


async def test_http_config_validation_and_events(store: Store) -> None:
    dashboard = await store.connect("manager", "dash")
    await dashboard.request("subscribe", channel=store.channel())
    status, config = await store.http("GET", "/config")
    assert status == 200
    assert config == {"strong_link": True, "h5_payment_lock_ttl_ms": 15000,
                      "erp_lock_ttl_ms": 600000, "disconnect_grace_ms": 30000,
                      "erp_fetch_timeout_ms": 3000, "locale": "zh-CN",
                      "order_retention_ms": 86400000}

    bad_patches: list[Any] = [
        {"h5_payment_lock_ttl_ms": 4999},
        {"h5_payment_lock_ttl_ms": 300001},
        {"erp_lock_ttl_ms": 9999},
        {"disconnect_grace_ms": -1},
        {"erp_fetch_timeout_ms": 499},
        {"order_retention_ms": 59999},
        {"h5_payment_lock_ttl_ms": "6000"},
        {"h5_payment_lock_ttl_ms": 6000.5},
        {"strong_link": "no"},
        {"locale": "fr"},
        {"no_such_field": 1},
        {"disconnect_grace_ms": 100, "colour": "red"},
        [1, 2],
    ]
    for patch in bad_patches:
        status, body = await store.http("PUT", "/config", body=patch)
        assert status == 400 and body["error"]["code"], (patch, status, body)
    assert (await store.http("GET", "/config"))[1] == config  # nothing half-applied

    for role, expected in (("service", 200), ("erp_main", 403), ("h5", 403)):
        token = store.token(role, table="t1" if role == "h5" else None)
        assert (await store.http("GET", "/config", token=token))[0] == expected, role
        status, _ = await store.http("PUT", "/config", token=token, body={"locale": "en"})
        assert status == (200 if role == "service" else 403), role
    assert (await store.http("PUT", "/config", role=None, body={"locale": "en"}))[0] == 401

    status, updated = await store.http("PUT", "/config", body={
        "h5_payment_lock_ttl_ms": 5000, "disconnect_grace_ms": 0})
    assert status == 200
    assert updated == {**config, "locale": "en", "h5_payment_lock_ttl_ms": 5000,
                       "disconnect_grace_ms": 0}
    assert (await store.http("GET", "/config"))[1] == updated
    event = await dashboard.event("config.updated", where=lambda e: e["config"] == updated)
    assert event["channel"] == store.channel()
    # New sessions get the new config with hello.
    erp = await store.erp("erp")
    assert erp.hello["store"]["config"] == updated


async def test_http_payment_route(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", amount_cents=1500)
    lock = (await erp.request("lock.acquire", order_id="o", kind="payment"))["lock"]
    body = {"token": lock["token"], "version": 1, "amount_cents": 1500, "payment_ref": "svc-1"}

    assert (await store.http("POST", "/orders/o/payment", role="manager", body=body))[0] == 403
    assert (await store.http("POST", "/orders/o/payment", role=None, body=body))[0] == 401
    status, reply = await store.http("POST", "/orders/o/payment", role="service",
                                     body={**body, "token": lock["token"] - 1})
    assert status == 409 and reply["error"]["code"] == "FENCED", reply
    status, reply = await store.http("POST", "/orders/o/payment", role="service",
                                     body={"token": lock["token"]})
    assert status == 400, reply
    assert (await store.http("POST", "/orders/nope/payment", role="service", body=body))[0] == (
        404)

    status, reply = await store.http("POST", "/orders/o/payment", role="service", body=body)
    assert status == 200 and reply["order"]["status"] == "paid", reply
    status, reply = await store.http("POST", "/orders/o/payment", role="service",
                                     body={**body, "payment_ref": "svc-2"})
    assert status == 409 and reply["error"]["code"] == "ORDER_PAID"


async def test_http_audit_is_for_managers(store: Store) -> None:
    for role in ("erp_main", "service"):
        assert (await store.http("GET", "/audit", role=role))[0] == 403
    assert (await store.http("GET", "/audit", role=None))[0] == 401
    status, body = await store.http("GET", "/audit")
    assert status == 200 and body == {"entries": []}
