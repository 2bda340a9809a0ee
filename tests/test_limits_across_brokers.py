"""The connection limits that protect a store count over every broker on one Redis: two real
brokers, real WebSocket clients, a real redis-server (docs/operations.md, "Which limits
count across brokers")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tablelock.backends.base import Backend
from tablelock.backends.memory import MemoryBackend
from tablelock.backends.redis import RedisBackend
from tablelock.model import Terminal
from tablelock.rules import ConnectionCounts

from .conftest import Store
from .redis_support import RedisServer
from .support import BrokerProcess, WsClient, unique

BrokerFactory = Callable[..., BrokerProcess]
# RedisBackend's dead_after_s: a broker's counts lapse this long after its last refresh.
LAPSE_S = 3.0


def two_brokers(factory: BrokerFactory, redis_server: RedisServer,
                **settings: int) -> tuple[BrokerProcess, BrokerProcess]:
    env = {f"TABLELOCK_{name.upper()}": str(value) for name, value in settings.items()}
    first, second = (factory(backend=redis_server.url, env=env).spawn() for _ in range(2))
    return first.wait(), second.wait()


async def hello(broker: BrokerProcess, token: str) -> tuple[dict[str, Any], WsClient]:
    client = await WsClient.connect(broker.url, hello=False)
    return await client.request("hello", token=token, protocol=1, locale="en"), client


async def refused(broker: BrokerProcess, token: str) -> str:
    """The hello's refusal and close code, e.g. 'LIMIT_REACHED 4008'; 'OK' if welcomed."""
    reply, client = await hello(broker, token)
    if reply["ok"]:
        await client.close()
        return "OK"
    return f"{reply['error']['code']} {await client.closed()}"


async def admitted_within(broker: BrokerProcess, token: str, seconds: float) -> WsClient:
    """Say hello until one is welcomed: the time a freed or lapsed count takes to show."""
    deadline = time.monotonic() + seconds
    while True:
        reply, client = await hello(broker, token)
        if reply["ok"]:
            return client
        await client.closed()
        assert time.monotonic() < deadline, reply
        await asyncio.sleep(0.05)


async def test_the_store_limit_counts_connections_on_both_brokers(
        broker_factory: BrokerFactory, redis_server: RedisServer) -> None:
    a, b = two_brokers(broker_factory, redis_server, max_connections_per_store=3)
    on_a, on_b, other = Store(a), Store(b), Store(b)
    on_b.store_id = on_a.store_id
    try:
        await on_a.connect("erp_main", "till-1")
        await on_a.connect("erp_secondary", "pos-1")
        await on_b.connect("manager", "boss")
        late = on_a.token("erp_secondary", "pos-2")
        assert await refused(a, late) == "LIMIT_REACHED 4008"
        assert await refused(b, late) == "LIMIT_REACHED 4008"
        await other.connect("erp_main")  # another store has its own count
        assert all([(await c.request("ping"))["ok"] for c in on_a.clients + on_b.clients])
        # A place freed on one broker can be taken on the other.
        await on_a.clients[1].close()
        on_b.clients.append(await admitted_within(b, late, 5))
        assert await refused(a, on_a.token("manager")) == "LIMIT_REACHED 4008"
    finally:
        for store in (on_a, on_b, other):
            await store.close()


async def test_the_terminal_limit_counts_connections_on_both_brokers(
        broker_factory: BrokerFactory, redis_server: RedisServer) -> None:
    a, b = two_brokers(broker_factory, redis_server, max_connections_per_terminal=2)
    on_a, on_b = Store(a), Store(b)
    on_b.store_id = on_a.store_id
    try:
        await on_a.connect("erp_main", "till-1")
        await on_b.connect("erp_main", "till-1")
        till = on_a.token("erp_main", "till-1")
        assert await refused(a, till) == "LIMIT_REACHED 4008"
        assert await refused(b, till) == "LIMIT_REACHED 4008"
        await on_b.connect("erp_secondary", "till-2")  # another terminal is not concerned
    finally:
        await on_a.close()
        await on_b.close()


