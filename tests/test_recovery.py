"""One recovery mechanism: a position per channel, `since` and its `epoch`, on any broker.

`subscribe` answers with the channel's epoch and takes it back with `since`; an epoch of a
numbering that started over answers `recovered: false` and a snapshot. `resume` is the same
done by the broker: the session (terminal, channels and their positions) is kept in the
backend, so that another broker of the same Redis resumes it, restores its subscriptions
and replays what it missed. Real brokers, a real redis-server, raw protocol clients.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Store
from .redis_support import REDIS_CLI, RedisServer
from .support import BrokerProcess, WsClient, ahttp, mint, order, unique

BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture
def two_brokers(redis: RedisServer, broker_factory: BrokerFactory,
                ) -> tuple[BrokerProcess, BrokerProcess]:
    a, b = broker_factory(backend=redis.url), broker_factory(backend=redis.url)
    a.spawn(), b.spawn()
    return a.wait(), b.wait()


def events_of(client: WsClient, channel: str) -> list[dict[str, Any]]:
    return [f for f in client.frames if f.get("type") == "event" and f.get("channel") == channel]


async def publish(client: WsClient, order_id: str, version: int) -> None:
    reply = await client.request("order.publish", order=order(order_id, version=version),
                                 change="modify")
    assert reply["ok"], reply


# --- subscribe: since and epoch, on every backend ---------------------------------------------

async def test_subscribe_gives_the_epoch_and_another_epoch_is_not_recovered(
        store: Store) -> None:
    cashier = await store.erp("cashier")
    await store.publish(cashier, order_id="o1")
    screen = await store.connect("erp_secondary", "screen")
    channel = store.channel("o1")
    first = await screen.request("subscribe", channel=channel)
    epoch = first["epoch"]
    assert isinstance(epoch, str) and epoch
    await screen.request("unsubscribe", channel=channel)
    await store.publish(cashier, order_id="o1", version=2)

    same = await screen.request("subscribe", channel=channel, since=first["seq"], epoch=epoch)
    assert same["recovered"] is True and same["epoch"] == epoch
    assert [e["order"]["version"] for e in same["missed"]] == [2]

    other = await screen.request("subscribe", channel=channel, since=first["seq"],
                                 epoch="0ther")
    assert other["recovered"] is False and other["missed"] == []
    assert other["epoch"] == epoch and other["snapshot"]["order"]["version"] == 2
    # Without an epoch, `since` alone is taken as it is (PROTOCOL.md section 5).
    bare = await screen.request("subscribe", channel=channel, since=first["seq"])
    assert bare["recovered"] is True and len(bare["missed"]) == 1


# --- resume on another broker ------------------------------------------------------------------

async def test_resume_on_the_other_broker_restores_subscriptions_and_replays(
        two_brokers: tuple[BrokerProcess, BrokerProcess]) -> None:
    a, b = two_brokers
    store = unique()
    order_channel, store_channel = f"order:{store}:o1", f"store:{store}"
    cashier = await WsClient.connect(b.url, mint(store, "erp_main", "cashier"))
    await publish(cashier, "o1", 1)
    await cashier.request("subscribe", channel=store_channel)
    screen = await WsClient.connect(a.url, mint(store, "erp_secondary", "screen"))
    sub = await screen.request("subscribe", channel=order_channel)
    store_sub = await screen.request("subscribe", channel=store_channel)
    await publish(cashier, "o1", 2)  # delivered on broker a: the session counts it
    delivered = await screen.event("order.updated",
                                   where=lambda e: e["channel"] == order_channel)
    assert delivered["seq"] == sub["seq"] + 1
    session = screen.hello["session_id"]
    await screen.close()
    await cashier.event("terminal.offline",  # broker a detached it: the session is written
                        where=lambda e: e["terminal"]["terminal_id"] == "screen")
    for version in (3, 4):
        await publish(cashier, "o1", version)

    back = await WsClient.connect(b.url, mint(store, "erp_secondary", "screen"), resume=session)
    assert back.hello["resumed"] is True and back.hello["session_id"] == session
    assert back.hello["resubscribe"] == []
    await back.request("ping")  # the replay is queued before this reply
    replayed = events_of(back, order_channel)
    assert [e["seq"] for e in replayed] == [sub["seq"] + 2, sub["seq"] + 3]
    assert [e["order"]["version"] for e in replayed] == [3, 4]
    store_events = events_of(back, store_channel)
    seqs = [e["seq"] for e in store_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] > store_sub["seq"]
    assert store_events[-1]["event"] == "terminal.online"
    # The subscriptions are live on broker b: the next event follows without a gap.
    await publish(cashier, "o1", 5)
    live = await back.event("order.updated",
                            where=lambda e: e["channel"] == order_channel and
                            e["order"]["version"] == 5)
    assert live["seq"] == sub["seq"] + 4
    for client in (cashier, back):
        await client.close()


async def test_resume_after_its_broker_was_killed_replays_without_a_gap(
        two_brokers: tuple[BrokerProcess, BrokerProcess]) -> None:
    """No detach was written: the positions are those of the subscribe; what was delivered
    since comes again (the client drops a seq it had), nothing is skipped. A client that
    says what it read (`seen`) gets only what follows."""
    a, b = two_brokers
    store = unique()
    order_channel = f"order:{store}:o1"
    cashier = await WsClient.connect(b.url, mint(store, "erp_main", "cashier"))
    await publish(cashier, "o1", 1)
    screens = {}
    for name in ("screen", "reader"):
        screens[name] = await WsClient.connect(a.url, mint(store, "erp_secondary", name))
    sub = {name: await client.request("subscribe", channel=order_channel)
           for name, client in screens.items()}
    await publish(cashier, "o1", 2)
    for client in screens.values():
        await client.event("order.updated")
    a.stop(signal.SIGKILL)
    await publish(cashier, "o1", 3)

    back = await WsClient.connect(b.url, mint(store, "erp_secondary", "screen"),
                                  resume=screens["screen"].hello["session_id"])
    assert back.hello["resumed"] is True
    await back.request("ping")
    seq = sub["screen"]["seq"]
    assert [e["seq"] for e in events_of(back, order_channel)] == [seq + 1, seq + 2]

    reader = await WsClient.connect(b.url, mint(store, "erp_secondary", "reader"),
                                    resume=screens["reader"].hello["session_id"],
                                    seen={order_channel: seq + 1})
    assert reader.hello["resumed"] is True
    await reader.request("ping")
    assert [e["seq"] for e in events_of(reader, order_channel)] == [seq + 2]
    for client in (cashier, back, reader):
        await client.close()


# --- a numbering that started over -------------------------------------------------------------

async def test_redis_restarted_empty_gives_a_new_epoch_and_a_snapshot(
        redis: RedisServer, broker_factory: BrokerFactory) -> None:
    broker = broker_factory(backend=redis.url).start()
    store = unique()
    channel = f"order:{store}:o1"
    cashier = await WsClient.connect(broker.url, mint(store, "erp_main", "cashier"))
    await publish(cashier, "o1", 1)
    screen = await WsClient.connect(broker.url, mint(store, "erp_secondary", "screen"))
    before = await screen.request("subscribe", channel=channel)
    session = screen.hello["session_id"]
    for client in (screen, cashier):
        await client.close()

    redis.stop()
    redis.start()  # same port, without persistence: every seq and epoch is gone
    deadline = time.monotonic() + 10
    while (await ahttp("GET", f"{broker.http}/readyz"))[0] != 200:
        assert time.monotonic() < deadline, "broker did not recover"
        await asyncio.sleep(0.1)
    cashier = await WsClient.connect(broker.url, mint(store, "erp_main", "cashier"))
    await publish(cashier, "o1", 1)
    await publish(cashier, "o1", 2)

    screen = await WsClient.connect(broker.url, mint(store, "erp_secondary", "screen"),
                                    resume=session)
    assert screen.hello["resumed"] is False  # the session went with Redis
    after = await screen.request("subscribe", channel=channel, since=before["seq"],
                                 epoch=before["epoch"])
    assert after["epoch"] != before["epoch"]
    assert after["recovered"] is False and after["missed"] == []
    assert after["snapshot"]["order"]["version"] == 2
    for client in (cashier, screen):
        await client.close()


async def test_a_resumed_channel_of_another_epoch_is_named_for_a_new_subscribe(
        redis: RedisServer, broker_factory: BrokerFactory) -> None:
    """The session survived, the channel's numbering did not: the resume names it in
    `resubscribe` rather than replay another stream's events."""
    broker = broker_factory(backend=redis.url).start()
    store = unique()
    channel = f"order:{store}:o1"
    cashier = await WsClient.connect(broker.url, mint(store, "erp_main", "cashier"))
    await publish(cashier, "o1", 1)
    await cashier.request("subscribe", channel=f"store:{store}")
    screen = await WsClient.connect(broker.url, mint(store, "erp_secondary", "screen"))
    await screen.request("subscribe", channel=channel)
    session = screen.hello["session_id"]
    await screen.close()
    await cashier.event("terminal.offline",  # the broker detached it: the session is written
                        where=lambda e: e["terminal"]["terminal_id"] == "screen")
    await cashier.close()
    # A new epoch while the session is kept (as after a Redis failover that lost the seq
    # hash). Only the epoch is dropped, the seqs stay: the history alone would replay, so
    # the epoch is what decides here.
    await asyncio.to_thread(redis_cli, redis, "HDEL", f"tl:{{store:{store}}}:seq", "epoch")
    back = await WsClient.connect(broker.url, mint(store, "erp_secondary", "screen"),
                                  resume=session)
    assert back.hello["resumed"] is True and back.hello["resubscribe"] == [channel]
    cashier = await WsClient.connect(broker.url, mint(store, "erp_main", "cashier"))
    await publish(cashier, "o1", 2)
    await back.no_event("order.updated", within=0.3)  # dropped: it must subscribe again
    for client in (cashier, back):
        await client.close()


def redis_cli(redis: RedisServer, *args: str) -> str:
    return subprocess.run([REDIS_CLI, "-p", str(redis.port), *args], capture_output=True,
                          text=True, check=True, timeout=5).stdout
