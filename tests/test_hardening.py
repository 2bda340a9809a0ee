"""Production hardening, tested on real broker processes over real sockets.

Each test starts its own broker (`broker_factory`) with the settings it exercises, set the way
an operator sets them: `TABLELOCK_<FIELD>` environment variables. Nothing is mocked; waits are
for events (a reply, a close, a metric), never for a guessed amount of time, except where the
test itself is about pacing (a steady request rate) or a deadline (a token's expiry).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
import websockets
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Store
from .redis_support import RedisServer
from .support import BrokerProcess, WsClient, mint, unique

BrokerFactory = Callable[..., BrokerProcess]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- helpers -----------------------------------------------------------------------------

def start_broker(factory: BrokerFactory, backend: str = "memory",
                 **settings: str | float) -> BrokerProcess:
    """A dedicated broker configured through TABLELOCK_<FIELD> variables. Unless a test is
    about draining, it stops at once (the default drain window would add 5 s to each stop)."""
    settings.setdefault("drain_window_s", 0)
    env = {f"TABLELOCK_{name.upper()}": str(value) for name, value in settings.items()}
    return factory(backend=backend, env=env).start()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def scrape(broker: BrokerProcess) -> Samples:
    """Every sample of the broker's /metrics, keyed by (sample name, sorted labels)."""
    text = await asyncio.to_thread(_get, f"{broker.http}/metrics")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_sum(samples: Samples, name: str) -> float:
    """A sample summed over all its label values."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def token_exp(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


async def refused_hello(broker: BrokerProcess, token: str) -> tuple[dict[str, Any], int | None]:
    """Say hello with `token` and return the reply and the close code that follows it."""
    client = await WsClient.connect(broker.url, hello=False)
    reply = await client.request("hello", token=token, protocol=1, locale="en")
    return reply, await client.closed()


class RawWs:
    """A WebSocket client written by hand over a TCP socket: it reads only when asked to, so it
    can play a consumer that stops reading, and it sends any Origin and Host it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = 0

    @classmethod
    async def open(cls, port: int, *, origin: str | None = None, rcvbuf: int | None = None,
                   ) -> tuple[int, RawWs]:
        """Do the opening handshake; (HTTP status, client)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so that the window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small stream buffer: once it holds 8 KiB nothing more is read from the socket.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: tablelock.v1"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, cls(reader, writer)

    async def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = bytes([0x81, 0x80 | size])
        elif size < 65536:
            head = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
        masked = (int.from_bytes(payload, "big")
                  ^ int.from_bytes((mask * (size // 4 + 1))[:size], "big")).to_bytes(size, "big")
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def recv(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload). Server frames are unmasked."""
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(size)

    async def request(self, type_: str, **params: Any) -> dict[str, Any]:
        """Send a request and read frames until its reply."""
        self._ids += 1
        request_id = self._ids
        await self.send_text(json.dumps({"id": request_id, "type": type_, **params}))
        while True:
            opcode, payload = await self.recv()
            if opcode == 0x8:
                raise ConnectionError(f"closed: {payload!r}")
            frame = json.loads(payload)
            if frame.get("id") == request_id:
                return frame

    async def close_code(self) -> int:
        """Read everything the server still sends, up to its close frame; that frame's code."""
        while True:
            opcode, payload = await self.recv()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")

    def abort(self) -> None:
        self.writer.transport.abort()


# --- rate limits ---------------------------------------------------------------------------