async def test_a_killed_brokers_connections_stop_counting_within_the_lapse(
        broker_factory: BrokerFactory, redis_server: RedisServer) -> None:
    a, b = two_brokers(broker_factory, redis_server, max_connections_per_store=2)
    on_a, on_b = Store(a), Store(b)
    on_b.store_id = on_a.store_id
    try:
        await on_a.connect("erp_main", "till-1")
        await on_a.connect("manager", "boss")
        late = on_b.token("erp_secondary", "pos-1")
        assert a.proc is not None
        a.proc.kill()  # SIGKILL: no goodbye, no uncount
        killed_at = time.monotonic()
        a.proc.wait()
        assert await refused(b, late) == "LIMIT_REACHED 4008"  # its counts still stand
        on_b.clients.append(await admitted_within(b, late, LAPSE_S + 2))
        lapsed_after = time.monotonic() - killed_at
        assert lapsed_after <= LAPSE_S + 1, lapsed_after  # the bound, with a hello's slack
        await on_b.connect("manager", "boss")  # both of the dead broker's places are free
        assert await refused(b, on_b.token("manager")) == "LIMIT_REACHED 4008"
    finally:
        await on_b.close()


async def race(brokers: tuple[BrokerProcess, BrokerProcess], tokens: list[str],
               redis_server: RedisServer) -> tuple[list[str], list[WsClient]]:
    """Every hello in flight at once, alternating between the brokers, while Redis pauses so
    that their counts reach it together."""
    clients = [await WsClient.connect(brokers[n % 2].url, hello=False)
               for n in range(len(tokens))]
    pause = aioredis.from_url(redis_server.url)
    await pause.execute_command("CLIENT", "PAUSE", 300, "ALL")
    await pause.aclose()
    replies = await asyncio.gather(*[c.request("hello", token=t, protocol=1)
                                     for c, t in zip(clients, tokens, strict=True)])
    return sorted("OK" if r["ok"] else r["error"]["code"] for r in replies), clients


@pytest.mark.parametrize("limit", ["store", "terminal"])
async def test_simultaneous_hellos_on_two_brokers_let_exactly_the_limit_in(
        broker_factory: BrokerFactory, redis_server: RedisServer, limit: str) -> None:
    brokers = two_brokers(broker_factory, redis_server, max_connections_per_store=5,
                          max_connections_per_terminal=2)
    store = Store(brokers[0])
    tokens = ([store.token("erp_secondary", f"pos-{n}") for n in range(16)] if limit == "store"
              else [store.token("erp_main", "till-1")] * 8)
    allowed = 5 if limit == "store" else 2
    clients: list[WsClient] = []
    try:
        codes, clients = await race(brokers, tokens, redis_server)
        assert codes == ["LIMIT_REACHED"] * (len(tokens) - allowed) + ["OK"] * allowed, codes
    finally:
        for client in clients:
            await client.close()


# --- the counting itself, in-process, on both backends ----------------------------------------

def till(store_id: str, sub: str, role: str = "erp_secondary") -> Terminal:
    return Terminal(sub, role, sub, store_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_both_backends_count_a_store_and_its_terminals_alike(
        backend: str, request: pytest.FixtureRequest) -> None:
    counter: Backend = (MemoryBackend() if backend == "memory" else
                        RedisBackend(request.getfixturevalue("redis_server").url))
    store = unique()
    try:
        assert await counter.count_connection(till(store, "a")) == ConnectionCounts(1, 1)
        assert await counter.count_connection(till(store, "a")) == ConnectionCounts(2, 2)
        assert await counter.count_connection(till(store, "b")) == ConnectionCounts(3, 1)
        # The same sub in another role is another terminal (model.holder_key).
        assert await counter.count_connection(till(store, "a", "manager")) == (
            ConnectionCounts(4, 1))
        await counter.uncount_connection(till(store, "a"))
        assert await counter.count_connection(till(store, "a")) == ConnectionCounts(4, 2)
        assert await counter.count_connection(till(unique(), "a")) == ConnectionCounts(1, 1)
    finally:
        await counter.close()


async def test_a_live_broker_taken_for_dead_says_its_counts_again(
        redis_server: RedisServer) -> None:
    lapse_s = 0.3
    first, second = (RedisBackend(redis_server.url, dead_after_s=lapse_s) for _ in range(2))
    store = unique()
    try:
        await first.count_connection(till(store, "a"))
        await first.count_connection(till(store, "b"))
        await asyncio.sleep(lapse_s * 1.5)  # the lapse itself is what is tested
        # Without a refresh, the first broker's counts have lapsed: the second sees its own.
        assert await second.count_connection(till(store, "a")) == ConnectionCounts(1, 1)
        await first._refresh_counts(await first.now())  # its heartbeat: taken for dead, recount
        assert await second.count_connection(till(store, "b")) == ConnectionCounts(4, 2)
    finally:
        await first.close()
        await second.close()
