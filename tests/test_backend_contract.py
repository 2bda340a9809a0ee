"""The backend contract, called directly and in process: the same cases against the memory
backend (on a clock the test moves) and against a real `redis-server` (two brokers on it).

Each case speaks to the five parts of backends.base: order state, event streams, presence,
resumable sessions and broker-to-broker control. Nothing here goes through a WebSocket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tablelock.backends.base import Backend, StoredSession, Unavailable
from tablelock.backends.memory import MemoryBackend
from tablelock.backends.redis import RedisBackend
from tablelock.model import Event, Order, StoreConfig, Terminal, holder_key
from tablelock.protocol import (
    direct_frame,
    event_body,
    numbered_frame,
    order_channel,
    store_channel,
)
from tablelock.rules import Acquire, Ingest, Release

from .redis_support import RedisServer
from .support import unique

HISTORY = 8


class ManualClock:
    """Epoch milliseconds that move only when the test says so."""

    def __init__(self) -> None:
        self.ms = int(time.time() * 1000)

    def now(self) -> int:
        return self.ms

    def loop_time_of(self, ms: int) -> float:
        return time.monotonic() + max(0, ms - self.ms) / 1000


@dataclass
class Recorder:
    """An event sink that keeps what it is given; `follows` says which channels have a
    local subscriber (as the hub would)."""

    follows: set[str] = field(default_factory=set)
    published: list[tuple[str, int, dict[str, Any], str | None]] = field(default_factory=list)
    directs: list[tuple[str, str, dict[str, Any], tuple[str, ...], str]] = field(
        default_factory=list)
    lost_channels: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, channel: str, seq: int, frame: bytes, table_id: str | None) -> None:
        self.published.append((channel, seq, json.loads(frame), table_id))
        self.changed.set()

    def direct(self, store_id: str, holder: str, frame: bytes,
               unless_on: tuple[str, ...], coalesce: str = "") -> None:
        self.directs.append((store_id, holder, json.loads(frame), unless_on, coalesce))
        self.changed.set()

    def has_subscribers(self, channel: str) -> bool:
        return channel in self.follows

    def lost(self, channel: str) -> None:
        self.lost_channels.append(channel)

    def on(self, channel: str) -> list[dict[str, Any]]:
        return [frame for name, _, frame, _ in self.published if name == channel]

    async def until(self, found: Callable[[], Any], timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while not (result := found()):
                self.changed.clear()
                await self.changed.wait()
        return result


@dataclass
class Broker:
    backend: Backend
    sink: Recorder

    async def follow(self, channel: str) -> int:
        """Subscribe as a connection would: the sink says so, then the snapshot."""
        self.sink.follows.add(channel)
        seq, _, _ = await self.backend.snapshot(channel)
        return seq

    def leave(self, channel: str) -> None:
        self.sink.follows.discard(channel)
        self.backend.channel_idle(channel)


@dataclass
class Setup:
    kind: str
    a: Broker
    b: Broker  # another broker on the same state (the same one in memory)
    clock: ManualClock | None
    store: str = field(default_factory=unique)

    async def advance(self, ms: int) -> None:
        """Let `ms` pass: the memory clock moves at once; Redis's own takes real time."""
        if self.clock is not None:
            self.clock.ms += ms
            assert isinstance(self.a.backend, MemoryBackend)
            self.a.backend.deadlines.fire()
        else:
            await asyncio.sleep(ms / 1000)

    def terminal(self, role: str, sub: str, table: str | None = None) -> Terminal:
        return Terminal(sub, role, sub, self.store, table)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    started: list[Backend] = []

    async def start(backend: Backend) -> Broker:
        sink = Recorder()
        await backend.start(sink)
        started.append(backend)
        return Broker(backend, sink)

    try:
        if request.param == "memory":
            clock = ManualClock()
            a = await start(MemoryBackend(HISTORY, h5_presence_linger_ms=0, clock=clock))
            yield Setup("memory", a, a, clock)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            prefix = unique("c")
            a = await start(RedisBackend(server.url, HISTORY, prefix=prefix,
                                         h5_presence_linger_ms=0))
            b = await start(RedisBackend(server.url, HISTORY, prefix=prefix,
                                         h5_presence_linger_ms=0))
            yield Setup("redis", a, b, None)
    finally:
        for backend in started:
            await backend.close()


