"""What survives a crash (docs/operations.md, "What survives a crash"): one test per line.

Real broker processes, real `redis-server` processes, real SIGKILLs. The crash tests first write
the money records of a store (a payment lock held mid-payment, a paid order, payment rejections
one of which was handled, a store config), kill a process, and read them back. The last tests
run the memory backend in this process, to see the order of things around the data file.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tablelock.backends.durable import Journal, Statement
from tablelock.backends.memory import MemoryBackend
from tablelock.model import Order, Terminal
from tablelock.rules import Acquire, Complete, Ingest, Release

from .conftest import Store
from .redis_support import RedisServer
from .support import BrokerProcess, WsClient, ahttp, mint, order, unique

BrokerFactory = Callable[..., BrokerProcess]
GRACE_MS = 120_000  # longer than any test: a lock held at the kill is still held after it


@dataclass
class Money:
    """What a store wrote before the crash."""

    store: str
    held_token: int  # the payment lock on o1, held by the till `till` mid-payment
    tokens: list[int]  # every token granted
    unhandled_id: str  # a payment.rejected entry nobody handled (the reconcile queue)
    handled_id: str  # one the store marked handled


async def erp(url: str, store: str, sub: str = "till", role: str = "erp_main") -> WsClient:
    return await WsClient.connect(url, mint(store, role, sub))


async def manager_http(broker: BrokerProcess, store: str, method: str, path: str,
                       body: Any = None) -> tuple[int, Any]:
    return await ahttp(method, f"{broker.http}/v1/stores/{store}{path}",
                       mint(store, "manager", "boss"), body)


async def write_money(broker: BrokerProcess) -> Money:
    store = unique()
    status, _ = await manager_http(broker, store, "PUT", "/config",
                                   {"disconnect_grace_ms": GRACE_MS})
    assert status == 200
    till = await erp(broker.url, store)
    for order_id in ("o1", "o2", "o3"):
        published = await till.request("order.publish", order=order(order_id, version=3),
                                       change="modify")
        assert published["ok"], published
    paying = await till.request("lock.acquire", order_id="o2", kind="payment")
    paid = await till.request("payment.complete", order_id="o2", version=3, amount_cents=1000,
                              payment_ref="pos-1", token=paying["lock"]["token"])
    assert paid["ok"], paid
    for ref in ("pos-2", "pos-3"):  # paid twice: each is a payment.rejected to reconcile
        again = await till.request("payment.complete", order_id="o2", version=3,
                                   amount_cents=1000, payment_ref=ref)
        assert again["error"]["code"] == "ORDER_PAID", again
    status, body = await manager_http(broker, store, "GET", "/audit?kind=payment.rejected")
    assert status == 200, body
    rejected_ids = [entry["id"] for entry in body["entries"]]
    assert len(rejected_ids) == 2
    status, _ = await manager_http(broker, store, "POST", f"/audit/{rejected_ids[0]}/handled")
    assert status == 200
    held = await till.request("lock.acquire", order_id="o1", kind="payment")
    assert held["ok"], held
    await till.close()
    return Money(store, held["lock"]["token"],
                 [paying["lock"]["token"], held["lock"]["token"]],
                 unhandled_id=rejected_ids[1], handled_id=rejected_ids[0])


async def records_survived(broker: BrokerProcess, money: Money) -> None:
    """The paid order, the reconcile queue, the config and the token order are all there."""
    store = money.store
    status, config = await manager_http(broker, store, "GET", "/config")
    assert status == 200 and config["disconnect_grace_ms"] == GRACE_MS, config
    status, o2 = await manager_http(broker, store, "GET", "/orders/o2")
    assert status == 200 and o2["order"]["status"] == "paid", o2
    status, body = await manager_http(broker, store, "GET", "/audit?kind=payment.rejected")
    assert status == 200, body
    handled = {entry["id"]: entry["handled"] for entry in body["entries"]}
    assert handled == {money.unhandled_id: False, money.handled_id: True}
    till = await erp(broker.url, store, "till-2", role="erp_secondary")
    twice = await till.request("payment.complete", order_id="o2", version=3,
                               amount_cents=1000, payment_ref="pos-4")
    assert twice["error"]["code"] == "ORDER_PAID", twice  # a paid order stays paid
    fresh = await till.request("lock.acquire", order_id="o3", kind="order")
    assert fresh["ok"] and fresh["lock"]["token"] > max(money.tokens), fresh
    await till.close()


async def payment_goes_through(broker: BrokerProcess, money: Money) -> None:
    """The lock held mid-payment is still the till's: nobody else takes it, its token pays."""
    store = money.store
    status, o1 = await manager_http(broker, store, "GET", "/orders/o1")
    assert status == 200, o1
    assert [(lock["kind"], lock["token"], lock["holder"]["terminal_id"])
            for lock in o1["locks"]] == [("payment", money.held_token, "till")], o1
    other = await erp(broker.url, store, "till-2", role="erp_secondary")
    refused = await other.request("lock.acquire", order_id="o1", kind="payment")
    assert refused["error"]["code"] == "PAYMENT_LOCKED", refused
    till = await erp(broker.url, store)
    paid = await till.request("payment.complete", order_id="o1", version=3, amount_cents=1000,
                              payment_ref="pos-5", token=money.held_token)
    assert paid["ok"], paid
    await other.close()
    await till.close()


