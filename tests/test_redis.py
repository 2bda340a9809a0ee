"""The Redis backend across processes: two brokers, one truth, and faults on the way."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .redis_support import REDIS_SERVER, RedisServer, create_cluster
from .support import BrokerProcess, WsClient, ahttp, free_port, mint, order, unique

BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture
def two_brokers(redis: RedisServer, broker_factory: BrokerFactory,
                ) -> tuple[BrokerProcess, BrokerProcess]:
    a = broker_factory(backend=redis.url).start()
    b = broker_factory(backend=redis.url).start()
    return a, b


async def erp(url: str, store: str, sub: str, role: str = "erp_main",
              orders: dict[str, dict[str, Any]] | None = None) -> WsClient:
    client = await WsClient.connect(url, mint(store, role, sub))
    if orders is not None:
        async def answer(frame: dict[str, Any]) -> dict[str, Any]:
            found = orders.get(frame["params"].get("order_id", ""))
            if found is None:
                return {"ok": False, "error": {"code": "NOT_FOUND", "message": "no order"}}
            return {"ok": True, "result": {"order": found}}
        client.rpc_handler = answer
    return client


async def test_h5_and_erp_on_two_brokers_race_for_one_grant(
        two_brokers: tuple[BrokerProcess, BrokerProcess]) -> None:
    a, b = two_brokers
    store = unique()
    orders: dict[str, dict[str, Any]] = {}
    cashier = await erp(b.url, store, "cashier", orders=orders)
    phone = await WsClient.connect(a.url, mint(store, "h5", "phone", table="t1"))
    for n in range(15):
        body = order(f"o{n}")
        orders[body["order_id"]] = body
        assert (await cashier.request("order.publish", order=body, change="modify"))["ok"]
        erp_reply, h5_reply = await asyncio.gather(
            cashier.request("lock.acquire", order_id=f"o{n}", kind="payment"),
            phone.request("lock.acquire", order_id=f"o{n}", kind="payment"))
        granted = [r for r in (erp_reply, h5_reply) if r["ok"]]
        assert len(granted) == 1, (erp_reply, h5_reply)
        loser = h5_reply if erp_reply["ok"] else erp_reply
        assert loser["error"]["code"] == "PAYMENT_LOCKED"
    await cashier.close()
    await phone.close()


async def test_events_cross_both_ways_with_contiguous_seq(
        two_brokers: tuple[BrokerProcess, BrokerProcess]) -> None:
    a, b = two_brokers
    store = unique()
    on_a = await erp(a.url, store, "erp-a")
    on_b = await erp(b.url, store, "erp-b", role="erp_secondary")
    watchers = []
    for url in (a.url, b.url):
        watcher = await WsClient.connect(url, mint(store, "manager", unique("m")))
        sub = await watcher.request("subscribe", channel=f"store:{store}")
        watchers.append((watcher, sub["seq"]))
    for n, actor in enumerate([on_a, on_b, on_a, on_b]):
        assert (await actor.request("order.publish", order=order(f"o{n}"),
                                    change="modify"))["ok"]
        assert (await actor.request("lock.acquire", order_id=f"o{n}", kind="order"))["ok"]
    for watcher, start in watchers:
        seqs = []
        while len(seqs) < 8:
            event = await watcher.event(where=lambda e: e["event"] in ("order.updated",
                                                                       "lock.acquired"))
            seqs.append(event["seq"])
        assert seqs == sorted(seqs) and len(set(seqs)) == 8
        frames = [f for f in watcher.frames if f.get("type") == "event"]
        numbered = [f["seq"] for f in frames]
        assert numbered == list(range(start + 1, start + 1 + len(numbered)))
    for client in (on_a, on_b, *(w for w, _ in watchers)):
        await client.close()


async def test_order_fetch_relay_crosses_processes(
        two_brokers: tuple[BrokerProcess, BrokerProcess]) -> None:
    a, b = two_brokers
    store = unique()
    orders = {"o1": order("o1", version=1, amount_cents=1000)}
    cashier = await erp(b.url, store, "cashier", orders=orders)
    assert (await cashier.request("order.publish", order=orders["o1"], change="modify"))["ok"]
    orders["o1"] = order("o1", version=2, amount_cents=1500)  # the ERP moved on, unpublished
    phone = await WsClient.connect(a.url, mint(store, "h5", "phone", table="t1"))
    reply = await phone.request("lock.acquire", order_id="o1", kind="payment")
    assert reply["ok"], reply
    assert reply["order"]["version"] == 2 and reply["lock"]["order_version"] == 2
    await cashier.close()
    await phone.close()


async def test_a_killed_brokers_lock_is_released_after_the_grace(
        two_brokers: tuple[BrokerProcess, BrokerProcess]) -> None:
    a, b = two_brokers
    store = unique()
    manager = await WsClient.connect(b.url, mint(store, "manager", "boss"))
    status, _ = await ahttp("PUT", f"{b.http}/v1/stores/{store}/config",
                            mint(store, "manager", "boss"), {"disconnect_grace_ms": 500})
    assert status == 200
    cashier = await erp(a.url, store, "cashier")
    assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
    held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    assert held["ok"]
    await manager.request("subscribe", channel=f"order:{store}:o1")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    started = time.monotonic()
    released = await manager.event("lock.released", timeout=15)
    assert released["reason"] == "holder_disconnected"
    assert released["lock"]["token"] == held["lock"]["token"]
    assert time.monotonic() - started < 10
    again = await manager.request("order.get", order_id="o1")
    assert again["locks"] == []
    await manager.close()


async def test_redis_down_fails_closed_and_recovers(redis: RedisServer,
                                                   broker_factory: BrokerFactory) -> None:
    broker = broker_factory(backend=redis.url).start()
    store = unique()
    cashier = await erp(broker.url, store, "cashier")
    assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
    redis.stop()
    started = time.monotonic()
    refused = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    assert time.monotonic() - started < 1.5
    assert refused["ok"] is False and refused["error"]["code"] == "UNAVAILABLE"
    status, _ = await ahttp("GET", f"{broker.http}/readyz")
    assert status == 503
    redis.start()  # same port, empty: the broker must find its feet by itself
    deadline = time.monotonic() + 10
    while (await ahttp("GET", f"{broker.http}/readyz"))[0] != 200:
        assert time.monotonic() < deadline, "broker did not recover"
        await asyncio.sleep(0.1)
    assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
    granted = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    assert granted["ok"], granted
    await cashier.close()


async def test_broker_restart_keeps_locks_tokens_and_versions(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    redis = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        broker = broker_factory(backend=redis.url).start()
        store = unique()
        cashier = await erp(broker.url, store, "cashier")
        await cashier.request("order.publish", order=order("o1", version=7), change="modify")
        held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
        await cashier.close()
        broker.stop(signal.SIGKILL)
        redis.stop()  # Redis itself restarts from its append-only file
        redis.start()
        broker = broker_factory(backend=redis.url, port=broker.port).start()
        back = await erp(broker.url, store, "cashier")
        got = await back.request("order.get", order_id="o1")
        assert got["order"]["version"] == 7
        assert [lock["token"] for lock in got["locks"]] == [held["lock"]["token"]]
        other = await erp(broker.url, store, "second", role="erp_secondary")
        forced = await other.request("lock.acquire", order_id="o1", kind="payment", force=True)
        assert forced["lock"]["token"] > held["lock"]["token"]
        await back.close()
        await other.close()
    finally:
        redis.stop()


async def test_sentinel_url(tmp_path: Path, redis: RedisServer,
                            broker_factory: BrokerFactory) -> None:
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                    f"sentinel monitor tl 127.0.0.1 {redis.port} 1\n")
    sentinel = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        broker = broker_factory(backend=f"redis+sentinel://127.0.0.1:{port}/tl").start()
        store = unique()
        cashier = await erp(broker.url, store, "cashier")
        assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
        assert (await cashier.request("lock.acquire", order_id="o1", kind="payment"))["ok"]
        await cashier.close()
    finally:
        sentinel.kill()
        sentinel.wait()


async def test_cluster_of_three_masters(tmp_path: Path, broker_factory: BrokerFactory) -> None:
    nodes = [RedisServer(tmp_path / f"n{i}", cluster=True).start() for i in range(3)]
    try:
        await asyncio.to_thread(create_cluster, nodes)
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        a = broker_factory(backend=url).start()
        b = broker_factory(backend=url).start()
        # Enough stores that they land on different masters.
        for n in range(6):
            store = f"cluster-store-{n}"
            cashier = await erp(a.url, store, "cashier")
            watcher = await WsClient.connect(b.url, mint(store, "manager", "m"))
            await watcher.request("subscribe", channel=f"order:{store}:o1")
            assert (await cashier.request("order.publish", order=order("o1"),
                                          change="modify"))["ok"]
            held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
            assert held["ok"], held
            event = await watcher.event("lock.acquired")
            assert event["lock"]["token"] == held["lock"]["token"]
            paid = await cashier.request("payment.complete", order_id="o1",
                                         token=held["lock"]["token"], version=1,
                                         amount_cents=1000, payment_ref=f"p{n}")
            assert paid["ok"], paid
            await cashier.close()
            await watcher.close()
    finally:
        for node in nodes:
            node.stop()