def an_order(order_id: str = "o1", table: str = "t1", version: int = 1,
             status: str = "open") -> Order:
    return Order(order_id, table, version, 1000, status=status)  # type: ignore[arg-type]


# --- order state ------------------------------------------------------------------------


async def test_one_grant_among_concurrent_steps_on_two_brokers(setup: Setup) -> None:
    store = setup.store
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    tills = [setup.terminal("erp_secondary", f"till{n}") for n in range(6)]
    outs = await asyncio.gather(*(
        (setup.a if n % 2 else setup.b).backend.apply(store, "o1", Acquire("payment"), till)
        for n, till in enumerate(tills)))
    granted = [out for out in outs if out.refusal is None]
    assert len(granted) == 1
    assert {out.refusal.code for out in outs if out.refusal is not None} == {"PAYMENT_LOCKED"}
    record = await setup.b.backend.read(store, "o1")
    assert record is not None and record.fence == granted[0].events[0].lock.token  # type: ignore[union-attr]


async def test_fencing_tokens_only_grow_and_an_old_token_is_refused(setup: Setup) -> None:
    store = setup.store
    till = setup.terminal("erp_secondary", "till")
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    tokens = []
    for backend in (setup.a.backend, setup.b.backend, setup.a.backend):
        out = await backend.apply(store, "o1", Acquire("payment"), till)
        assert out.refusal is None and out.events[0].lock is not None
        tokens.append(out.events[0].lock.token)
        assert (await backend.apply(store, "o1", Release("payment", tokens[-1]),
                                    till)).refusal is None
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    held = await setup.b.backend.apply(store, "o1", Acquire("payment"), till)
    stale = await setup.a.backend.apply(store, "o1", Release("payment", tokens[0]), till)
    assert stale.refusal is not None
    assert (await setup.a.backend.read(store, "o1")).locks  # type: ignore[union-attr]
    assert held.refusal is None


async def test_read_and_find_by_table(setup: Setup) -> None:
    store = setup.store
    a, b = setup.a.backend, setup.b.backend
    assert await a.read(store, "o1") is None
    assert await a.find_order(store, "t1") is None
    await a.apply(store, "o1", Ingest(an_order("o1", "t1")), None)
    record = await b.read(store, "o1")
    assert record is not None and record.order.table_id == "t1"
    assert await b.find_order(store, "t1") == "o1"
    # An open order comes before a closed one of the same table; moved orders follow.
    await a.apply(store, "o1", Ingest(an_order("o1", "t1", 2, "closed")), None)
    await a.apply(store, "o2", Ingest(an_order("o2", "t1")), None)
    assert await b.find_order(store, "t1") == "o2"
    await a.apply(store, "o2", Ingest(an_order("o2", "t9", 2)), None)
    assert await b.find_order(store, "t9") == "o2"
    assert await b.find_order(store, "t1") == "o1"
    assert sorted(await b.order_ids(store)) == ["o1", "o2"]


async def test_config_is_shared_and_its_change_is_an_event(setup: Setup) -> None:
    store = setup.store
    a, b = setup.a.backend, setup.b.backend
    await setup.a.follow(store_channel(store))
    await b.terminal_up(setup.terminal("manager", "m"))  # b hears the store's config news
    assert await b.get_config(store) == StoreConfig()  # cached by b from here
    new = await a.update_config(store, {"locale": "en"})
    assert new.locale == "en"
    await setup.a.sink.until(lambda: [f for f in setup.a.sink.on(store_channel(store))
                                      if f["event"] == "config.updated"])
    async with asyncio.timeout(5):
        while (await b.get_config(store)).locale != "en":
            await asyncio.sleep(0.01)


