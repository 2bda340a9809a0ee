"""The transport edge: what a socket with no token can cost the broker (docs/security.md).

Each test runs one attack of issue 10 against a real broker process, with the attackers of
the abuse benchmark (bench/attacks.py) on raw sockets, and asserts both how the broker ends
the attack and what it cost: the broker's RSS read from /proc, or the lock round trip of a
neighbour, an authenticated ERP terminal on the same broker. Brokers are configured the
way an operator does it, with TABLELOCK_<FIELD> variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Awaitable, Callable

import pytest
import websockets

from bench.attacks import (
    AttackOutcome,
    RoundTrips,
    endless_header,
    neighbour,
    peak_rss_mib,
    ping_flood,
    rss_mib,
    silent_sockets,
    slow_loris,
)

from .support import BrokerProcess, WsClient, mint, unique

BrokerFactory = Callable[..., BrokerProcess]
Attack = Callable[[int, float, AttackOutcome], Awaitable[None]]


def start(factory: BrokerFactory, **settings: str | float) -> BrokerProcess:
    env = {f"TABLELOCK_{name.upper()}": str(value) for name, value in settings.items()}
    return factory(env=env).start()


async def under_attack(broker: BrokerProcess, attack: Attack, seconds: float,
                       attackers: int = 4) -> tuple[AttackOutcome, RoundTrips, float]:
    """Run `attackers` copies of the attack for `seconds` while a neighbour does lock round
    trips; the tally, the neighbour's round trips during the attack, and the broker's RSS
    growth (peak during the attack minus before it, MiB)."""
    assert broker.proc is not None
    pid = broker.proc.pid
    trips, ready, stop = RoundTrips(), asyncio.Event(), asyncio.Event()
    peer = asyncio.create_task(neighbour(broker.url, mint(unique(), "erp_main", "till"),
                                         seconds, trips, ready))
    await asyncio.wait_for(ready.wait(), 10)
    before = rss_mib(pid)
    peak = asyncio.create_task(peak_rss_mib(pid, stop))
    tally = AttackOutcome()
    await asyncio.gather(*(attack(broker.port, seconds, tally) for _ in range(attackers)))
    stop.set()
    await peer
    return tally, trips, await peak - before


# --- 1. PING flood ------------------------------------------------------------------------

async def test_control_frames_past_the_budget_close_4008(broker_factory: BrokerFactory) -> None:
    broker = start(broker_factory)  # the default budget: 20 at once, 2 a second after
    async with websockets.connect(broker.url, subprotocols=["tablelock.v1"],  # type: ignore[list-item]
                                  compression=None) as ws:
        for _ in range(20):  # the burst is answered
            await asyncio.wait_for(await ws.ping(), 5)
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(100):  # more than any refill while the burst was answered
                await ws.ping()
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 4008 and ws.close_reason == "control frame flood"


async def test_a_ping_flood_without_a_token_costs_under_20_mib(
        broker_factory: BrokerFactory) -> None:
    """Four sockets flood PINGs for 8 s without reading a PONG, reconnecting when closed."""
    broker = start(broker_factory)
    tally, trips, growth = await under_attack(broker, ping_flood, 8)
    assert tally.connections > 4 and tally.cut_off > 0, tally  # closed, again and again
    assert growth < 20, f"RSS grew {growth:.1f} MiB"  # it was 727 MiB in 25 s
    assert trips.errors == 0 and trips.ms


async def test_a_socket_that_does_not_read_is_not_read_either(
        broker_factory: BrokerFactory) -> None:
    """With the control-frame budget out of the way, the other bound alone: a socket whose
    outgoing buffer is past the high-water mark is no longer read, so its PINGs stay in the
    kernel's buffers (the attacker's writes stall) instead of becoming PONGs in memory."""
    broker = start(broker_factory, control_rate_per_s=1e9, control_burst=1e9)
    tally, trips, growth = await under_attack(broker, ping_flood, 8)
    assert tally.stalled == tally.connections == 4 and tally.cut_off == 0, tally
    assert growth < 20, f"RSS grew {growth:.1f} MiB"
    assert trips.errors == 0 and trips.ms


# --- 2. A header line that never ends ---------------------------------------------------------

async def test_an_endless_header_is_refused_and_the_neighbour_keeps_its_p50(
        broker_factory: BrokerFactory) -> None:
    """A socket streams one header line as fast as it can for 6 s, reconnecting when
    refused. With the default parser (httptools, guarded) each head is refused 431 once it
    passes 16 KiB, and a neighbour's lock round trip stays under 5 ms at p50."""
    broker = start(broker_factory)
    tally, trips, growth = await under_attack(broker, endless_header, 6, attackers=1)
    assert tally.cut_off > 10, tally
    assert set(tally.answers) == {"HTTP/1.1 431 Request Header Fields Too Large"}, tally
    assert trips.errors == 0 and len(trips.ms) > 50
    assert trips.p(50) < 5, f"neighbour p50 {trips.p(50):.2f} ms"  # it was 3.7 s
    assert growth < 20, f"RSS grew {growth:.1f} MiB"  # 200 MB of headers were held


async def test_h11_refuses_an_endless_header_too(broker_factory: BrokerFactory) -> None:
    """The other parser a broker may be given (http_parser=h11) bounds the head with h11's
    own limit, set to max_header_bytes: 400, and the memory stays bounded. (Its cost per
    refused socket is higher: bench/README.md.)"""
    broker = start(broker_factory, http_parser="h11")
    tally, trips, growth = await under_attack(broker, endless_header, 4, attackers=1)
    assert tally.cut_off > 10 and set(tally.answers) == {"HTTP/1.1 400 Bad Request"}, tally
    assert trips.errors == 0 and trips.ms
    assert growth < 20, f"RSS grew {growth:.1f} MiB"