async def test_a_flood_gets_rate_limited_then_closed_4008(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, rate_per_s=50, rate_burst=20)
    store = Store(broker)
    try:
        calm = await store.connect("erp_main")
        flood = await store.connect("erp_secondary")

        async def steady() -> list[dict[str, Any]]:  # ~10 requests/s, well under 50/s
            replies = []
            for _ in range(10):
                replies.append(await calm.request("ping"))
                await asyncio.sleep(0.1)
            return replies

        calm_pings = asyncio.create_task(steady())
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(websockets.ConnectionClosed):
            for n in range(300):
                await flood.send_raw(json.dumps({"id": f"f{n}", "type": "ping"}))
        assert await flood.closed() == 4008
        refill = 50 * (loop.time() - started)  # what the bucket regained meanwhile, at most
        replies = [f for f in flood.frames if str(f.get("id")).startswith("f")]
        codes = ["OK" if f["ok"] else f["error"]["code"] for f in replies]
        granted = codes.count("OK")
        limited = codes.count("RATE_LIMITED")
        assert limited > 0 and granted + limited == len(codes), codes
        # The burst first (20, plus what 50/s refills while the flood is read), then refusals
        # only, and the close once a second burst's worth of refusals has piled up.
        assert codes == ["OK"] * granted + ["RATE_LIMITED"] * limited, codes
        assert 20 <= granted <= 20 + refill + 1, (codes, refill)
        # Closed once the bucket is a whole burst below empty: about 20 refusals.
        assert 41 <= granted + limited <= 41 + refill + 1, (codes, refill)
        assert len(codes) < 300, "the flood was closed before its end"
        assert replies[granted]["error"]["message"]

        # The calm connection saw nothing of it.
        assert all(r["ok"] for r in await calm_pings)
        assert calm.close_code is None
        assert (await calm.request("ping"))["ok"]
        samples = await scrape(broker)
        # At least those the client saw: frames already read when the close was decided are
        # still dispatched and refused (and counted), their replies dropped.
        assert metric(samples, "tablelock_rate_limited_total") >= limited
        assert metric(samples, "tablelock_requests_total", type="ping",
                      code="RATE_LIMITED") >= limited
    finally:
        await store.close()


async def test_default_limits_let_a_busy_terminal_do_200_requests_a_second(
        broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory)
    store = Store(broker)
    try:
        busy = await store.connect("erp_main")
        loop = asyncio.get_running_loop()
        pending = []
        started = loop.time()
        for n in range(400):  # 200/s for 2 s, paced against the clock
            delay = started + n / 200 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(busy.request("ping")))
        elapsed = loop.time() - started
        replies = await asyncio.gather(*pending)
        assert 1.9 <= elapsed < 3.0  # really ~200/s (a starved loop would send slower)
        assert [r for r in replies if not r["ok"]] == []
        assert busy.close_code is None
        assert metric(await scrape(broker), "tablelock_rate_limited_total") == 0
    finally:
        await store.close()


async def test_a_flood_of_garbage_is_rate_limited_too(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, rate_per_s=50, rate_burst=20)
    store = Store(broker)
    try:
        flood = await store.connect("erp_secondary")
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(300):
                await flood.send_raw("not json")
        assert await flood.closed(timeout=2) == 4008
    finally:
        await store.close()


# --- connection and subscription limits ------------------------------------------------------

async def test_connections_per_terminal(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, max_connections_per_terminal=2)
    store = Store(broker)
    try:
        first = await store.connect("erp_main", "till-1")
        await store.connect("erp_main", "till-1")
        reply, code = await refused_hello(broker, store.token("erp_main", "till-1"))
        assert reply["ok"] is False and reply["error"]["code"] == "LIMIT_REACHED", reply
        assert code == 4008
        # Another terminal of the store is not concerned; the two open ones carry on.
        await store.connect("erp_secondary", "till-2")
        assert (await first.request("ping"))["ok"]
        # A freed place can be taken again.
        watcher = await store.connect("manager")
        await watcher.request("subscribe", channel=store.channel())
        for client in [c for c in store.clients if c.hello["terminal"]["terminal_id"] == "till-1"]:
            await client.close()
        await watcher.event("terminal.offline",
                            where=lambda e: e["terminal"]["terminal_id"] == "till-1")
        await store.connect("erp_main", "till-1")
    finally:
        await store.close()


async def test_connections_per_store(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, max_connections_per_store=3)
    store, other = Store(broker), Store(broker)
    try:
        for n in range(3):
            await store.connect("erp_secondary", f"pos-{n}")
        reply, code = await refused_hello(broker, store.token("manager", "late"))
        assert reply["error"]["code"] == "LIMIT_REACHED" and code == 4008, reply
        await other.connect("erp_main")  # another store has its own count
        assert all([(await c.request("ping"))["ok"] for c in store.clients])
    finally:
        await store.close()
        await other.close()


