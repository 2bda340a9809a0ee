"""A reply is the truth (PROTOCOL.md section 7, invariant 9.8), against real Redis faults.

A proxy between the broker and redis-server lands each fault on one chosen commit: Redis
SIGKILLed (on an `appendfsync always` AOF) or SIGSTOPped for 0.6 s, either before the
commit reaches it or after it ran the commit and before its reply got back. Every round
checks the broker's answer against what Redis really holds afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from .redis_support import RedisProxy, RedisServer, SentinelServer, replicate
from .support import BrokerProcess, WsClient, ahttp, mint, order, unique

BrokerFactory = Callable[..., BrokerProcess]
STALL_S = 0.6  # longer than the brokers' 0.4 s Redis reply timeout (redis_link.py)


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, RedisProxy]]:
    redis = RedisServer(tmp_path / "aof", appendonly=True).start()
    proxy = await RedisProxy(redis.port).start()
    yield redis, proxy
    await proxy.stop()
    redis.stop()


async def start(broker: BrokerProcess) -> BrokerProcess:
    """Start a broker without blocking this loop, which runs the proxy it connects through."""
    return await asyncio.to_thread(broker.start)


async def erp(url: str, store: str, sub: str, role: str = "erp_main") -> WsClient:
    return await WsClient.connect(url, mint(store, role, sub))


def stall(redis: RedisServer) -> Callable[[], Any]:
    """SIGSTOP Redis now and SIGCONT it STALL_S later, without holding up the proxy."""
    async def action() -> None:
        assert redis.proc is not None
        pid = redis.proc.pid
        os.kill(pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(STALL_S, os.kill, pid, signal.SIGCONT)
    return action


def kill_and_restart(redis: RedisServer, down_s: float = 0.0) -> Callable[[], Any]:
    """SIGKILL Redis, and bring it back on the same AOF and port `down_s` later."""
    async def action() -> None:
        await asyncio.to_thread(redis.stop)  # SIGKILL
        await asyncio.sleep(down_s)
        await asyncio.to_thread(redis.start)
    return action


async def test_a_commit_applied_before_redis_died_is_answered_as_applied(
        aof_redis: tuple[RedisServer, RedisProxy], broker_factory: BrokerFactory) -> None:
    """Redis runs the grant (fsynced to the AOF), dies before its reply reaches the broker,
    restarts on the same AOF: the broker answers the grant, with the token Redis holds."""
    redis, proxy = aof_redis
    broker = await start(broker_factory(backend=proxy.url))
    watching = await start(broker_factory(backend=redis.url))  # events reach other brokers too
    store = unique()
    cashier = await erp(broker.url, store, "cashier")
    second = await erp(broker.url, store, "second", role="erp_secondary")
    manager = await WsClient.connect(watching.url, mint(store, "manager", "boss"))
    for n in range(4):
        order_id = f"kill{n}x"
        assert (await cashier.request("order.publish", order=order(order_id),
                                      change="modify"))["ok"]
        await manager.request("subscribe", channel=f"order:{store}:{order_id}")
        # Rounds 0 and 2: the kill lands after Redis ran the commit; 1 and 3: before it.
        after = n % 2 == 0
        fired = proxy.arm((order_id.encode(), b"lock.acquired"), kill_and_restart(redis),
                          after=after)
        granted = await cashier.request("lock.acquire", order_id=order_id, kind="payment",
                                        timeout=15)
        assert granted["ok"], (n, granted)
        await asyncio.wait_for(fired.wait(), 20)  # the fault landed, and Redis is back
        token = granted["lock"]["token"]
        held = await cashier.request("order.get", order_id=order_id, timeout=15)
        assert [lock["token"] for lock in held["locks"]] == [token], (n, held)
        channel = f"order:{store}:{order_id}"
        event = await manager.event("lock.acquired", timeout=15,
                                    where=lambda e, c=channel: e["channel"] == c)
        assert event["lock"]["token"] == token
        # The same for a force: it comes back forced, and the holder lost its lock.
        fired = proxy.arm((order_id.encode(), b"lock.forced"), kill_and_restart(redis),
                          after=after)
        forced = await second.request("lock.acquire", order_id=order_id, kind="payment",
                                      force=True, timeout=15)
        assert forced["ok"], (n, forced)
        await asyncio.wait_for(fired.wait(), 20)
        assert [lock["token"] for lock in forced["forced"]] == [token], (n, forced)
        held = await cashier.request("order.get", order_id=order_id, timeout=15)
        assert [lock["token"] for lock in held["locks"]] == [forced["lock"]["token"]]
    for client in (cashier, second, manager):
        await client.close()


async def test_a_commit_unresolved_for_5_s_is_answered_outcome_unknown(
        aof_redis: tuple[RedisServer, RedisProxy], broker_factory: BrokerFactory) -> None:
    """Redis ran the grant and stays down past 5 s: UNAVAILABLE with outcome unknown, never
    a plain UNAVAILABLE; back up, Redis holds the grant, as `unknown` allowed."""
    redis, proxy = aof_redis
    broker = await start(broker_factory(backend=proxy.url))
    store = unique()
    cashier = await erp(broker.url, store, "cashier")
    assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
    fired = proxy.arm((b"o1", b"lock.acquired"), kill_and_restart(redis, down_s=7),
                      after=True)
    started = time.monotonic()
    reply = await cashier.request("lock.acquire", order_id="o1", kind="payment", timeout=15)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "UNAVAILABLE"
    assert reply["error"]["outcome"] == "unknown"
    assert time.monotonic() - started >= 5
    await asyncio.wait_for(fired.wait(), 20)  # Redis is back
    held = await cashier.request("order.get", order_id="o1", timeout=15)
    assert len(held["locks"]) == 1 and held["locks"][0]["holder"]["terminal_id"] == "cashier"
    await cashier.close()


async def test_a_write_never_sent_is_plain_unavailable(
        aof_redis: tuple[RedisServer, RedisProxy], broker_factory: BrokerFactory) -> None:
    """Redis down before the request: nothing can have changed, so no `outcome`."""
    redis, proxy = aof_redis
    broker = await start(broker_factory(backend=proxy.url))
    store = unique()
    cashier = await erp(broker.url, store, "cashier")
    assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
    redis.stop()
    # As when the broker talks to Redis directly: a new connection is refused (the proxy
    # would accept it, then close it with the command written: that one may have run)...
    await proxy.stop()
    await proxy.closed()  # ...and the open ones see it die
    reply = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    assert reply["error"]["code"] == "UNAVAILABLE"
    assert reply["error"].get("outcome") is None
    await cashier.close()


async def test_a_stalled_redis_never_turns_a_release_or_a_force_into_another_answer(
        aof_redis: tuple[RedisServer, RedisProxy], broker_factory: BrokerFactory) -> None:
    """SIGSTOP for 0.6 s around a commit, 30 rounds: a holder's release with its current
    token is answered ok (never FENCED) and frees the lock; a force comes back `forced`."""
    redis, proxy = aof_redis
    broker = await start(broker_factory(backend=proxy.url))
    store = unique()
    cashier = await erp(broker.url, store, "cashier")
    second = await erp(broker.url, store, "second", role="erp_secondary")
    for n in range(30):
        order_id = f"stall{n}x"
        assert (await cashier.request("order.publish", order=order(order_id),
                                      change="modify"))["ok"]
        held = await cashier.request("lock.acquire", order_id=order_id, kind="payment")
        assert held["ok"], (n, held)
        token = held["lock"]["token"]
        after = (n // 2) % 2 == 0  # the stall lands after Redis ran the commit, or before
        if n % 2 == 0:
            fired = proxy.arm((order_id.encode(), b"lock.released"), stall(redis), after)
            released = await cashier.request("lock.release", order_id=order_id,
                                             kind="payment", token=token, timeout=15)
            assert fired.is_set()
            assert released["ok"], (n, after, released)
            left = await cashier.request("order.get", order_id=order_id)
            assert left["locks"] == [], (n, left)
        else:
            fired = proxy.arm((order_id.encode(), b"lock.forced"), stall(redis), after)
            forced = await second.request("lock.acquire", order_id=order_id, kind="payment",
                                          force=True, timeout=15)
            assert fired.is_set()
            assert forced["ok"], (n, after, forced)
            assert [lock["token"] for lock in forced.get("forced") or []] == [token], (n, forced)
            left = await cashier.request("order.get", order_id=order_id)
            assert [lock["token"] for lock in left["locks"]] == [forced["lock"]["token"]]
    await cashier.close()
    await second.close()


async def until(check: Callable[[], Any], timeout: float = 30) -> None:
    """Until a blocking check (a redis-cli call) holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_a_grant_acknowledged_after_wait_survives_a_failover(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    """With TABLELOCK_REDIS_WAIT_REPLICAS=1 a grant is acknowledged once a replica has it:
    SIGKILL the master, the sentinel promotes the replica, and the lock is there, token
    and all."""
    master = RedisServer(tmp_path / "master").start()
    replica = RedisServer(tmp_path / "replica").start()
    sentinel: SentinelServer | None = None
    try:
        await asyncio.to_thread(replicate, replica, master)
        sentinel = await asyncio.to_thread(SentinelServer(tmp_path / "sentinel",
                                                          master.port).start)
        await until(lambda: sentinel is not None and sentinel.knows_replica(replica.port))
        broker = await start(broker_factory(
            backend=f"redis+sentinel://127.0.0.1:{sentinel.port}/tl",
            env={"TABLELOCK_REDIS_WAIT_REPLICAS": "1", "TABLELOCK_REDIS_WAIT_TIMEOUT_MS": "2000"}))
        store = unique()
        cashier = await erp(broker.url, store, "cashier")
        assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
        held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
        assert held["ok"], held
        master.stop()  # SIGKILL: whatever it had not sent its replica is gone
        await until(lambda: sentinel is not None and sentinel.current_master() == replica.port)
        deadline = time.monotonic() + 30
        while not (got := await cashier.request("order.get", order_id="o1", timeout=10))["ok"]:
            assert got["error"]["code"] == "UNAVAILABLE", got
            assert time.monotonic() < deadline, "the broker did not find the new master"
            await asyncio.sleep(0.2)
        assert [lock["token"] for lock in got["locks"]] == [held["lock"]["token"]]
        await cashier.close()
    finally:
        if sentinel is not None:
            sentinel.stop()
        replica.stop()
        master.stop()


async def test_a_grant_no_replica_confirmed_is_answered_outcome_unknown(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    """WAIT times out (no replica at all): the grant applied on the master, so the reply is
    not a plain UNAVAILABLE but `outcome: unknown`; the lock is there when read."""
    redis = RedisServer(tmp_path / "alone").start()
    try:
        broker = await start(broker_factory(
            backend=redis.url,
            env={"TABLELOCK_REDIS_WAIT_REPLICAS": "1", "TABLELOCK_REDIS_WAIT_TIMEOUT_MS": "300"}))
        store = unique()
        cashier = await erp(broker.url, store, "cashier")
        assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
        reply = await cashier.request("lock.acquire", order_id="o1", kind="payment")
        assert reply["error"]["code"] == "UNAVAILABLE" and reply["error"]["outcome"] == "unknown"
        got = await cashier.request("order.get", order_id="o1")
        assert [lock["holder"]["terminal_id"] for lock in got["locks"]] == ["cashier"]
        await cashier.close()
    finally:
        redis.stop()


async def test_a_payment_applied_before_redis_died_is_answered_200_over_http(
        aof_redis: tuple[RedisServer, RedisProxy], broker_factory: BrokerFactory) -> None:
    """The payment route: Redis records the payment and dies before replying; restarted on
    its AOF, the broker answers 200 with the payment, which was recorded once."""
    redis, proxy = aof_redis
    broker = await start(broker_factory(backend=proxy.url))
    store = unique()
    cashier = await erp(broker.url, store, "cashier")
    assert (await cashier.request("order.publish", order=order("o1"), change="modify"))["ok"]
    held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    body = {"token": held["lock"]["token"], "version": 1, "amount_cents": 1000,
            "payment_ref": "pay-1"}
    url = f"{broker.http}/v1/stores/{store}/orders/o1/payment"
    fired = proxy.arm((b"o1", b"order.paid"), kill_and_restart(redis), after=True)
    status, paid = await ahttp("POST", url, mint(store, "service", "psp"), body)
    assert status == 200, paid
    assert paid["order"]["status"] == "paid" and paid["payment"]["payment_ref"] == "pay-1"
    await asyncio.wait_for(fired.wait(), 20)
    # Recorded once: the same payment again is its idempotent replay, another is refused.
    status, again = await ahttp("POST", url, mint(store, "service", "psp"), body)
    assert status == 200 and again["payment"] == paid["payment"], again
    status, other = await ahttp("POST", url, mint(store, "service", "psp"),
                                {**body, "payment_ref": "pay-2"})
    assert status == 409 and other["error"]["code"] == "ORDER_PAID", other
    await cashier.close()
