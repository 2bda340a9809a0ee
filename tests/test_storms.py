"""Many connections at once: closing together, and a reconnect storm (SCENARIOS.md 13)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

import tablelock_client as tl

from .conftest import Store
from .support import BrokerProcess, WsClient, mint, unique

BrokerFactory = Callable[..., BrokerProcess]


async def test_closing_many_connections_at_once_is_clean(
        broker_factory: BrokerFactory, capfd: pytest.CaptureFixture[str]) -> None:
    """Presence events fan out while their subscribers are closing: no one may trip on it."""
    broker = broker_factory().start()
    store = unique()
    bystander = await WsClient.connect(broker.url, mint(store, "manager", "bystander"))
    await bystander.request("subscribe", channel=f"store:{store}")
    for round_ in range(5):
        crowd = []
        for n in range(5):
            manager = await WsClient.connect(broker.url, mint(store, "manager", f"m{round_}-{n}"))
            await manager.request("subscribe", channel=f"store:{store}")
            crowd += [manager, await WsClient.connect(broker.url,
                                                      mint(store, "erp_main", f"e{round_}-{n}"))]
        await asyncio.gather(*(client.close() for client in crowd))
    offline = await bystander.collect(50, "terminal.offline", timeout=10)
    assert len(offline) == 50
    assert (await bystander.request("ping"))["ok"]
    await bystander.close()
    broker.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in ASGI application" not in err


async def test_reconnect_storm_ends_with_every_screen_true(store: Store) -> None:
    """Screens lose their sockets at once while the counter works on, then come back with
    jitter: each ends with the true locks, by `since` or by snapshot."""
    cashier = await store.erp("cashier")
    for n in range(10):
        await store.publish(cashier, order_id=f"o{n}", table_id=f"t{n}")
    screens = await asyncio.gather(*(
        tl.connect(store.broker.url, store.token("erp_secondary", f"screen-{n}"),
                   backoff_initial=0.1, backoff_max=2.0)
        for n in range(100)))
    mirrors = await asyncio.gather(*(screen.subscribe_store() for screen in screens))
    held: dict[str, tuple[str, int]] = {}  # order -> (kind, token) the counter holds
    for n in range(0, 10, 2):
        reply = await cashier.request("lock.acquire", order_id=f"o{n}", kind="order")
        held[f"o{n}"] = ("order", reply["lock"]["token"])
    rng = random.Random(13)
    for screen in screens:  # all at once
        screen._ws.transport.abort()


    async def counter(type_: str, **params: object) -> dict[str, object]:
        """The cashier retries what the storm makes the broker refuse (UNAVAILABLE)."""
        for _ in range(150):  # a loaded machine may take seconds to absorb the storm
            reply = await cashier.request(type_, **params)
            if reply["ok"] or reply["error"]["code"] != "UNAVAILABLE":
                return reply
            await asyncio.sleep(0.1)
        raise AssertionError(f"{type_} stayed UNAVAILABLE")

    for n in range(10):  # the counter goes on while they are away
        order_id = f"o{n}"
        if order_id in held and rng.random() < 0.5:
            await counter("lock.release", order_id=order_id, kind=held.pop(order_id)[0])
        elif order_id not in held:
            reply = await counter("lock.acquire", order_id=order_id, kind="payment")
            held[order_id] = ("payment", reply["lock"]["token"])  # type: ignore[index]
    want = {(order_id, kind, token) for order_id, (kind, token) in held.items()}
    truth = await cashier.request("subscribe", channel=store.channel())
    assert {(lock["order_id"], lock["kind"], lock["token"])
            for lock in truth["snapshot"]["locks"]} == want
    await asyncio.gather(*(screen.wait_fresh(timeout=30) for screen in screens))
    for mirror in mirrors:
        assert {(o, k, lock.token) for (o, k), lock in mirror.locks.items()} == want
    await asyncio.gather(*(screen.close() for screen in screens))