async def test_connections_per_process(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, max_connections=3)
    stores = [Store(broker) for _ in range(4)]
    try:
        for store in stores[:3]:
            await store.connect("erp_main")
        reply, code = await refused_hello(broker, stores[3].token("erp_main"))
        assert reply["error"]["code"] == "LIMIT_REACHED" and code == 4008, reply
        for store in stores[:3]:
            assert (await store.clients[0].request("ping"))["ok"]
    finally:
        for store in stores:
            await store.close()


async def test_subscriptions_per_connection(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, max_subscriptions=3)
    store = Store(broker)
    try:
        screen = await store.connect("manager")
        for n in range(3):
            assert (await screen.request("subscribe", channel=store.channel(f"o{n}")))["ok"]
        refused = await screen.request("subscribe", channel=store.channel("o3"))
        assert refused["ok"] is False and refused["error"]["code"] == "LIMIT_REACHED", refused
        # The connection stays open; a channel it already has is not one more.
        assert (await screen.request("ping"))["ok"]
        assert (await screen.request("subscribe", channel=store.channel("o0")))["ok"]
        assert (await screen.request("unsubscribe", channel=store.channel("o0")))["ok"]
        assert (await screen.request("subscribe", channel=store.channel("o3")))["ok"]
        assert screen.close_code is None
        # The bound is per connection: another connection starts from zero.
        other = await store.connect("manager")
        assert (await other.request("subscribe", channel=store.channel()))["ok"]
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_connection_limit_holds_for_simultaneous_hellos(
        broker_factory: BrokerFactory, backend: str, request: pytest.FixtureRequest) -> None:
    url = "memory" if backend == "memory" else request.getfixturevalue("redis_server").url
    broker = start_broker(broker_factory, backend=url, max_connections_per_terminal=2)
    store = Store(broker)
    try:
        clients = [await WsClient.connect(broker.url, hello=False) for _ in range(8)]
        store.clients += clients
        token = store.token("erp_main", "till-1")
        if backend == "redis":  # a slow moment of Redis: every hello is in flight at once
            slow = aioredis.from_url(url)
            await slow.execute_command("CLIENT", "PAUSE", 300, "ALL")
            await slow.aclose()
        replies = await asyncio.gather(*[c.request("hello", token=token, protocol=1)
                                         for c in clients])
        codes = sorted("OK" if r["ok"] else r["error"]["code"] for r in replies)
        assert codes == ["LIMIT_REACHED"] * 6 + ["OK"] * 2, codes
    finally:
        await store.close()


# --- slow consumers ---------------------------------------------------------------------------

async def stuck_consumer(broker: BrokerProcess, store: Store, cashier: WsClient,
                         role: str = "manager") -> tuple[RawWs, int]:
    """A screen that subscribes to its store channel and then reads nothing, and the cashier's
    big orders published until the broker gives up on it (tablelock_slow_consumers_total)."""
    status, slow = await RawWs.open(broker.port, rcvbuf=4096)
    assert status == 101
    hello = await slow.request("hello", token=store.token(role, "stuck-screen"), protocol=1)
    assert hello["ok"], hello
    assert (await slow.request("subscribe", channel=store.channel()))["ok"]
    # From here on it reads nothing. Big orders fill the socket buffers fast.
    items = [{"sku": f"dish-{n}", "note": "x" * 200} for n in range(120)]
    published = 0
    while metric(await scrape(broker), "tablelock_slow_consumers_total") < 1:
        assert published < 2000, "the stuck consumer was never closed"
        for _ in range(20):
            published += 1
            reply = await store.publish(cashier, order_id=f"o{published}", items=items)
            assert reply["ok"], reply
    return slow, published


async def test_a_consumer_that_stops_reading_is_closed_4010(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, max_queue_messages=50)
    store = Store(broker)
    try:
        cashier = await store.erp("cashier")
        healthy = await store.connect("manager", "dashboard")
        await healthy.request("subscribe", channel=store.channel())
        slow, published = await stuck_consumer(broker, store, cashier)
        # The others carried on: the healthy screen got every event, in order.
        events = await healthy.collect(published, "order.updated", timeout=10)
        assert [e["order"]["order_id"] for e in events] == [f"o{n + 1}"
                                                            for n in range(published)]
        assert [e["seq"] for e in events] == list(range(events[0]["seq"],
                                                        events[0]["seq"] + published))
        assert (await cashier.request("ping"))["ok"]
        # Reading the stuck socket now: what was in flight, then a close frame with 4010.
        assert await asyncio.wait_for(slow.close_code(), 10) == 4010
        slow.abort()
        assert metric(await scrape(broker), "tablelock_slow_consumers_total") == 1
    finally:
        await store.close()