def kill(broker: BrokerProcess) -> None:
    broker.stop(signal.SIGKILL)


# --- the in-memory backend -------------------------------------------------------------

async def test_memory_without_data_loses_everything_but_tokens_still_increase(
        broker_factory: BrokerFactory) -> None:
    broker = broker_factory().start()
    money = await write_money(broker)
    kill(broker)
    broker = broker_factory(port=broker.port).start()
    status, config = await manager_http(broker, money.store, "GET", "/config")
    assert config["disconnect_grace_ms"] != GRACE_MS
    for order_id in ("o1", "o2"):
        status, _ = await manager_http(broker, money.store, "GET", f"/orders/{order_id}")
        assert status == 404
    status, body = await manager_http(broker, money.store, "GET", "/audit")
    assert body["entries"] == []
    till = await erp(broker.url, money.store)
    await till.request("order.publish", order=order("o1", version=3), change="modify")
    again = await till.request("lock.acquire", order_id="o1", kind="payment")
    # Tokens start from the clock: the new grant's exceeds every token of the dead process.
    assert again["lock"]["token"] > max(money.tokens)
    await till.close()


async def test_memory_with_data_keeps_everything_acknowledged_across_a_sigkill(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    data = {"TABLELOCK_DATA": str(tmp_path / "tablelock.db")}
    broker = broker_factory(env=data).start()
    money = await write_money(broker)
    kill(broker)  # in the middle of the payment of o1
    broker = broker_factory(port=broker.port, env=data).start()
    await payment_goes_through(broker, money)
    await records_survived(broker, money)
    kill(broker)  # and again: what the restarted broker acknowledged survives too
    broker = broker_factory(port=broker.port, env=data).start()
    status, o1 = await manager_http(broker, money.store, "GET", "/orders/o1")
    assert status == 200, o1
    assert o1["order"]["status"] == "paid" and o1["locks"] == [], o1


async def test_memory_with_data_gives_the_holder_its_grace_from_the_restart(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    data = {"TABLELOCK_DATA": str(tmp_path / "tablelock.db")}
    broker = broker_factory(env=data).start()
    store = unique()
    grace_ms = 2_000
    await manager_http(broker, store, "PUT", "/config", {"disconnect_grace_ms": grace_ms})
    till = await erp(broker.url, store)
    await till.request("order.publish", order=order("o1"), change="modify")
    held = await till.request("lock.acquire", order_id="o1", kind="payment")
    kill(broker)
    # Down for longer than the grace: counted from the kill, the grace would be over.
    await asyncio.sleep(grace_ms / 1000 + 0.5)
    broker = broker_factory(port=broker.port, env=data).start()
    up = time.monotonic()
    watcher = await WsClient.connect(broker.url, mint(store, "manager", "boss"))
    subscribed = await watcher.request("subscribe", channel=f"order:{store}:o1")
    assert [lock["token"] for lock in subscribed["snapshot"]["locks"]] == [held["lock"]["token"]]
    released = await watcher.event("lock.released", timeout=15)
    assert released["reason"] == "holder_disconnected"
    assert released["lock"]["token"] == held["lock"]["token"]
    assert time.monotonic() - up < grace_ms / 1000 + 5
    taker = await erp(broker.url, store, "till-2", role="erp_secondary")
    taken = await taker.request("lock.acquire", order_id="o1", kind="payment")
    assert taken["ok"] and taken["lock"]["token"] > held["lock"]["token"], taken
    await watcher.close()
    await taker.close()


async def test_memory_with_data_ends_an_h5_lock_at_its_ttl_not_at_a_grace(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    data = {"TABLELOCK_DATA": str(tmp_path / "tablelock.db")}
    broker = broker_factory(env=data).start()
    store = Store(broker)
    await store.config(h5_payment_lock_ttl_ms=5_000, disconnect_grace_ms=0)
    cashier = await store.erp("cashier")
    await store.publish(cashier, order_id="o1")
    phone = await store.connect("h5", "phone", table="t1")
    pay = await phone.request("lock.acquire", order_id="o1", kind="payment")
    assert pay["ok"], pay
    await store.close()
    kill(broker)
    broker = broker_factory(port=broker.port, env=data).start()
    watcher = await WsClient.connect(broker.url, mint(store.store_id, "manager", "boss"))
    subscribed = await watcher.request("subscribe", channel=f"order:{store.store_id}:o1")
    # With no grace at all, an ERP lock would have ended at the restart: a phone's does not.
    assert [lock["token"] for lock in subscribed["snapshot"]["locks"]] == [pay["lock"]["token"]]
    expired = await watcher.event("lock.expired", timeout=15)
    assert expired["lock"]["token"] == pay["lock"]["token"]
    assert expired["ts"] >= pay["lock"]["expires_at"]
    await watcher.close()


# --- the Redis backend ------------------------------------------------------------------

@pytest.fixture
def aof_always(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "always", appendonly=True, appendfsync="always").start()
    yield server
    server.stop()


@pytest.fixture
def aof_everysec(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "everysec", appendonly=True, appendfsync="everysec").start()
    yield server
    server.stop()


async def ready(broker: BrokerProcess, timeout: float = 20) -> None:
    """Until the broker reaches Redis again after a Redis restart."""
    deadline = time.monotonic() + timeout
    while (await ahttp("GET", f"{broker.http}/readyz"))[0] != 200:
        assert time.monotonic() < deadline, "the broker did not reach Redis again"
        await asyncio.sleep(0.1)


async def test_redis_broker_sigkill_loses_nothing_and_a_peer_ends_its_locks(
        redis: RedisServer, broker_factory: BrokerFactory) -> None:
    doomed = broker_factory(backend=redis.url).start()
    peer = broker_factory(backend=redis.url).start()
    money = await write_money(doomed)
    kill(doomed)
    await records_survived(peer, money)
    await payment_goes_through(peer, money)
    # The dead broker's terminals are offline: a lock of one ends after the grace, ended by
    # the peer broker.
    store = unique()
    await manager_http(peer, store, "PUT", "/config", {"disconnect_grace_ms": 1_000})
    doomed = broker_factory(backend=redis.url).start()
    till = await erp(doomed.url, store)
    await till.request("order.publish", order=order("o1"), change="modify")
    held = await till.request("lock.acquire", order_id="o1", kind="payment")
    watcher = await WsClient.connect(peer.url, mint(store, "manager", "boss"))
    await watcher.request("subscribe", channel=f"order:{store}:o1")
    kill(doomed)
    released = await watcher.event("lock.released", timeout=20)
    assert released["reason"] == "holder_disconnected"
    assert released["lock"]["token"] == held["lock"]["token"]
    await watcher.close()


async def test_redis_sigkill_with_aof_always_loses_nothing_acknowledged(
        aof_always: RedisServer, broker_factory: BrokerFactory) -> None:
    broker = broker_factory(backend=aof_always.url).start()
    money = await write_money(broker)
    aof_always.stop()  # SIGKILL, right after the last acknowledged write
    aof_always.start()
    await ready(broker)
    await payment_goes_through(broker, money)
    await records_survived(broker, money)


async def test_redis_sigkill_with_aof_everysec_keeps_writes_older_than_the_fsync_period(
        aof_everysec: RedisServer, broker_factory: BrokerFactory) -> None:
    broker = broker_factory(backend=aof_everysec.url).start()
    money = await write_money(broker)
    # everysec: the last second or so of acknowledged writes may be lost (two when the disk
    # stalls). What is asserted is what Redis promises: older writes survive.
    await asyncio.sleep(3)
    aof_everysec.stop()  # SIGKILL
    aof_everysec.start()
    await ready(broker)
    await payment_goes_through(broker, money)
    await records_survived(broker, money)


async def test_a_data_file_serves_one_broker_at_a_time(
        tmp_path: Path, broker_factory: BrokerFactory,
        capfd: pytest.CaptureFixture[str]) -> None:
    data = {"TABLELOCK_DATA": str(tmp_path / "tablelock.db")}
    broker_factory(env=data).start()
    with pytest.raises(RuntimeError, match="exited"):
        broker_factory(env=data).start(timeout=30)
    assert "is another broker using it?" in capfd.readouterr().err


async def test_a_failed_write_answers_unavailable_and_a_restart_keeps_what_was_acknowledged(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    data = {"TABLELOCK_DATA": str(tmp_path / "tablelock.db")}
    # A full disk, for the broker alone: files it writes may not grow past 256 KiB (Python
    # ignores SIGXFSZ, so the write fails with EFBIG). The child inherits the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        broker = broker_factory(env=data).spawn()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    broker.wait()
    store = unique()
    till = await erp(broker.url, store)
    items = [{"sku": f"dish-{n}", "note": "x" * 200} for n in range(20)]
    acknowledged = []
    for n in range(200):
        reply = await till.request("order.publish", change="modify",
                                   order=order(f"o{n}", items=items))
        if not reply["ok"]:
            break
        acknowledged.append(f"o{n}")
    assert reply["error"]["code"] == "UNAVAILABLE", reply
    assert 0 < len(acknowledged) < 200
    assert (await ahttp("GET", f"{broker.http}/readyz"))[0] == 503
    refused = await till.request("lock.acquire", order_id="o0", kind="payment")
    assert refused["error"]["code"] == "UNAVAILABLE", refused
    await till.close()
    kill(broker)
    broker = broker_factory(port=broker.port, env=data).start()
    for order_id in acknowledged:
        status, _ = await manager_http(broker, store, "GET", f"/orders/{order_id}")
        assert status == 200, order_id
    status, _ = await manager_http(broker, store, "GET", f"/orders/o{len(acknowledged)}")
    assert status == 404


# --- the order of things with a data file -------------------------------------------------

class SlowDisk(Journal):
    """A data file whose commits take 0.2 s, as a slow fsync does; it notes when each ended."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits_ended: list[float] = []

    def _commit(self, statements: list[Statement]) -> None:
        time.sleep(0.2)
        super()._commit(statements)
        self.commits_ended.append(time.monotonic())


class Recorder:
    """A sink that notes when each event reached it."""

    def __init__(self) -> None:
        self.published: list[float] = []

    def publish(self, channel: str, seq: int, frame: bytes, table_id: str | None) -> None:
        self.published.append(time.monotonic())

    def direct(self, store_id: str, holder: str, frame: bytes,
               unless_on: tuple[str, ...], coalesce: str = "") -> None:
        self.published.append(time.monotonic())

    def has_subscribers(self, channel: str) -> bool:
        return True

    def lost(self, channel: str) -> None:
        pass


async def test_nothing_is_answered_read_or_published_before_it_is_on_disk(
        tmp_path: Path) -> None:
    path = str(tmp_path / "tablelock.db")
    disk = SlowDisk(path)
    backend = MemoryBackend(journal=disk)
    sink = Recorder()
    await backend.start(sink)
    till = Terminal("till", "erp_main", "till", "s1")
    await backend.apply("s1", "o1", Ingest(Order("o1", "t1", 1, 1000)), None)
    written_before = len(disk.commits_ended)
    sink.published.clear()
    granting = asyncio.create_task(backend.apply("s1", "o1", Acquire("payment"), till))
    await asyncio.sleep(0)  # the grant is now in memory, and on its way to the disk
    read = await backend.read("s1", "o1")
    granted = await granting
    answered = time.monotonic()
    assert read is not None and "payment" in read.locks
    assert len(disk.commits_ended) == written_before + 1
    on_disk = disk.commits_ended[-1]
    assert on_disk <= answered
    assert sink.published and min(sink.published) >= on_disk  # lock.acquired, on two channels
    await backend.close()
    restarted = MemoryBackend(journal=Journal(path))
    await restarted.start(Recorder())
    back = await restarted.read("s1", "o1")
    assert granted.record is not None and back is not None
    assert back.locks["payment"].token == granted.record.locks["payment"].token
    await restarted.close()


async def test_the_data_file_keeps_the_bounded_audit_log_and_every_unhandled_rejection(
        tmp_path: Path) -> None:
    path = str(tmp_path / "tablelock.db")
    backend = MemoryBackend(audit_size=3, journal=Journal(path))
    await backend.start(Recorder())
    till = Terminal("till", "erp_main", "till", "s1")
    await backend.apply("s1", "o1", Ingest(Order("o1", "t1", 1, 1000)), till)
    rejected = await backend.apply("s1", "o1", Complete(None, 9, 1000, "pos-1"), till)
    assert rejected.refusal is not None
    for _ in range(3):  # six entries more: the rejection leaves the bounded log, not the file
        grant = await backend.apply("s1", "o1", Acquire("payment"), till)
        assert grant.record is not None
        token = grant.record.locks["payment"].token
        await backend.apply("s1", "o1", Release("payment", token), till)
    listed = await backend.audit("s1", None, 100)
    assert len(listed) == 4  # the last three, and the rejection still unhandled
    await backend.close()
    for _ in range(2):  # read back, and read back what the first read-back kept
        restarted = MemoryBackend(audit_size=3, journal=Journal(path))
        await restarted.start(Recorder())
        assert [(e.id, e.kind, e.handled) for e in await restarted.audit("s1", None, 100)] == [
            (e.id, e.kind, e.handled) for e in listed]
        assert [e.handled for e in listed if e.kind == "payment.rejected"] == [False]
        await restarted.close()
    restarted = MemoryBackend(audit_size=3, journal=Journal(path))
    await restarted.start(Recorder())
    (entry,) = await restarted.audit("s1", "payment.rejected", 10)
    assert await restarted.mark_handled("s1", entry.id)
    await restarted.close()
    restarted = MemoryBackend(audit_size=3, journal=Journal(path))
    await restarted.start(Recorder())
    assert await restarted.audit("s1", "payment.rejected", 10) == []  # handled, then evicted
    assert len(await restarted.audit("s1", None, 100)) == 3
    await restarted.close()
