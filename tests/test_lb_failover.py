"""A broker dies behind the shipped load balancer, and nobody notices more than they should.

A real redis-server, two real brokers on it, and nginx (or HAProxy) from docs/deploy in
front of them, round-robin. Every terminal of a store (erp_main, erp_secondary, an h5 of a
table, a manager's dashboard) connects through the proxy with the Python SDK, as a client
author would. While locks are held and two ERPs (one on each broker) publish, the broker
that serves half of them is SIGKILLed. Then:

- every SDK client is fresh again, through the proxy, on the survivor;
- every mirror applied exactly the events of its channel, in seq order, with no gap it had
  to paper over with a snapshot (what the dead broker's clients missed came back through
  `since` on the other broker), and shows the true state;
- the holder that came back within the disconnect grace keeps its lock and token (until a
  forced takeover, after which its token is FENCED); the phone keeps its payment lock; the
  terminal that never came back loses its lock to `holder_disconnected`, not before the
  grace is over; its stale token is then FENCED, and each order is paid once.

The truth is told by an auditor: a raw protocol client connected to each broker directly,
not through the proxy, subscribed before any terminal connected.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tablelock_client as tl

from .redis_support import RedisServer
from .support import BrokerProcess, WsClient, ahttp, free_port, mint, order, unique
from .test_deploy_kit import get, needs_haproxy, needs_nginx, proxy_command, running

BrokerFactory = Callable[..., BrokerProcess]
GRACE_MS = 2_000  # the store's disconnect grace: short, and still longer than a reconnect
# The SDK's reconnect backoff, kept short so that the test stays quick; the grace above
# leaves room for several attempts (HAProxy sends some to the dead broker until its health
# check notices, nginx skips it at once).
BACKOFF = {"backoff_initial": 0.1, "backoff_max": 0.5}
RECOVERY_S = 20.0
PUBLISH_EVERY_S = 0.02


def connections(broker: BrokerProcess) -> int:
    """The broker's open authenticated connections, from its own /metrics."""
    text = get(f"{broker.http}/metrics")[1]
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("tablelock_connections{")))


@dataclass
class Recorded:
    """What one SDK mirror did: the seq it started from, then every change, in order."""

    mirror: tl.Mirror
    start: int
    applied: list[tuple[int, str]] = field(default_factory=list)  # (seq, event)
    snapshots: list[int] = field(default_factory=list)  # seqs of wholesale replacements
    replayed: int = 0  # events applied while stale: what `since` brought back after a drop
    moved: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def follow(cls, mirror: tl.Mirror) -> Recorded:
        # No await between the subscribe and this: no change can slip past.
        recorded = cls(mirror, mirror.seq)
        mirror.on_change(recorded.change)
        return recorded

    def change(self, change: tl.Change) -> None:
        if change.event == "snapshot":
            self.snapshots.append(change.seq or 0)
        elif change.event not in ("stale", "fresh"):
            assert change.seq is not None
            self.applied.append((change.seq, change.event))
            self.replayed += self.mirror.stale
        self.moved.set()

    async def reach(self, seq: int) -> None:
        while self.mirror.seq < seq or self.mirror.stale:
            self.moved.clear()
            await asyncio.wait_for(self.moved.wait(), RECOVERY_S)


class Auditor:
    """A raw client on one broker that hears every event of the channels under watch."""

    def __init__(self, client: WsClient, starts: dict[str, int]) -> None:
        self.client = client
        self.starts = starts

    @classmethod
    async def watch(cls, broker: BrokerProcess, store: str, channels: list[str]) -> Auditor:
        client = await WsClient.connect(broker.url, mint(store, "manager", unique("audit")))
        starts = {}
        for channel in channels:
            starts[channel] = (await client.request("subscribe", channel=channel))["seq"]
        return cls(client, starts)

    def events(self, channel: str) -> list[dict[str, Any]]:
        return [f for f in self.client.frames
                if f.get("type") == "event" and f.get("channel") == channel]

    def last_seq(self, channel: str) -> int:
        return max([self.starts[channel], *(f["seq"] for f in self.events(channel))])

    def check_contiguous(self, channel: str) -> None:
        seqs = [f["seq"] for f in self.events(channel)]
        first = self.starts[channel] + 1
        assert seqs == list(range(first, first + len(seqs))), (channel, seqs)

    def after(self, channel: str, seq: int, end: int) -> list[tuple[int, str]]:
        return [(f["seq"], f["event"]) for f in self.events(channel) if seq < f["seq"] <= end]