async def test_a_closed_slow_consumer_has_no_more_requests_executed(
        broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, max_queue_messages=50)
    store = Store(broker)
    try:
        cashier = await store.erp("cashier")
        healthy = await store.connect("manager", "dashboard")
        await healthy.request("subscribe", channel=store.channel())
        slow, _ = await stuck_consumer(broker, store, cashier, role="erp_secondary")
        late = {"order_id": "after-close", "table_id": "t9", "version": 1, "amount_cents": 1,
                "items": [], "status": "open"}
        await slow.send_text(json.dumps({"id": "late", "type": "order.publish", "order": late,
                                         "change": "modify"}))
        await healthy.no_event("order.updated", within=1.5,
                               where=lambda e: e["order"]["order_id"] == "after-close")
        status, _ = await store.http("GET", "/orders/after-close")
        assert status == 404
        slow.abort()
    finally:
        await store.close()


# --- Origin ---------------------------------------------------------------------------------

async def test_browser_origins_are_checked_at_the_handshake(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory, allowed_origins="https://pos.example")
    own = f"http://127.0.0.1:{broker.port}"
    token = mint(unique(), "erp_main", "till")
    for origin, expected in [("https://evil.example", 403), ("https://pos.example", 101),
                             (own, 101), (None, 101), ("null", 403),
                             ("https://pos.example.evil.example", 403)]:
        status, raw = await RawWs.open(broker.port, origin=origin)
        assert status == expected, origin
        if status == 101:
            reply = await raw.request("hello", token=token, protocol=1)
            assert reply["ok"], (origin, reply)
        raw.abort()
    # The same through a real client library.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(broker.url, origin="https://evil.example",  # type: ignore[arg-type]
                                 subprotocols=["tablelock.v1"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 403
    async with websockets.connect(broker.url, origin="https://pos.example",  # type: ignore[arg-type]
                                  subprotocols=["tablelock.v1"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 1, "type": "hello", "token": token, "protocol": 1}))
        assert json.loads(await ws.recv())["ok"]


# --- token expiry and token.refresh -------------------------------------------------------------

async def test_token_expiry_closes_4003_unless_refreshed(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory)
    store = Store(broker)
    try:
        # Minted in this order, so that `lapsing` never expires before the other two.
        refreshed_token = store.token("erp_main", "till-r", ttl_s=2)
        wrong_token = store.token("erp_main", "till-w", ttl_s=2)
        lapsing_token = store.token("erp_main", "till-l", ttl_s=2)
        refreshed = await WsClient.connect(broker.url, refreshed_token)
        wrong = await WsClient.connect(broker.url, wrong_token)
        lapsing = await WsClient.connect(broker.url, lapsing_token)
        store.clients += [refreshed, wrong, lapsing]

        fresh = store.token("erp_main", "till-r", ttl_s=3600)
        reply = await refreshed.request("token.refresh", token=fresh)
        assert reply["ok"], reply
        assert reply["expires_at"] == token_exp(fresh) * 1000

        other_terminal = store.token("erp_main", "till-x", ttl_s=3600)
        denied = await wrong.request("token.refresh", token=other_terminal)
        assert denied["ok"] is False and denied["error"]["code"] == "AUTH_FAILED", denied
        garbage = await wrong.request("token.refresh", token="not-a-token")
        assert garbage["error"]["code"] == "AUTH_FAILED", garbage
        assert (await wrong.request("ping"))["ok"]  # a refused refresh does not close

        # Unrefreshed: closed 4003 at its expiry, not before, not much after.
        assert await lapsing.closed(timeout=5) == 4003
        closed_at = time.time()
        assert token_exp(lapsing_token) - 0.05 <= closed_at <= token_exp(lapsing_token) + 1.5
        # A refused refresh did not move the end either.
        assert await wrong.closed(timeout=2) == 4003
        # The refreshed connection is past its old expiry and still serves.
        assert time.time() > token_exp(refreshed_token)
        assert (await refreshed.request("ping"))["ok"]
        assert refreshed.close_code is None
    finally:
        await store.close()


