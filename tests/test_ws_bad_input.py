"""Bad input gets an error reply or a close code, and never disturbs anyone else (invariant 7)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Store
from .support import BrokerProcess, WsClient

HELLO_TIMEOUT_S = 1.0  # TABLELOCK_HELLO_TIMEOUT_S of a dedicated broker (10 s by default)


async def bystander(store: Store) -> WsClient:
    """A well-behaved terminal connected before the abuse, with an order of its own."""
    client = await store.erp("bystander")
    assert (await store.publish(client, order_id="calm"))["ok"]
    return client


async def still_works(client: WsClient) -> None:
    assert (await client.request("ping"))["ok"]
    held = await client.request("lock.acquire", order_id="calm", kind="order")
    assert held["ok"], held
    released = await client.request("lock.release", order_id="calm", kind="order",
                                    token=held["lock"]["token"])
    assert released["ok"], released


def frame(**fields: Any) -> str:
    return json.dumps(fields)


GOOD_ORDER = {"order_id": "o", "table_id": "t1", "version": 2, "amount_cents": 100}

# (what is sent, the id the BAD_REQUEST reply must carry)
BAD_FRAMES: dict[str, tuple[str, Any]] = {
    "broken-json": ('{"id": 1, "type": "ping"', None),
    "not-json": ("hello there", None),
    "json-array": ("[1, 2]", None),
    "json-number": ("42", None),
    "json-null": ("null", None),
    "no-type": (frame(id=3), 3),
    "unknown-type": (frame(id=4, type="lock.steal", order_id="o"), 4),
    "missing-id": (frame(type="ping"), None),
    "unreadable-id": (frame(id=[1], type="ping"), None),
    "missing-kind": (frame(id=5, type="lock.acquire", order_id="o"), 5),
    "missing-order": (frame(id="s6", type="order.publish", change="modify"), "s6"),
    "unknown-kind": (frame(id=7, type="lock.acquire", order_id="o", kind="table"), 7),
    "unknown-action": (frame(id=8, type="check", order_id="o", action="refund"), 8),
    "unknown-change": (frame(id=9, type="order.publish", order=GOOD_ORDER, change="eat"), 9),
    "order-id-number": (frame(id=10, type="lock.acquire", order_id=10, kind="order"), 10),
    "force-string": (frame(id=11, type="lock.acquire", order_id="o", kind="order",
                           force="yes"), 11),
    "token-string": (frame(id=12, type="lock.release", order_id="o", kind="order",
                           token="12"), 12),
    "amount-float": (frame(id=13, type="payment.complete", order_id="o", token=1, version=1,
                           amount_cents=9.5, payment_ref="r"), 13),
    "negative-version": (frame(id=14, type="order.publish", change="modify",
                               order={**GOOD_ORDER, "version": -1}), 14),
    "negative-since": (frame(id=15, type="subscribe", channel="store:x", since=-1), 15),
    "bad-channel": (frame(id=16, type="subscribe", channel="table:t1"), 16),
    "empty-order-id": (frame(id=17, type="order.get", order_id=""), 17),
    "second-hello": (frame(id=18, type="hello", token="x", protocol=1), 18),
}


async def test_bad_frames_get_bad_request_and_the_connection_stays_open(store: Store) -> None:
    calm = await bystander(store)
    abuser = await store.erp("abuser")
    await store.publish(abuser, order_id="o")
    for name, (data, reply_id) in BAD_FRAMES.items():
        reply = await abuser.raw_request(data, reply_id)
        assert reply["ok"] is False, (name, reply)
        assert reply["error"]["code"] == "BAD_REQUEST", (name, reply)
        assert reply["id"] == reply_id, (name, reply)
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
        assert (await abuser.request("ping"))["ok"], name  # still open
    # Nothing was applied by the bad frames.
    got = await abuser.request("order.get", order_id="o")
    assert got["order"]["version"] == 1 and got["locks"] == []
    await still_works(calm)


async def test_big_frames(store: Store) -> None:
    """64 KiB is the limit: a frame just under it is served, 100 KiB closes with 1009."""
    calm = await bystander(store)
    abuser = await store.erp("abuser")
    filler = "x" * (60 * 1024)
    near = await store.publish(abuser, order_id="big", items=[{"sku": "note", "text": filler}])
    assert near["ok"], near
    await abuser.send_raw(frame(id=99, type="ping", pad="y" * (100 * 1024)))
    assert await abuser.closed() == 1009
    await still_works(calm)


async def test_no_hello_closes_with_4001(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Within the hello timeout nothing is served; at it, the broker closes with 4001."""
    quick = broker_factory(env={"TABLELOCK_HELLO_TIMEOUT_S": str(HELLO_TIMEOUT_S),
                                "TABLELOCK_DRAIN_WINDOW_S": "0"}).start()
    store = Store(quick)
    try:
        calm = await bystander(store)
        silent = await WsClient.connect(quick.url, hello=False)
        started = time.monotonic()
        code = await silent.closed(timeout=HELLO_TIMEOUT_S + 5)
        waited = time.monotonic() - started
        assert HELLO_TIMEOUT_S - 0.2 <= waited <= HELLO_TIMEOUT_S + 2, waited
        assert code == 4001
        # A terminal that said hello in time outlives the timeout.
        await still_works(calm)
    finally:
        await store.close()


FIRST_FRAMES = {
    "ping": (frame(id=1, type="ping"), 1),
    "lock": (frame(id="a", type="lock.acquire", order_id="calm", kind="order"), "a"),
    "invalid-json": ("{not json", None),
    "hello-without-token": (frame(id=2, type="hello", protocol=1), 2),
}


@pytest.mark.parametrize("name", list(FIRST_FRAMES))
async def test_first_frame_not_hello_is_bad_request_then_4001(store: Store, name: str) -> None:
    calm = await bystander(store)
    data, reply_id = FIRST_FRAMES[name]
    client = await WsClient.connect(store.broker.url, hello=False)
    try:
        reply: dict[str, Any] | None = await client.raw_request(data, reply_id)
    except ConnectionError:
        reply = None
    code = await client.closed()
    assert reply is not None, f"no BAD_REQUEST reply, close code {code}"
    assert reply["ok"] is False and reply["id"] == reply_id
    assert reply["error"]["code"] == "BAD_REQUEST"
    assert code == 4001
    # The lock request was not served before the hello.
    assert (await calm.request("order.get", order_id="calm"))["locks"] == []
    await still_works(calm)


async def test_abuse_of_one_terminal_leaves_its_other_connection_alone(store: Store) -> None:
    """The same terminal on two screens: one sends garbage and a huge frame."""
    calm = await store.erp("till")
    await store.publish(calm, order_id="calm")
    wild = await store.connect("erp_main", "till")
    assert (await wild.raw_request("{{{", None))["error"]["code"] == "BAD_REQUEST"
    await wild.send_raw("z" * (100 * 1024))
    assert await wild.closed() == 1009
    await still_works(calm)