async def sdk(front: str, store: str, role: str, sub: str, table: str | None = None,
              gate: asyncio.Event | None = None, **kw: Any) -> tl.Client:
    """An SDK client through the proxy. With `gate`, its token source (asked at every
    reconnect) waits for it, as one that fetches a token from a slow sign-in service."""
    async def token() -> str:
        if gate is not None:
            await gate.wait()
        return mint(store, role, sub, table)

    return await tl.connect(f"ws://{front}/ws", token, locale="en", **BACKOFF, **kw)


async def placed(brokers: list[BrokerProcess], connect: Awaitable[tl.Client],
                 ) -> tuple[tl.Client, int]:
    """Open one connection through the proxy; returns it and the index of its broker."""
    before = [await asyncio.to_thread(connections, b) for b in brokers]
    client = await connect
    after = [await asyncio.to_thread(connections, b) for b in brokers]
    grown = [n for n, (b, a) in enumerate(zip(before, after, strict=True)) if a == b + 1]
    assert len(grown) == 1 and sum(after) == sum(before) + 1, (before, after)
    return client, grown[0]


@pytest.mark.parametrize("kind", [pytest.param("nginx", marks=needs_nginx),
                                  pytest.param("haproxy", marks=needs_haproxy)])
async def test_a_broker_killed_behind_the_proxy(kind: str, tmp_path: Path, redis: RedisServer,
                                                broker_factory: BrokerFactory) -> None:
    brokers = [broker_factory(backend=redis.url).start(),
               broker_factory(backend=redis.url).start()]
    port = free_port()
    front = f"127.0.0.1:{port}"
    with running(proxy_command(kind, tmp_path, brokers, port), front):
        await failover(front, brokers)