# --- 3. Slow-loris and silent sockets ------------------------------------------------------------

@pytest.mark.parametrize("parser", ["h11", "httptools"])
async def test_a_slow_loris_upgrade_is_ended_at_its_deadline(broker_factory: BrokerFactory,
                                                             parser: str) -> None:
    """A header line every 0.5 s, for ever: answered 408 and closed once the request head
    has taken upgrade_timeout_s (1.5 s here), as is a socket that sends nothing at all."""
    broker = start(broker_factory, http_parser=parser, upgrade_timeout_s=1.5)
    loris = AttackOutcome()
    await slow_loris(broker.port, 4, loris, every_s=0.5, sockets=2)
    assert loris.cut_off >= 2 and set(loris.answers) == {"HTTP/1.1 408 Request Timeout"}, loris
    assert all(1.4 <= t < 3.5 for t in loris.lifetimes_s), loris.lifetimes_s

    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    loop = asyncio.get_running_loop()
    opened = loop.time()
    said = await asyncio.wait_for(reader.read(256), 10)
    assert said.startswith(b"HTTP/1.1 408") and 1.4 <= loop.time() - opened < 3.5
    writer.close()

    # A request that is complete in time is untouched, and keep-alive still works.
    with urllib.request.urlopen(f"{broker.http}/healthz", timeout=5) as response:
        assert response.status == 200


@pytest.mark.parametrize("parser", ["h11", "httptools"])
async def test_a_body_that_trickles_after_the_answer_is_not_kept(broker_factory: BrokerFactory,
                                                                 parser: str) -> None:
    """A request answered before its body is in (here a 405 for a POST to /healthz, with a
    100 MB Content-Length) closes the connection, instead of reading a trickle for ever."""
    broker = start(broker_factory, http_parser=parser)
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nx")
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert answer.startswith(b"HTTP/1.1 405")
    try:
        for _ in range(100):  # a byte every 50 ms, for 5 s at most
            writer.write(b"x")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1024), 0.05) == b"":
                    break  # the broker hung up
        else:
            pytest.fail("the broker kept reading the trickle for 5 s")
    except OSError:
        pass  # reset: it hung up too
    finally:
        writer.transport.abort()


async def test_slow_loris_heads_have_a_bound_and_terminals_still_get_in(
        broker_factory: BrokerFactory) -> None:
    """max_anonymous_connections 4 bounds the request heads in progress too: of 10 unfinished
    upgrade requests the 6 oldest get their 408 at once, long before the 5 s deadline, and a
    terminal's upgrade and hello go through (making room for itself)."""
    broker = start(broker_factory, max_anonymous_connections=4)
    loop = asyncio.get_running_loop()
    opened = loop.time()
    lorises = []
    for _ in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write(b"GET /ws HTTP/1.1\r\nX-Slow: 1\r\n")
        await writer.drain()
        lorises.append((reader, writer))
    try:
        for reader, _ in lorises[:6]:
            said = await asyncio.wait_for(reader.read(256), 5)
            assert said.startswith(b"HTTP/1.1 408"), said
        assert loop.time() - opened < 4.0  # well before the deadline
        for reader, _ in lorises[6:]:
            assert not reader.at_eof()
        terminal = await WsClient.connect(broker.url, mint(unique(), "erp_main", "till"))
        assert terminal.hello["ok"]
        await terminal.close()
        said = await asyncio.wait_for(lorises[6][0].read(256), 5)  # the oldest made room
        assert said.startswith(b"HTTP/1.1 408"), said
    finally:
        for _, writer in lorises:
            writer.transport.abort()


async def test_silent_sockets_have_their_own_bound_and_terminals_still_get_in(
        broker_factory: BrokerFactory) -> None:
    """max_connections 10, max_anonymous_connections 4: 30 upgraded sockets that never say
    hello keep at most 4 open (the oldest are closed 4008 as newer ones come), and then 10
    real terminals are all admitted, as none of the silent sockets counted against them.
    (The silent ones left would go at hello_timeout_s, 10 s by default.)"""
    broker = start(broker_factory, max_connections=10, max_anonymous_connections=4)
    silent = await silent_sockets(broker.url, 30)
    store = unique()
    terminals: list[WsClient] = []
    try:
        for evicted in silent[:26]:
            await asyncio.wait_for(evicted.wait_closed(), 5)
            assert evicted.close_code == 4008, evicted.close_code
            assert evicted.close_reason == "too many connections without hello"
        assert all(ws.close_code is None for ws in silent[26:])
        for n in range(10):
            terminals.append(await WsClient.connect(broker.url, mint(store, "erp_secondary",
                                                                     f"till-{n}")))
        assert all(t.hello["ok"] for t in terminals)
        # A terminal is a silent socket for a round trip: the first made room for itself
        # (the oldest silent one went), the others found that room free again.
        await asyncio.wait_for(silent[26].wait_closed(), 5)
        assert silent[26].close_code == 4008
        assert all(ws.close_code is None for ws in silent[27:])
        # The limit on terminals is unchanged: an eleventh is refused.
        with pytest.raises(RuntimeError, match="LIMIT_REACHED"):
            await WsClient.connect(broker.url, mint(store, "erp_secondary", "till-10"))
    finally:
        for ws in silent:
            await ws.close()
        for terminal in terminals:
            await terminal.close()