# --- SIGTERM drain -------------------------------------------------------------------------

async def test_sigterm_drains_with_1012_spread_over_the_window(
        broker_factory: BrokerFactory) -> None:
    window = 1.0
    broker = start_broker(broker_factory, drain_window_s=window)
    store = Store(broker)
    loop = asyncio.get_running_loop()
    try:
        clients = [await store.connect("erp_secondary", f"pos-{n}") for n in range(20)]

        async def close_time(client: WsClient) -> tuple[int | None, float]:
            code = await client.closed(timeout=window + 5)
            return code, loop.time()

        watches = [asyncio.create_task(close_time(c)) for c in clients]
        assert broker.proc is not None
        proc = broker.proc
        signalled = loop.time()
        proc.send_signal(signal.SIGTERM)

        # A newcomer during the drain is told to go elsewhere at once.
        await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)  # draining now
        newcomer = await WsClient.connect(broker.url, hello=False)
        assert await newcomer.closed(timeout=2) == 1012
        assert loop.time() - signalled < window, "the newcomer came in after the window"

        closes = await asyncio.gather(*watches)
        assert {code for code, _ in closes} == {1012}
        times = sorted(t - signalled for _, t in closes)
        assert times[-1] <= window + 1.0, times
        assert times[-1] - times[0] >= window * 0.6, f"not spread over the window: {times}"
        # Spread, not bunched: no tenth of the window holds more than a quarter of them.
        buckets = [int(t / (window / 10)) for t in times]
        assert max(buckets.count(b) for b in set(buckets)) <= 10, times

        returncode = await asyncio.to_thread(proc.wait, window + 5 - (loop.time() - signalled))
        assert loop.time() - signalled <= window + 5
        assert returncode in (0, -signal.SIGTERM), returncode
    finally:
        await store.close()


# --- metrics ---------------------------------------------------------------------------------

