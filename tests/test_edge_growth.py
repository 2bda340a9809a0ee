"""Amplification, growth, scoping and cost at the internet edge (docs/security.md).

Each test performs the attack against real broker processes (and a real redis-server where
the backend matters) and asserts both the outcome and the bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Store
from .support import BrokerProcess, WsClient, unique

BrokerFactory = Callable[..., BrokerProcess]


def started(factory: BrokerFactory, backend: str, **env: object) -> BrokerProcess:
    """A dedicated broker whose TABLELOCK_<NAME> settings are the given ones."""
    return factory(backend=backend,
                   env={f"TABLELOCK_{k.upper()}": str(v) for k, v in env.items()}).start()


# --- 1. lock.contended is coalesced per holder, lock and requester ------------------------

async def test_refused_requests_repeated_tell_the_holder_once_per_window(
        broker_factory: BrokerFactory, backend_url: str) -> None:
    window_s = 1.5
    broker = started(broker_factory, backend_url, contended_window_ms=int(window_s * 1000))
    store = Store(broker)
    try:
        erp = await store.erp("erp")
        await store.publish(erp, order_id="o", table_id="t1")
        assert (await erp.request("lock.acquire", order_id="o", kind="order"))["ok"]
        phone = await store.connect("h5", "phone", table="t1")
        other = await store.connect("h5", "other-phone", table="t1")
        me, someone = (c.hello["terminal"]["terminal_id"] for c in (phone, other))

        began = time.monotonic()
        replies = await asyncio.gather(*(
            phone.request("lock.acquire", order_id="o", kind="payment") for _ in range(300)))
        assert {r["error"]["code"] for r in replies} == {"ORDER_LOCKED"}
        # Another requester is other news: the holder hears of it too.
        assert not (await other.request("lock.acquire", order_id="o", kind="payment"))["ok"]
        await erp.request("ping")  # whatever was sent to the ERP before this has arrived
        elapsed = time.monotonic() - began
        notices = [f for f in erp.frames if f.get("event") == "lock.contended"]
        by_phone = [n for n in notices if n["by"]["terminal_id"] == me]
        assert 1 <= len(by_phone) <= 1 + int(elapsed / window_s), (len(by_phone), elapsed)
        assert [n["by"]["terminal_id"] for n in notices].count(someone) == 1

        # Once the window has passed, the same requester is news again.
        await asyncio.sleep(window_s)
        while not erp.events.empty():  # what came before is read: wait for the next one
            erp.events.get_nowait()
        count = len([f for f in erp.frames if f.get("event") == "lock.contended"
                     and f["by"]["terminal_id"] == me])
        assert not (await phone.request("lock.acquire", order_id="o", kind="payment"))["ok"]
        await erp.event("lock.contended", where=lambda e: e["by"]["terminal_id"] == me)
        assert erp.close_code is None  # never closed as a slow consumer
        assert len([f for f in erp.frames if f.get("event") == "lock.contended"
                    and f["by"]["terminal_id"] == me]) == count + 1
    finally:
        await store.close()


# --- 6. a refusal does not rewrite the record (Redis contention) --------------------------

async def test_refusals_do_not_make_the_erp_unavailable_on_redis(
        broker_factory: BrokerFactory, redis_server: Any) -> None:
    broker = started(broker_factory, redis_server.url, rate_per_s=100_000, rate_burst=100_000)
    store = Store(broker)
    try:
        erp = await store.erp("erp")
        await store.publish(erp, order_id="o", table_id="t1", amount_cents=1000)
        phones = [await store.connect("h5", "phone", table="t1") for _ in range(3)]
        tills = [await store.connect("erp_secondary", f"till{n}") for n in range(3)]
        bogus = {"order_id": "o", "token": 1, "version": 1, "amount_cents": 1,
                 "payment_ref": "forged"}
        done = asyncio.Event()
        refused: list[str] = []

        async def hammer(client: WsClient, type_: str, **params: Any) -> None:
            while not done.is_set():
                replies = await asyncio.gather(*(client.request(type_, **params)
                                                 for _ in range(20)))
                refused.extend(r["error"]["code"] for r in replies)

        hammers = [asyncio.create_task(hammer(p, "payment.complete", **bogus)) for p in phones]
        hammers += [asyncio.create_task(hammer(p, "lock.release", order_id="o", kind="payment",
                                                  token=1))
                    for p in phones]
        hammers += [asyncio.create_task(hammer(t, "payment.complete", **bogus)) for t in tills]
        codes = []
        try:
            while len(refused) < 200:
                await asyncio.sleep(0.01)
            for _ in range(100):
                acquired = await erp.request("lock.acquire", order_id="o", kind="order")
                codes.append("OK" if acquired["ok"] else acquired["error"]["code"])
                if acquired["ok"]:
                    released = await erp.request("lock.release", order_id="o", kind="order",
                                                 token=acquired["lock"]["token"])
                    codes.append("OK" if released["ok"] else released["error"]["code"])
        finally:
            done.set()
            await asyncio.gather(*hammers, return_exceptions=True)
        assert codes == ["OK"] * 200, sorted(set(codes))
        rejected = await store.audit("payment.rejected", limit=10)
        assert rejected, "the tills' forged payments are still audited"
    finally:
        await store.close()


# --- 4. table scope is checked on the record that is shown --------------------------------

async def test_a_phone_never_sees_another_tables_order_in_a_snapshot(store: Store) -> None:
    erp = await store.erp("erp")
    phone = await store.connect("h5", "phone", table="t1")
    shown = []
    for n in range(60):  # the order comes into being while the phone subscribes to it
        order_id = f"race{n}"
        sub, published = await asyncio.gather(
            phone.request("subscribe", channel=store.channel(order_id)),
            store.publish(erp, order_id=order_id, table_id="t2"))
        assert published["ok"]
        if sub["ok"]:
            shown.append(sub["snapshot"]["order"])
        else:
            assert sub["error"]["code"] == "FORBIDDEN"
    assert all(order is None for order in shown), [o for o in shown if o]
    # ...and once it exists, the phone is refused it outright.
    refused = await phone.request("subscribe", channel=store.channel("race0"))
    assert refused["error"]["code"] == "FORBIDDEN"


async def test_since_replays_to_a_phone_only_what_happened_at_its_table(store: Store) -> None:
    erp = await store.erp("erp")
    phone = await store.connect("h5", "phone", table="t1")
    before = await phone.request("subscribe", channel=store.channel("moved"))
    assert before["ok"] and before["snapshot"]["order"] is None
    # While the order is table t2's, things happen to it...
    assert (await store.publish(erp, order_id="moved", table_id="t2"))["ok"]
    held = await erp.request("lock.acquire", order_id="moved", kind="order")
    assert (await erp.request("lock.release", order_id="moved", kind="order",
                              token=held["lock"]["token"]))["ok"]
    # ...then it moves to the phone's table.
    assert (await store.publish(erp, order_id="moved", table_id="t1", version=2))["ok"]
    watcher = await store.connect("manager", "m")
    full = await watcher.request("subscribe", channel=store.channel("moved"),
                                 since=before["seq"])
    assert full["recovered"] and len(full["missed"]) == 4  # what an ERP may replay

    again = await phone.request("subscribe", channel=store.channel("moved"), since=before["seq"])
    assert again["ok"] and again["recovered"]
    assert [e["order"]["table_id"] for e in again["missed"]] == ["t1"]
    assert all(e.get("table_id", "t1") == "t1" for e in again["missed"])
    assert again["snapshot"]["order"]["table_id"] == "t1"


# --- 2. the pulls a terminal can make the ERP answer are bounded ---------------------------

async def test_a_phone_cannot_turn_random_order_ids_into_erp_pulls(store: Store) -> None:
    erp = await store.erp("erp")
    asked: list[dict[str, str]] = []
    answer = erp.rpc_handler
    assert answer is not None

    async def counting(frame: dict[str, Any]) -> dict[str, Any] | None:
        asked.append(frame["params"])
        return await answer(frame)
    erp.rpc_handler = counting
    phone = await store.connect("h5", "phone", table="t1")
    began = time.monotonic()
    gets = await asyncio.gather(*(phone.request("order.get", order_id=unique("o"), fresh=True,
                                                timeout=15) for _ in range(250)))
    acquires = await asyncio.gather(*(
        phone.request("lock.acquire", order_id=unique("o"), kind="payment", timeout=15)
        for _ in range(250)))
    elapsed = time.monotonic() - began
    codes = [r["error"]["code"] for r in gets + acquires]
    # Default budget: 20 at once, one more a second.
    assert len(asked) <= 20 + 1 * elapsed + 1, (len(asked), elapsed)
    assert codes.count("RATE_LIMITED") >= 500 - len(asked)
    assert set(codes) <= {"RATE_LIMITED", "ERP_UNAVAILABLE"}
    # The ERP was not flooded: it still answers another terminal's pull at once.
    await store.publish(erp, order_id="real", table_id="t1")
    till = await store.connect("erp_secondary", "till")
    assert (await till.request("order.get", order_id="real", fresh=True))["ok"]


async def test_concurrent_pulls_of_one_order_make_one_rpc(store: Store) -> None:
    erp = await store.erp("erp")
    await store.publish(erp, order_id="o", table_id="t1")
    asked: list[dict[str, str]] = []
    answer = erp.rpc_handler
    assert answer is not None

    async def slow(frame: dict[str, Any]) -> dict[str, Any] | None:
        asked.append(frame["params"])
        await asyncio.sleep(0.5)  # an ERP that takes its time: the pulls overlap
        return await answer(frame)
    erp.rpc_handler = slow
    phones = [await store.connect("h5", unique("phone"), table="t1") for _ in range(5)]
    replies = await asyncio.gather(*(
        phone.request("order.get", order_id="o", fresh=True) for phone in phones
        for _ in range(4)))
    assert all(r["ok"] and r["order"]["order_id"] == "o" for r in replies)
    assert asked == [{"order_id": "o"}]


# --- 3. growth driven by clients ------------------------------------------------------------

def rss_kib(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    with open(f"/proc/{broker.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def subscribe_to_unknown_orders(client: WsClient, store: Store, count: int) -> None:
    for start in range(0, count, 100):
        channels = [store.channel(unique("nope")) for _ in range(min(100, count - start))]
        subs = await asyncio.gather(*(client.request("subscribe", channel=c) for c in channels))
        assert all(s["ok"] and s["snapshot"]["order"] is None for s in subs)
        await asyncio.gather(*(client.request("unsubscribe", channel=c) for c in channels))


async def test_channels_of_unknown_orders_go_with_their_last_subscriber(
        broker_factory: BrokerFactory) -> None:
    broker = started(broker_factory, "memory", rate_per_s=1_000_000, rate_burst=1_000_000)
    store = Store(broker)
    try:
        phone = await store.connect("h5", "phone", table="t1")
        await subscribe_to_unknown_orders(phone, store, 5_000)  # warm up the allocator
        before = rss_kib(broker)
        await subscribe_to_unknown_orders(phone, store, 40_000)
        after = rss_kib(broker)
        print(f"memory backend: RSS {before} KiB -> {after} KiB after 40,000 unknown orders")
        assert after - before < 3 * 1024, (before, after)  # was ~10 MiB: a channel each
    finally:
        await store.close()


async def test_redis_seqs_of_unknown_orders_are_bounded(
        broker_factory: BrokerFactory, redis_server: Any) -> None:
    import redis.asyncio as aioredis

    broker = started(broker_factory, redis_server.url, rate_per_s=1_000_000,
                     rate_burst=1_000_000, max_unknown_order_seqs=500)
    store = Store(broker)
    client = aioredis.Redis.from_url(redis_server.url)
    seqs = f"tl:{{store:{store.store_id}}}:seq"
    try:
        erp = await store.erp("erp")
        phone = await store.connect("h5", "phone", table="t1")
        # A subscriber of an order not seen yet gets the seq that its first event follows.
        early = await phone.request("subscribe", channel=store.channel("soon"))
        await store.publish(erp, order_id="soon", table_id="t1")
        first = await phone.event("order.updated")
        assert first["seq"] == early["seq"] + 1
        before = await client.hlen(seqs)
        await subscribe_to_unknown_orders(phone, store, 3_000)
        after = await client.hlen(seqs)
        print(f"redis backend: seq fields {before} -> {after} after 3,000 unknown orders")
        assert after <= before + 500 + 8, (before, after)
        assert await client.hexists(seqs, store.channel("soon"))  # an order's own stays
    finally:
        await client.aclose()
        await store.close()


async def test_a_phone_reconnecting_in_a_loop_leaves_the_store_history_alone(
        broker_factory: BrokerFactory, backend_url: str) -> None:
    broker = started(broker_factory, backend_url, h5_presence_linger_ms=1_500,
                     rate_per_s=1_000_000, rate_burst=1_000_000)
    store = Store(broker)
    try:
        till = await store.connect("erp_secondary", "till")
        sub = await till.request("subscribe", channel=store.channel())
        token = store.token("h5", "churner", "t1")
        for _ in range(300):  # 600 presence events if each counted: past the 512 kept
            phone = await WsClient.connect(broker.url, token)
            await phone.close()
        churner = phone.hello["terminal"]["terminal_id"]
        again = await till.request("subscribe", channel=store.channel(), since=sub["seq"])
        assert again["recovered"], "the store channel's history still reaches back"
        presence = [e["event"] for e in again["missed"]]
        assert presence == ["terminal.online"], presence
        # Gone for good: said once, after the linger.
        gone = await till.event("terminal.offline", timeout=10,
                                where=lambda e: e["terminal"]["terminal_id"] == churner)
        assert gone["seq"] == again["seq"] + 1
    finally:
        await store.close()


async def test_unhandled_payment_rejections_are_bounded_per_terminal(
        broker_factory: BrokerFactory, backend_url: str) -> None:
    bound = 5
    broker = started(broker_factory, backend_url, max_unhandled_per_terminal=bound,
                     rate_per_s=1_000_000, rate_burst=1_000_000)
    store = Store(broker)
    try:
        erp = await store.erp("erp")
        await store.publish(erp, order_id="o", table_id="t1")
        tills = [await store.connect("erp_secondary", f"till{n}") for n in range(2)]
        till0, till1 = (till.hello["terminal"]["terminal_id"] for till in tills)
        forged = {"order_id": "o", "token": 1, "version": 1, "amount_cents": 1}

        async def forge(till: WsClient, count: int) -> None:
            replies = await asyncio.gather(*(till.request(
                "payment.complete", payment_ref=unique("forged"), **forged)
                for _ in range(count)))
            assert all(not r["ok"] for r in replies)

        async def unhandled() -> dict[str, int]:
            found: dict[str, int] = {}
            for entry in await store.audit("payment.rejected", limit=100_000):
                if entry["handled"] is False:
                    who = entry["terminal"]["terminal_id"]
                    found[who] = found.get(who, 0) + 1
            return found

        await forge(tills[0], 2)
        assert await unhandled() == {till0: 2}
        await forge(tills[0], 600)
        await forge(tills[1], 3)
        kept = await unhandled()
        print(f"{backend_url}: unhandled rejections kept {kept} after 605 forged payments")
        assert kept == {till0: bound, till1: 3}
        # Past the bound they are still logged, as ordinary entries that age out.
        newest = (await store.audit("payment.rejected", limit=1))[0]
        assert newest["handled"] is None or newest["terminal"]["terminal_id"] == till1
        overflow = [e for e in await store.audit("payment.rejected", limit=50)
                    if e["terminal"]["terminal_id"] == till0]
        assert overflow and all(e["handled"] is None and e["detail"]["untracked"]
                                for e in overflow)
        # Handling one makes room for one more.
        oldest = [e for e in await store.audit("payment.rejected", limit=100_000)
                  if e["handled"] is False and e["terminal"]["terminal_id"] == till0][-1]
        status, _ = await store.http("POST", f"/audit/{oldest['id']}/handled")
        assert status == 200
        await forge(tills[0], 3)
        assert (await unhandled())[till0] == bound
    finally:
        await store.close()


# --- 5. order.get by table reads the table's orders, not the store's -----------------------

async def test_order_get_by_table_follows_moves_among_many_orders(
        broker_factory: BrokerFactory, backend_url: str) -> None:
    broker = started(broker_factory, backend_url, rate_per_s=1_000_000, rate_burst=1_000_000)
    store = Store(broker)
    try:
        await order_get_by_table_follows_moves(store)
    finally:
        await store.close()


async def order_get_by_table_follows_moves(store: Store) -> None:
    erp = await store.erp("erp")
    for start in range(0, 2_000, 250):
        await asyncio.gather(*(store.publish(erp, order_id=f"bulk{n}", table_id=f"x{n % 50}")
                               for n in range(start, start + 250)))
    assert (await store.publish(erp, order_id="first", table_id="t1"))["ok"]
    phone = await store.connect("h5", "phone", table="t1")

    async def order_of(table: str) -> str | None:
        reply = await erp.request("order.get", table_id=table)
        return reply["order"]["order_id"] if reply["ok"] else None

    assert await order_of("t1") == "first"
    assert (await phone.request("order.get", table_id="t1"))["order"]["order_id"] == "first"
    # The order moves to t2; t1 gets a new one.
    assert (await store.publish(erp, order_id="first", table_id="t2", version=2))["ok"]
    assert await order_of("t1") is None
    assert await order_of("t2") == "first"
    assert (await store.publish(erp, order_id="second", table_id="t1"))["ok"]
    assert await order_of("t1") == "second"
    # An open order comes before a closed one of the same table.
    assert (await store.publish(erp, order_id="second", table_id="t1", version=2,
                                status="closed", change="status"))["ok"]
    assert (await store.publish(erp, order_id="third", table_id="t1"))["ok"]
    assert await order_of("t1") == "third"
    assert await order_of("x7") in {f"bulk{n}" for n in range(7, 2_000, 50)}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_retention_takes_an_order_out_of_its_table_and_numbering(
        kind: str, request: pytest.FixtureRequest) -> None:
    """In process, so that retention can be shorter than the minute PUT config allows."""
    from tablelock.backends.base import Backend
    from tablelock.backends.memory import MemoryBackend
    from tablelock.backends.redis import RedisBackend
    from tablelock.hub import Hub
    from tablelock.model import Order, StoreConfig, Terminal
    from tablelock.rules import Publish, Tick

    store_id = unique()
    backend: Backend
    if kind == "memory":
        backend = MemoryBackend()
    else:
        backend = RedisBackend(request.getfixturevalue("redis_server").url, prefix=unique("t"))
    await backend.start(Hub())
    erp = Terminal("erp", "erp_main", "ERP", store_id)
    try:
        await backend.put_config(store_id, StoreConfig(order_retention_ms=50))
        paid = Order("gone", "t1", 1, 100, status="paid")
        assert (await backend.apply(store_id, "gone", Publish(paid, "status"), erp)).record
        assert await backend.find_order(store_id, "t1") == "gone"
        await asyncio.sleep(0.2)
        assert (await backend.apply(store_id, "gone", Tick(), None)).record is None
        assert await backend.find_order(store_id, "t1") is None
        if isinstance(backend, RedisBackend):
            keys = backend.keys(store_id)
            link = backend._link
            assert not await link.execute(keys.table("t1"), "EXISTS", keys.table("t1"))
            assert not await link.execute(keys.seqs, "HEXISTS", keys.seqs,
                                          f"order:{store_id}:gone")
        else:
            assert f"order:{store_id}:gone" not in backend._channels
    finally:
        await backend.close()