async def test_a_deadline_expires_a_lock_once(setup: Setup) -> None:
    store = setup.store
    till = setup.terminal("erp_secondary", "till")
    await setup.a.backend.put_config(store, StoreConfig(erp_lock_ttl_ms=300))
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    channel = order_channel(store, "o1")
    await setup.a.follow(channel)
    out = await setup.b.backend.apply(store, "o1", Acquire("payment"), till)
    assert out.refusal is None
    await setup.advance(400)
    expired = await setup.a.sink.until(
        lambda: [f for f in setup.a.sink.on(channel) if f["event"] == "lock.expired"])
    assert len(expired) == 1
    assert not (await setup.b.backend.read(store, "o1")).locks  # type: ignore[union-attr]


# --- event streams ----------------------------------------------------------------------


async def test_events_are_numbered_without_gaps_and_delivered_in_order(setup: Setup) -> None:
    store = setup.store
    till = setup.terminal("erp_secondary", "till", None)
    order_ch, store_ch = order_channel(store, "o1"), store_channel(store)
    first_order, first_store = await setup.a.follow(order_ch), await setup.a.follow(store_ch)
    await setup.b.backend.apply(store, "o1", Ingest(an_order()), None)
    for _ in range(2):
        out = await setup.b.backend.apply(store, "o1", Acquire("payment"), till)
        assert out.events[0].lock is not None
        await setup.b.backend.apply(store, "o1", Release("payment", out.events[0].lock.token),
                                    till)
    for channel, first in ((order_ch, first_order), (store_ch, first_store)):
        frames = await setup.a.sink.until(lambda ch=channel: len(setup.a.sink.on(ch)) == 5
                                          and setup.a.sink.on(ch))
        assert [f["seq"] for f in frames] == [first + n for n in range(1, 6)]
        assert [f["event"] for f in frames] == [
            "order.updated", "lock.acquired", "lock.released", "lock.acquired",
            "lock.released"]
        assert all(f["type"] == "event" and f["channel"] == channel for f in frames)
    tables = {table for ch, _, _, table in setup.a.sink.published if ch == order_ch}
    assert tables == {"t1"}


async def test_history_reaches_back_only_as_far_as_it_keeps(setup: Setup) -> None:
    store = setup.store
    channel = store_channel(store)
    start = await setup.a.follow(channel)
    for n in range(3):
        await setup.b.backend.publish_store_event(store, Event("config.updated", n,
                                                               config=StoreConfig()))
    frames = await setup.a.sink.until(lambda: len(setup.a.sink.on(channel)) == 3
                                      and setup.a.sink.on(channel))
    missed = await setup.b.backend.history(channel, start)
    assert missed is not None
    assert [m.seq for m in missed] == [start + 1, start + 2, start + 3]
    assert [json.loads(m.frame) for m in missed] == frames  # the same frame, built once
    assert await setup.b.backend.history(channel, start + 3) == []
    assert await setup.b.backend.history(channel, start + 4) is None  # past the end
    for n in range(HISTORY * 3):
        await setup.b.backend.publish_store_event(store, Event("config.updated", n,
                                                               config=StoreConfig()))
    assert await setup.b.backend.history(channel, start) is None  # no longer kept
    assert await setup.a.backend.history(store_channel(unique()), 5) is None  # never numbered


async def test_a_gap_in_what_a_broker_hears_is_filled_from_history(setup: Setup) -> None:
    if not isinstance(setup.a.backend, RedisBackend):
        pytest.skip("one process: nothing travels, nothing can be missed")
    store = setup.store
    channel = store_channel(store)
    start = await setup.a.follow(channel)
    backend = setup.a.backend
    for n in range(3):
        await setup.b.backend.publish_store_event(store, Event("config.updated", n,
                                                               config=StoreConfig()))
    await setup.a.sink.until(lambda: len(setup.a.sink.on(channel)) == 3)
    # Forget the last two, as if their messages were lost: the next one shows a gap.
    backend._seen[channel] = start + 1
    setup.a.sink.published.clear()
    await setup.b.backend.publish_store_event(store, Event("config.updated", 9,
                                                           config=StoreConfig()))
    seqs = await setup.a.sink.until(lambda: [s for ch, s, _, _ in setup.a.sink.published
                                             if ch == channel and s == start + 4]
                                    and [s for ch, s, _, _ in setup.a.sink.published])
    # The history is read after the last event was numbered: it may come twice (the hub
    # drops what a connection already had), but in order and with nothing missing.
    assert seqs[:3] == [start + 2, start + 3, start + 4]
    assert set(seqs) == {start + 2, start + 3, start + 4}