async def failover(front: str, brokers: list[BrokerProcess]) -> None:
    store = unique()
    store_channel = f"store:{store}"
    order_channels = {"phone": f"order:{store}:o3", "diner": f"order:{store}:o4"}
    auditors = [await Auditor.watch(b, store, [store_channel, *order_channels.values()])
                for b in brokers]
    orders = {f"o{n}": order(f"o{n}", table_id=f"t{n}") for n in range(1, 6)}

    # The terminal that will never come back: its token source stops working.
    revoked = False

    def leaver_token() -> str:
        return "revoked" if revoked else mint(store, "erp_secondary", "till-gone")

    # Two of the dead broker's clients come back only once the channels they follow have
    # moved on without them, so that there is something to recover.
    gate = asyncio.Event()
    gate.set()
    # Round-robin alternates: the 1st, 3rd, 5th and 7th land on the broker that dies.
    leaver, victim = await placed(brokers, tl.connect(f"ws://{front}/ws", leaver_token,
                                                      locale="en", **BACKOFF))
    cashier, _ = await placed(brokers, sdk(front, store, "erp_main", "till-1",
                                           order_fetch=lambda params: orders.get(
                                               params.get("order_id", ""))))
    holder, at = await placed(brokers, sdk(front, store, "erp_secondary", "till-2", gate=gate))
    assert at == victim, "round-robin did not alternate"
    manager, _ = await placed(brokers, sdk(front, store, "manager", "boss"))
    phone, at = await placed(brokers, sdk(front, store, "h5", "phone", table="t3"))
    assert at == victim, "round-robin did not alternate"
    till, _ = await placed(brokers, sdk(front, store, "erp_secondary", "till-3"))
    diner, at = await placed(brokers, sdk(front, store, "h5", "diner", table="t4", gate=gate))
    assert at == victim, "round-robin did not alternate"
    clients = {"cashier": cashier, "holder": holder, "manager": manager, "phone": phone,
               "till": till, "diner": diner}
    survivor = brokers[1 - victim]
    audit = auditors[1 - victim]

    service = tl.PaymentService(f"http://{front}", mint(store, "service", "pay"))
    status, _ = await ahttp("PUT", f"http://{front}/v1/stores/{store}/config",
                            mint(store, "manager", "boss"), {"disconnect_grace_ms": GRACE_MS})
    assert status == 200
    for body in orders.values():
        await cashier.publish_order(body, "modify")

    channels = {name: order_channels.get(name, store_channel) for name in clients}
    recorded = {name: Recorded.follow(await client.subscribe_store())
                for name, client in clients.items() if channels[name] == store_channel}
    recorded["phone"] = Recorded.follow(await phone.subscribe_order("o3"))
    recorded["diner"] = Recorded.follow(await diner.subscribe_order("o4"))

    held = await holder.acquire("o1", "order")
    gone = await leaver.acquire("o2", "payment")
    paying = await phone.acquire("o3", "payment")
    await contended(held, cashier)  # a direct event, from the survivor to the doomed broker

    # Two ERPs keep publishing through the kill, one on each broker: events flow while the
    # broker dies, and the writes in flight on it die with it.
    published = {"o4": 0, "o5": 0}  # successes since the kill
    killed = asyncio.Event()

    async def publish(client: tl.Client, order_id: str) -> None:
        version = 1
        while True:
            version += 1  # every attempt: one that took effect unanswered is not reused
            try:
                await client.publish_order(order(order_id, table_id=f"t{order_id[1:]}",
                                                 version=version), "modify")
            except (tl.Disconnected, tl.Unavailable, tl.OutcomeUnknown):
                await client.wait_fresh(RECOVERY_S)
                continue
            if killed.is_set():
                published[order_id] += 1
            await asyncio.sleep(PUBLISH_EVERY_S)  # a till's pace, well under the rate limit

    publishers = [asyncio.create_task(publish(cashier, "o4")),
                  asyncio.create_task(publish(holder, "o5"))]
    try:
        start = audit.last_seq(store_channel)
        while audit.last_seq(store_channel) < start + 10:  # events are flowing
            await audit.client.event("order.updated", timeout=RECOVERY_S)
        revoked = True
        gate.clear()
        dead = brokers[victim]
        assert dead.proc is not None
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        killed_at = asyncio.get_running_loop().time()
        killed.set()
        # The second publish counted was sent after the kill: committed on the survivor,
        # unheard by the dead broker's clients (the first may have been sent before).
        while published["o4"] < 2:
            await audit.client.event("order.updated", timeout=RECOVERY_S)
        gate.set()

        # Everyone still meant to be here is back, through the proxy, on the survivor.
        await asyncio.wait_for(leaver.wait_closed(), RECOVERY_S)
        assert isinstance(leaver.error, tl.AuthFailed)
        for client in clients.values():
            await client.wait_fresh(RECOVERY_S)
        assert await asyncio.to_thread(connections, survivor) == len(clients) + 1  # +auditor

        # The one that did not come back loses its lock once the grace is over.
        released = await audit.client.event(
            "lock.released", timeout=RECOVERY_S,
            where=lambda e: e["lock"]["order_id"] == "o2")
        assert released["reason"] == "holder_disconnected"
        assert released["lock"]["token"] == gone.token
        assert asyncio.get_running_loop().time() - killed_at >= GRACE_MS / 1000  # not before
        while min(published.values()) < 3:
            await audit.client.event("order.updated", timeout=RECOVERY_S)
    finally:
        for publisher in publishers:
            publisher.cancel()
        await asyncio.gather(*publishers, return_exceptions=True)

    # A last event, then every mirror has seen exactly what the auditor saw.
    await cashier.publish_order(order("o4", table_id="t4", version=10_000), "modify")
    await audit.client.event("order.updated", timeout=RECOVERY_S,
                             where=lambda e: e["order"]["version"] == 10_000)
    for name, record in recorded.items():
        channel = channels[name]
        audit.check_contiguous(channel)
        end = audit.last_seq(channel)  # a write cancelled in flight may still land later
        await record.reach(end)
        assert record.start >= audit.starts[channel]
        applied = [(seq, event) for seq, event in record.applied if seq <= end]
        assert applied == audit.after(channel, record.start, end), name
        # Recovered by replay: never a gap papered over with a new snapshot.
        assert record.snapshots == [], (name, record.snapshots)
    for name in ("holder", "diner"):  # what they missed came back through `since`
        assert recorded[name].replayed >= 1, name

    # The holder that came back within the grace kept its lock, its token still works.
    assert not held.lost.is_set() and held.held
    assert not [e for e in audit.events(store_channel)
                if e["event"] != "lock.acquired" and e.get("lock", {}).get("order_id") == "o1"]
    assert (await held.renew()) is not None
    view = await manager.get_order("o1")
    assert [(lk.kind, lk.token) for lk in view.locks] == [("order", held.token)]
    await contended(held, cashier)  # and to where the holder is now
    # Taken over by the manager, it is gone, and its token is FENCED from then on.
    stale = held.token
    assert stale is not None
    forced = await manager.acquire("o1", "order", force=True, reason="till-2 walked away")
    await asyncio.wait_for(held.lost.wait(), RECOVERY_S)
    assert held.lost_reason == "forced"
    with pytest.raises(tl.Fenced):
        await holder.renew("o1", "order", stale)
    await forced.release()

    # The phone's payment lock outlived the drop (an h5 lock ends only at its TTL or by
    # payment); the payment service records the payment with its token, once.
    assert not paying.lost.is_set()
    o3 = orders["o3"]
    receipt = await service.complete_payment(store, "o3", token=paying.token,
                                          version=o3["version"],
                                          amount_cents=o3["amount_cents"], payment_ref="wx-3")
    assert receipt.order.status == "paid"
    await asyncio.wait_for(paying.lost.wait(), RECOVERY_S)
    assert paying.lost_reason == "paid"

    # The lock lost to the grace: taken over, its token is FENCED; the order is paid once.
    o2 = orders["o2"]
    takeover = await cashier.acquire("o2", "payment")
    assert takeover.token != gone.token
    with pytest.raises(tl.Fenced):
        await service.complete_payment(store, "o2", token=gone.token, version=o2["version"],
                                       amount_cents=o2["amount_cents"], payment_ref="wx-stale")
    await takeover.complete_payment("till-1-2")
    with pytest.raises(tl.OrderPaid):
        await service.complete_payment(store, "o2", token=gone.token, version=o2["version"],
                                       amount_cents=o2["amount_cents"], payment_ref="wx-late")
    while len(paid(audit, store_channel)) < 2:
        await audit.client.event("order.paid", timeout=RECOVERY_S)

    # Every mirror shows the truth: the survivor's snapshots, taken once the last event
    # (the truth-teller's own arrival) has reached every mirror.
    sub = unique("truth")
    truth = await WsClient.connect(survivor.url, mint(store, "manager", sub))
    await audit.client.event("terminal.online", timeout=RECOVERY_S,
                             where=lambda e: e["terminal"]["terminal_id"] == sub)
    for name, record in recorded.items():
        await record.reach(audit.last_seq(channels[name]))
        snapshot = (await truth.request("subscribe", channel=channels[name]))["snapshot"]
        assert state_of(record.mirror) == true_state(snapshot), name
        audit.check_contiguous(channels[name])
    assert sorted(paid(audit, store_channel)) == ["o2", "o3"]  # each paid once
    for client in clients.values():
        await client.close()
    for client in (truth, *(a.client for a in auditors)):
        if client.close_code is None:
            await client.close()