async def test_metrics_move_with_lock_traffic(broker_factory: BrokerFactory) -> None:
    broker = start_broker(broker_factory)
    store = Store(broker)
    try:
        text = await asyncio.to_thread(_get, f"{broker.http}/metrics")
        for name, kind in [("tablelock_connections", "gauge"),
                           ("tablelock_requests_total", "counter"),
                           ("tablelock_lock_events_total", "counter"),
                           ("tablelock_fanout_seconds", "histogram"),
                           ("tablelock_send_queue_frames", "gauge"),
                           ("tablelock_backend_seconds", "histogram"),
                           ("tablelock_expiry_lag_seconds", "histogram"),
                           ("tablelock_slow_consumers_total", "counter"),
                           ("tablelock_rate_limited_total", "counter"),
                           ("tablelock_redis_events_total", "counter")]:
            assert f"# TYPE {name} {kind}" in text, name
        before = await scrape(broker)
        await store.config(h5_payment_lock_ttl_ms=5000)
        cashier = await store.erp("cashier")
        second = await store.erp("pos-2", role="erp_secondary")
        manager = await store.connect("manager")
        await manager.request("subscribe", channel=store.channel())
        await store.publish(cashier, order_id="o1", table_id="t1")
        await store.publish(cashier, order_id="o2", table_id="t2")

        # An h5 payment lock, left to expire while the rest goes on.
        phone = await store.connect("h5", table="t2")
        held = await phone.request("lock.acquire", order_id="o2", kind="payment")
        assert held["ok"], held

        # grant, conflict, force, release, payment
        assert (await cashier.request("lock.acquire", order_id="o1", kind="order"))["ok"]
        conflict = await second.request("lock.acquire", order_id="o1", kind="order")
        assert conflict["error"]["code"] == "ORDER_LOCKED"
        forced = await second.request("lock.acquire", order_id="o1", kind="order", force=True)
        assert forced["ok"], forced
        pay = await second.request("lock.acquire", order_id="o1", kind="payment")
        assert pay["ok"], pay
        paid = await second.request("payment.complete", order_id="o1", version=1,
                                    amount_cents=1000, payment_ref="ref-1",
                                    token=pay["lock"]["token"])
        assert paid["ok"], paid
        await manager.event("lock.expired", timeout=8)

        after = await scrape(broker)
        for role, count in [("erp_main", 1), ("erp_secondary", 1), ("manager", 1), ("h5", 1)]:
            assert metric(after, "tablelock_connections", role=role) == count, role

        def moved(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert moved("tablelock_requests_total", type="lock.acquire", code="OK") == 4
        assert moved("tablelock_requests_total", type="lock.acquire", code="ORDER_LOCKED") == 1
        assert moved("tablelock_requests_total", type="payment.complete", code="OK") == 1
        assert moved("tablelock_requests_total", type="order.publish", code="OK") == 2
        events = {outcome: moved("tablelock_lock_events_total", outcome=outcome)
                  for outcome in ("grant", "conflict", "force", "expiry", "release", "payment")}
        assert events == {"grant": 4, "conflict": 1, "force": 1, "expiry": 1,
                          "release": 2, "payment": 1}, events  # released: upgraded, paid
        assert metric(after, "tablelock_expiry_lag_seconds_count") >= 1
        assert ("tablelock_send_queue_frames", (("stat", "sum"),)) in after
        assert ("tablelock_send_queue_frames", (("stat", "max"),)) in after

        # A connection going away is counted down.
        await phone.close()
        await manager.event("terminal.offline", where=lambda e: e["terminal"]["role"] == "h5")
        assert metric(await scrape(broker), "tablelock_connections", role="h5") == 0
    finally:
        await store.close()


async def test_sampled_latency_histograms_move(broker_factory: BrokerFactory) -> None:
    """tablelock_fanout_seconds measures one fan-out in 64 and tablelock_backend_seconds one
    backend call in 16: enough lock round trips move both."""
    broker = start_broker(broker_factory)
    store = Store(broker)
    try:
        cashier = await store.erp("cashier")
        screen = await store.connect("manager")
        await screen.request("subscribe", channel=store.channel())
        await store.publish(cashier, order_id="o1")
        before = await scrape(broker)
        for _ in range(70):  # 140 backend calls, 140 events on a subscribed channel
            lock = await cashier.request("lock.acquire", order_id="o1", kind="order")
            await cashier.request("lock.release", order_id="o1", kind="order",
                                  token=lock["lock"]["token"])
        await screen.collect(140, timeout=5, where=lambda e: e["event"].startswith("lock."))
        after = await scrape(broker)
        assert (metric(after, "tablelock_fanout_seconds_count")
                > metric(before, "tablelock_fanout_seconds_count"))
        assert 0 < metric(after, "tablelock_fanout_seconds_sum") < 1
        # (Sampling every 16th call, a strict acquire/release alternation only ever measures
        # one of the two: compare the total over `call`.)
        assert (metric_sum(after, "tablelock_backend_seconds_count")
                > metric_sum(before, "tablelock_backend_seconds_count"))
        assert 0 < metric_sum(after, "tablelock_backend_seconds_sum") < 1
    finally:
        await store.close()


# --- Redis down -----------------------------------------------------------------------------

async def until_metric(broker: BrokerProcess, name: str, at_least: float,
                       timeout: float = 5.0, **labels: str) -> Samples:
    """Scrape until the sample reaches `at_least` (the broker's own report is the event)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(broker)
        if metric(samples, name, **labels) >= at_least:
            return samples
        assert asyncio.get_running_loop().time() < deadline, f"{name}{labels} stayed below"
        await asyncio.sleep(0.05)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


async def test_redis_down_shows_in_readiness_and_metrics(broker_factory: BrokerFactory,
                                                         own_redis: RedisServer) -> None:
    """What the TablelockRedisDown alert of docs/operations.md looks at."""
    broker = start_broker(broker_factory, backend=own_redis.url)
    store = Store(broker)
    try:
        cashier = await store.erp("cashier")
        await store.publish(cashier, order_id="o1")
        assert (await asyncio.to_thread(_get, f"{broker.http}/readyz")) == '{"ready":true}'
        own_redis.stop()
        started = asyncio.get_running_loop().time()
        refused = await cashier.request("lock.acquire", order_id="o1", kind="order")
        assert refused["error"]["code"] == "UNAVAILABLE", refused
        assert asyncio.get_running_loop().time() - started < 1.5
        await until_metric(broker, "tablelock_redis_events_total", 1, kind="subscription_lost")
        samples = await until_metric(broker, "tablelock_requests_total", 1,
                                     type="lock.acquire", code="UNAVAILABLE")
        assert metric(samples, "tablelock_lock_events_total", outcome="grant") == 0
        with pytest.raises(urllib.error.HTTPError) as unready:
            await asyncio.to_thread(_get, f"{broker.http}/readyz")
        assert unready.value.code == 503
    finally:
        await store.close()


async def test_connection_gauge_survives_hellos_refused_while_redis_is_down(
        broker_factory: BrokerFactory, own_redis: RedisServer) -> None:
    broker = start_broker(broker_factory, backend=own_redis.url)
    store = Store(broker)
    try:
        await store.erp("cashier")
        status, _ = await store.http("GET", "/config")  # the broker caches the store's state
        assert status == 200
        own_redis.stop()
        reply, code = await refused_hello(broker, store.token("erp_secondary", "pos-2"))
        assert reply["error"]["code"] == "UNAVAILABLE" and code == 1013, reply
        samples = await scrape(broker)
        assert metric(samples, "tablelock_connections", role="erp_main") == 1
        assert metric(samples, "tablelock_connections", role="erp_secondary") == 0
    finally:
        await store.close()


# --- logs ------------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
def log_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def test_json_logs_carry_store_order_terminal(broker_factory: BrokerFactory,
                                                    log_backend: str,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    # The broker inherits the test's stderr, which capfd captures at the descriptor level.
    broker = start_broker(broker_factory, backend=log_backend, log_format="json",
                          log_level="INFO")
    store = Store(broker)
    try:
        first = await store.erp("till-1")
        second = await store.erp("till-2", role="erp_secondary")
        await store.publish(first, order_id="o1")
        assert (await first.request("lock.acquire", order_id="o1", kind="order"))["ok"]
        forced = await second.request("lock.acquire", order_id="o1", kind="order", force=True,
                                      operator="alice", reason="till-1 froze")
        assert forced["ok"], forced
        pay = await second.request("lock.acquire", order_id="o1", kind="payment")
        paid = await second.request("payment.complete", order_id="o1", version=1,
                                    amount_cents=1000, payment_ref="pos-0001",
                                    token=pay["lock"]["token"])
        assert paid["ok"], paid
        stale = await second.request("payment.complete", order_id="o1", version=1,
                                     amount_cents=1000, payment_ref="pos-0002",
                                     token=pay["lock"]["token"])
        assert stale["error"]["code"] == "ORDER_PAID"
    finally:
        await store.close()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    plain = [line for line in lines if not line.startswith("{")]
    assert not [line for line in plain if "tablelock" in line], plain  # uvicorn's may be
    mine = [r for r in records if r.get("store") == store.store_id]
    for record in mine:
        assert {"ts", "level", "logger", "msg"} <= record.keys(), record
    by_msg = {r["msg"]: r for r in mine}
    force = by_msg["lock.forced"]
    assert force["order"] == "o1" and force["terminal"] == "till-2", force
    assert force["kind"] == "order" and force["operator"] == "alice", force
    assert force["reason"] == "till-1 froze", force
    payment = by_msg["payment.completed"]
    assert payment["order"] == "o1" and payment["terminal"] == "till-2", payment
    assert payment["payment_ref"] == "pos-0001", payment
    rejected = by_msg["payment.rejected"]
    assert rejected["code"] == "ORDER_PAID" and rejected["payment_ref"] == "pos-0002", rejected
    assert "Traceback" not in err


async def test_a_policy_close_is_logged(broker_factory: BrokerFactory,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    broker = start_broker(broker_factory, rate_per_s=50, rate_burst=20, log_format="json",
                          log_level="INFO")
    store = Store(broker)
    try:
        flood = await store.connect("erp_secondary", "flooder")
        with contextlib.suppress(websockets.ConnectionClosed):
            for n in range(300):
                await flood.send_raw(json.dumps({"id": n, "type": "ping"}))
        assert await flood.closed() == 4008
    finally:
        await store.close()
    records = [json.loads(line) for line in capfd.readouterr().err.splitlines()
               if line.startswith("{")]
    assert any(r.get("close_code") == 4008 and r.get("terminal") == "flooder"
               and r.get("store") == store.store_id for r in records), records