async def test_a_message_a_broker_cannot_read_is_a_gap_filled_from_history(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """A message in a layout this broker does not know (another release's, during a rolling
    upgrade) is logged and dropped; the next one it can read shows the gap, and the history
    fills it."""
    if not isinstance(setup.a.backend, RedisBackend):
        pytest.skip("one process: nothing travels")
    store = setup.store
    channel = store_channel(store)
    backend = setup.a.backend
    handler = backend._on_pubsub
    garbled: list[bytes] = []

    def on_pubsub(name: bytes, data: bytes) -> None:
        if not garbled:
            garbled.append(data)
            data = data.replace(b"\n", b" ", 1)  # no header: unreadable here
        handler(name, data)

    backend._on_pubsub = on_pubsub  # type: ignore[method-assign]  # taken at subscribe
    start = await setup.a.follow(channel)
    for n in range(2):
        await setup.b.backend.publish_store_event(store, Event("config.updated", n,
                                                               config=StoreConfig()))
    seqs = await setup.a.sink.until(lambda: [s for ch, s, _, _ in setup.a.sink.published
                                             if ch == channel and s == start + 2]
                                    and [s for ch, s, _, _ in setup.a.sink.published])
    assert garbled and seqs[:2] == [start + 1, start + 2] and set(seqs) == {start + 1, start + 2}
    assert "pub/sub handler failed" in caplog.text


# --- presence ---------------------------------------------------------------------------


async def test_a_stream_keeps_its_epoch_on_every_broker(setup: Setup) -> None:
    store = setup.store
    channel = order_channel(store, "o1")
    epoch = await setup.a.backend.stream_epoch(channel)
    assert epoch
    await setup.a.follow(channel)
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    await setup.b.backend.apply(store, "o1", Ingest(an_order(version=2)), None)
    assert await setup.b.backend.stream_epoch(channel) == epoch
    assert await setup.a.backend.stream_epoch(channel) == epoch
    # a snapshot says the epoch its seq counts in, on any broker
    for broker in (setup.a, setup.b):
        assert (await broker.backend.snapshot(channel))[1] == epoch
        _, store_epoch, _ = await broker.backend.snapshot(store_channel(store))
        assert store_epoch == await broker.backend.stream_epoch(store_channel(store))


# --- sessions ---------------------------------------------------------------------------


async def test_a_session_is_kept_for_every_broker_until_its_ttl(setup: Setup) -> None:
    store = setup.store
    holder = holder_key(setup.terminal("erp_secondary", "till"))
    first = StoredSession(holder, {order_channel(store, "o1"): (5, "e1"),
                                   store_channel(store): (9, "e2")})
    await setup.a.backend.keep_session(store, "sess1", first, None)
    assert await setup.b.backend.find_session(store, "sess1") == first
    assert await setup.b.backend.find_session(unique(), "sess1") is None  # another store's
    # Kept whole: a channel left is gone from the copy.
    second = StoredSession(holder, {store_channel(store): (12, "e2")})
    await setup.b.backend.keep_session(store, "sess1", second, 150)
    assert await setup.a.backend.find_session(store, "sess1") == second
    await asyncio.sleep(0.4)  # past its TTL, on Redis's clock and the loop's alike
    assert await setup.a.backend.find_session(store, "sess1") is None


async def test_presence_up_down_across_connections_and_brokers(setup: Setup) -> None:
    store = setup.store
    channel = store_channel(store)
    await setup.a.follow(channel)
    till = setup.terminal("erp_secondary", "till")
    await setup.a.backend.terminal_up(till)
    await setup.b.backend.terminal_up(till)  # a second connection, elsewhere
    assert await setup.b.backend.online_terminals(store) == [till]
    await setup.a.backend.terminal_down(till)
    assert await setup.a.backend.online_terminals(store) == [till]
    await setup.b.backend.terminal_down(till)
    assert await setup.a.backend.online_terminals(store) == []
    events = await setup.a.sink.until(lambda: len(setup.a.sink.on(channel)) == 2
                                      and setup.a.sink.on(channel))
    assert [(e["event"], e["terminal"]["terminal_id"]) for e in events] == [
        ("terminal.online", "till"), ("terminal.offline", "till")]


async def test_the_authority_is_found_on_the_broker_that_holds_it(setup: Setup) -> None:
    store = setup.store
    pos = setup.terminal("erp_secondary", "pos")
    await setup.a.backend.terminal_up(pos, authority=True)
    found = await setup.b.backend.authority(store)
    # One process: None says "look in the local hub"; else the broker holding it.
    assert found == (None if setup.kind == "memory" else setup.a.backend.broker_id)
    await setup.a.backend.terminal_down(pos)
    assert await setup.b.backend.authority(store) is None


async def test_an_offline_holder_loses_a_lock_after_its_grace(setup: Setup) -> None:
    store = setup.store
    till = setup.terminal("erp_main", "cashier")
    await setup.a.backend.put_config(store, StoreConfig(disconnect_grace_ms=200))
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    channel = order_channel(store, "o1")
    await setup.b.follow(channel)
    await setup.a.backend.terminal_up(till)
    assert (await setup.a.backend.apply(store, "o1", Acquire("payment"), till)).refusal is None
    await setup.a.backend.terminal_down(till)
    await setup.advance(300)
    released = await setup.b.sink.until(
        lambda: [f for f in setup.b.sink.on(channel) if f["event"] == "lock.released"])
    assert [f["reason"] for f in released] == ["holder_disconnected"]


# --- direct notices and broker-to-broker control ----------------------------------------


async def test_a_direct_notice_reaches_only_the_broker_holding_the_terminal(
        setup: Setup) -> None:
    store = setup.store
    holder = setup.terminal("erp_secondary", "till")
    boss = setup.terminal("manager", "boss")
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    await setup.a.backend.terminal_up(holder)
    await setup.b.backend.terminal_up(boss)
    assert (await setup.b.backend.apply(store, "o1", Acquire("payment"), holder)).refusal is None
    forced = await setup.b.backend.apply(store, "o1", Acquire("payment", force=True,
                                                             operator="boss", reason="stuck"),
                                         boss)
    assert forced.refusal is None
    notices = await setup.a.sink.until(lambda: setup.a.sink.directs)
    assert [(n[1], n[2]["event"], n[2]["direct"]) for n in notices] == [
        (holder_key(holder), "lock.forced", True)]
    assert notices[0][3] == (order_channel(store, "o1"), store_channel(store))
    if setup.kind == "redis":  # the other broker holds no connection of that terminal
        assert setup.b.sink.directs == []
        assert setup.b.backend.received["direct"] == 0  # type: ignore[attr-defined]


async def test_bodies_arrive_byte_for_byte_however_many_share_a_message(
        setup: Setup) -> None:
    """One commit, several events (a force revokes one lock and grants another), bodies with
    what JSON escapes (a manager's name): each frame and each notice carries its body whole."""
    store = setup.store
    holder = setup.terminal("erp_secondary", "till")
    name = '店长 "Li" \\ night/shift \n\u2028 ok'
    boss = Terminal("boss", "manager", name, store, None)
    store_ch = store_channel(store)
    await setup.a.follow(store_ch)
    await setup.a.backend.apply(store, "o1", Ingest(an_order()), None)
    await setup.a.backend.terminal_up(holder)
    await setup.b.backend.terminal_up(boss)
    held = await setup.b.backend.apply(store, "o1", Acquire("payment"), holder)
    forced = await setup.b.backend.apply(store, "o1", Acquire(
        "payment", force=True, operator="boss", reason="stuck"), boss)
    assert held.refusal is None and forced.refusal is None
    assert len(forced.events) >= 2
    frames = await setup.a.sink.until(
        lambda: len(setup.a.sink.on(store_ch)) >= 3 + len(forced.events)
        and setup.a.sink.on(store_ch))
    last = frames[-len(forced.events):]
    assert last == [json.loads(numbered_frame(store_ch, frame["seq"], event_body(event)))
                    for frame, event in zip(last, forced.events, strict=True)]
    assert last[0]["by"]["name"] == name
    assert [f["seq"] for f in last] == list(range(last[0]["seq"], last[0]["seq"] + len(last)))
    notices = await setup.a.sink.until(lambda: setup.a.sink.directs)
    revoked = next(event for event in forced.events if event.event == "lock.forced")
    assert [n[2] for n in notices] == [json.loads(direct_frame(revoked))]


async def test_a_message_to_another_broker_reaches_its_handlers(setup: Setup) -> None:
    heard: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(payload: bytes) -> None:
        await heard.put(payload)

    setup.b.backend.on_broker_message(handler)
    if setup.kind == "memory":
        with pytest.raises(Unavailable):
            await setup.a.backend.send_to_broker("elsewhere", b"x")
        return
    await setup.a.backend.send_to_broker(setup.b.backend.broker_id, b'{"op":"ping"}')
    async with asyncio.timeout(5):
        assert await heard.get() == b'{"op":"ping"}'
    assert heard.empty()


# --- interest by channel ------------------------------------------------------------------


async def test_a_broker_hears_only_the_channels_its_connections_follow(setup: Setup) -> None:
    if setup.kind != "redis":
        pytest.skip("one process hears nothing over the network")
    a, b = setup.a, setup.b
    store, other = setup.store, unique()
    assert isinstance(a.backend, RedisBackend) and isinstance(b.backend, RedisBackend)
    till = setup.terminal("erp_secondary", "till")
    watched = order_channel(store, "o1")
    await a.follow(watched)
    # b holds a connection of the store, subscribed to nothing: it hears no event of it.
    await b.backend.terminal_up(setup.terminal("h5", "phone", "t2"))
    await b.follow(order_channel(other, "x"))
    before_a, before_b = a.backend.received["events"], b.backend.received["events"]
    for order_id in ("o1", "o2"):
        await b.backend.apply(store, order_id, Ingest(an_order(order_id)), None)
        out = await b.backend.apply(store, order_id, Acquire("payment"), till)
        assert out.events[0].lock is not None
        await b.backend.apply(store, order_id, Release("payment", out.events[0].lock.token),
                              till)
    await a.sink.until(lambda: len(a.sink.on(watched)) == 3)
    await b.backend.publish_store_event(other, Event("config.updated", 1, config=StoreConfig()))
    assert a.backend.received["events"] - before_a == 3  # one message per transition of o1
    assert b.backend.received["events"] == before_b
    assert b.sink.published == []
    # Once the last subscriber leaves, the channel's events stop coming.
    a.leave(watched)
    await asyncio.gather(*a.backend._unsubscribing)
    out = await b.backend.apply(store, "o1", Acquire("payment"), till)
    assert out.refusal is None
    await a.follow(order_channel(store, "o2"))  # a round trip after the event: it'd be here
    assert a.backend.received["events"] - before_a == 3


async def test_a_followed_store_covers_its_order_channels(setup: Setup) -> None:
    if setup.kind != "redis":
        pytest.skip("one process hears nothing over the network")
    a, b = setup.a, setup.b
    assert isinstance(a.backend, RedisBackend)
    store = setup.store
    order_ch, store_ch = order_channel(store, "o1"), store_channel(store)
    keys = a.backend.keys(store)
    await a.follow(order_ch)
    assert keys.events(order_ch) in a.backend._routes
    await a.follow(store_ch)  # the store's messages carry the order's events: one is enough
    assert keys.events(order_ch) not in a.backend._routes
    await asyncio.gather(*a.backend._unsubscribing)
    before = a.backend.received["events"]
    await b.backend.apply(store, "o1", Ingest(an_order()), None)
    await a.sink.until(lambda: a.sink.on(order_ch) and a.sink.on(store_ch))
    assert a.backend.received["events"] - before == 1
    # The store left, the order stays followed: it is heard on its own again.
    a.leave(store_ch)
    await asyncio.gather(*a.backend._unsubscribing)
    await asyncio.gather(*a.backend._unsubscribing)
    assert keys.events(order_ch) in a.backend._routes
    assert keys.store_events not in a.backend._routes
    await b.backend.apply(store, "o1", Ingest(an_order(version=2)), None)
    await a.sink.until(lambda: len(a.sink.on(order_ch)) == 2)
    assert a.backend.received["events"] - before == 2