async def contended(held: tl.LockHandle, rival: tl.Client) -> None:
    """`rival` is refused the held lock, and its holder hears of it (`lock.contended`)."""
    heard = asyncio.Event()
    stop = held.on_contended(lambda contention: heard.set())
    with pytest.raises(tl.OrderLocked):
        await rival.acquire(held.order_id, held.kind)
    await asyncio.wait_for(heard.wait(), RECOVERY_S)
    stop()


def paid(audit: Auditor, channel: str) -> list[str]:
    return [e["order"]["order_id"] for e in audit.events(channel) if e["event"] == "order.paid"]


def state_of(mirror: tl.Mirror) -> tuple[Any, ...]:
    """What a screen shows from a mirror: orders (id, version, status), locks, terminals."""
    if isinstance(mirror, tl.StoreMirror):
        orders = [(o.order_id, o.version, o.status) for o in mirror.orders.values()]
        locks = [(lk.order_id, lk.kind, lk.token) for lk in mirror.locks.values()]
        return sorted(orders), sorted(locks), sorted(mirror.terminals)
    assert isinstance(mirror, tl.OrderMirror) and mirror.order is not None
    order_ = mirror.order
    locks = [(lk.order_id, lk.kind, lk.token) for lk in mirror.locks.values()]
    return [(order_.order_id, order_.version, order_.status)], sorted(locks), []


def true_state(snapshot: dict[str, Any]) -> tuple[Any, ...]:
    """The same, from a subscribe snapshot."""
    orders = snapshot["orders"] if "orders" in snapshot else [snapshot["order"]]
    locks = [(lk["order_id"], lk["kind"], lk["token"]) for lk in snapshot["locks"]]
    terminals = [t["terminal_id"] for t in snapshot.get("terminals", [])]
    return (sorted((o["order_id"], o["version"], o["status"]) for o in orders), sorted(locks),
            sorted(terminals))


STORE_AFFINE = {"nginx": (("    # hash $arg_store consistent;",
                           "    hash $arg_store consistent;"),),
                "haproxy": (("    # balance url_param store", "    balance url_param store"),
                            ("    # hash-type consistent", "    hash-type consistent"))}


@pytest.mark.parametrize("kind", [pytest.param("nginx", marks=needs_nginx),
                                  pytest.param("haproxy", marks=needs_haproxy)])
async def test_store_affine_routing_keeps_a_store_on_one_broker(
        kind: str, tmp_path: Path, redis: RedisServer, broker_factory: BrokerFactory) -> None:
    # The shipped config with its store-affine lines turned on: the SDK names the store in
    # the URL, and every terminal of a store lands on the same broker.
    brokers = [broker_factory(backend=redis.url).start(),
               broker_factory(backend=redis.url).start()]
    port = free_port()
    front = f"127.0.0.1:{port}"
    with running(proxy_command(kind, tmp_path, brokers, port, STORE_AFFINE[kind]), front):
        homes: dict[str, set[int]] = {}
        clients = []
        for n in range(16):
            store = unique(f"s{n}")
            for role, sub in (("erp_main", "till-1"), ("manager", "boss"), ("h5", "phone")):
                client, at = await placed(brokers, sdk(front, store, role, sub, table="t1"))
                clients.append(client)
                homes.setdefault(store, set()).add(at)
        assert all(len(at) == 1 for at in homes.values()), homes
        # 16 stores on one broker of two by chance: 1 in 32,768.
        assert {next(iter(at)) for at in homes.values()} == {0, 1}, homes
        for client in clients:
            await client.close()
