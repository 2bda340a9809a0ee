"""A peer with no token against the broker's edge, and a neighbour who pays for it.

Each attack is an asyncio function over raw sockets that runs for a given time and counts,
in an AttackOutcome, what it opened and how the broker ended it. `neighbour` is an authenticated
ERP terminal doing lock round trips meanwhile. The abuse benchmark (bench/abuse.py) prints
their figures; tests/test_edge_transport.py asserts the bounds with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import websockets

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Protocol: tablelock.v1\r\n\r\n")
# A client's PING frame with the largest control payload (125 bytes), masked with a zero key.
PING = b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125
ENDLESS_HEADER_START = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: "


@dataclass
class AttackOutcome:
    """What one attack's sockets met: how many it opened, how the broker ended them, and the
    broker's last words."""

    connections: int = 0  # sockets the attack opened
    cut_off: int = 0  # ... that the broker ended (close or reset) before the attack did
    stalled: int = 0  # ... whose writes the broker stopped taking (it stopped reading)
    sent_bytes: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # the broker's last words, if any
    lifetimes_s: list[float] = field(default_factory=list)  # of the sockets it cut off


def rss_mib(pid: int) -> float:
    """A process's resident set, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


async def peak_rss_mib(pid: int, stop: asyncio.Event, every_s: float = 0.1) -> float:
    """The highest RSS seen until `stop` is set."""
    peak = rss_mib(pid)
    while not stop.is_set():
        peak = max(peak, rss_mib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return max(peak, rss_mib(pid))


def _first_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode("latin-1") or "EOF"


async def _upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(UPGRADE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not head.startswith(b"HTTP/1.1 101"):
        writer.transport.abort()
        raise ConnectionError(_first_line(head))
    return reader, writer


async def ping_flood(port: int, seconds: float, tally: AttackOutcome, batch: int = 500) -> None:
    """Upgrade, then write PINGs as fast as the socket takes them and never read a PONG;
    on a new socket whenever the broker ends one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    burst = PING * batch
    while loop.time() < deadline:
        try:
            _, writer = await _upgraded(port)
        except (OSError, ConnectionError, TimeoutError):
            await asyncio.sleep(0.01)
            continue
        tally.connections += 1
        opened = loop.time()
        try:
            while True:
                writer.write(burst)
                await asyncio.wait_for(writer.drain(), max(deadline - loop.time(), 0.001))
                tally.sent_bytes += len(burst)
        except TimeoutError:
            if writer.transport.get_write_buffer_size() > 0:
                tally.stalled += 1
        except OSError:
            tally.cut_off += 1
            tally.lifetimes_s.append(loop.time() - opened)
        finally:
            writer.transport.abort()


async def endless_header(port: int, seconds: float, tally: AttackOutcome,
                         chunk: int = 65_536) -> None:
    """One header line that never ends, as fast as the socket takes it; on a new socket
    whenever the broker ends one. Records the status line the broker answered with."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    filler = b"a" * chunk
    while loop.time() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        tally.connections += 1
        opened = loop.time()
        answer = asyncio.ensure_future(reader.read(256))
        try:
            writer.write(ENDLESS_HEADER_START)
            while not answer.done() and loop.time() < deadline:
                writer.write(filler)
                await asyncio.wait_for(writer.drain(), max(deadline - loop.time(), 0.001))
                tally.sent_bytes += chunk
        except OSError:  # TimeoutError included: the broker stopped reading, or hung up
            pass
        finally:
            if answer.done() or loop.time() < deadline:
                with contextlib.suppress(Exception):
                    said = await asyncio.wait_for(answer, 1)
                    tally.answers[_first_line(said)] += 1
                    tally.cut_off += 1
                    tally.lifetimes_s.append(loop.time() - opened)
            answer.cancel()
            writer.transport.abort()


async def slow_loris(port: int, seconds: float, tally: AttackOutcome, every_s: float = 5.0,
                     sockets: int = 1) -> None:
    """`sockets` upgrade requests that each add a header line every `every_s` seconds and
    never finish; each is opened again when the broker ends it."""

    async def one() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            tally.connections += 1
            opened = loop.time()
            answer = asyncio.ensure_future(reader.read(256))
            try:
                writer.write(b"GET /ws HTTP/1.1\r\n")
                line = 0
                while loop.time() < deadline:
                    done, _ = await asyncio.wait(
                        {answer}, timeout=min(every_s, max(deadline - loop.time(), 0.001)))
                    if done:
                        tally.answers[_first_line(answer.result())] += 1
                        tally.cut_off += 1
                        tally.lifetimes_s.append(loop.time() - opened)
                        break
                    line += 1
                    writer.write(b"X-Slow-%d: x\r\n" % line)
            except OSError:
                tally.cut_off += 1
                tally.lifetimes_s.append(loop.time() - opened)
            finally:
                answer.cancel()
                writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(sockets)))


async def silent_sockets(url: str, count: int) -> list[websockets.ClientConnection]:
    """WebSockets that complete the upgrade and then never say hello."""
    opened = []
    for _ in range(count):
        opened.append(await websockets.connect(
            url, subprotocols=["tablelock.v1"],  # type: ignore[list-item]
            compression=None, open_timeout=10))
    return opened


@dataclass
class RoundTrips:
    ms: list[float] = field(default_factory=list)
    errors: int = 0

    def p(self, q: float) -> float:
        if not self.ms:
            return float("nan")
        if q == 50:
            return statistics.median(self.ms)
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


async def neighbour(url: str, token: str, seconds: float, trips: RoundTrips,
                    ready: asyncio.Event | None = None, order_id: str = "n1",
                    every_s: float = 0.01) -> None:
    """An erp_main that publishes an order, then takes and releases its payment lock over
    and over, a request every `every_s` (a busy till's 100 a second), timing each one's
    round trip."""
    async with websockets.connect(url, subprotocols=["tablelock.v1"],  # type: ignore[list-item]
                                  compression=None) as ws:
        ids = iter(range(1, 1 << 62))

        async def call(type_: str, **params: object) -> dict[str, object]:
            request_id = next(ids)
            await ws.send(json.dumps({"id": request_id, "type": type_, **params}))
            while True:
                reply: dict[str, object] = json.loads(await ws.recv())
                if reply.get("id") == request_id:
                    return reply

        await call("hello", token=token, protocol=1)
        await call("order.publish", change="modify", order={
            "order_id": order_id, "table_id": "t1", "version": 1, "amount_cents": 1000,
            "status": "open", "items": [{"sku": "rice", "qty": 1}]})
        if ready is not None:
            ready.set()
        async def timed(type_: str, **params: object) -> dict[str, object]:
            sent = time.perf_counter()
            reply = await call(type_, **params)
            trips.ms.append((time.perf_counter() - sent) * 1000)
            trips.errors += not reply.get("ok")
            await asyncio.sleep(every_s)
            return reply

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lock = (await timed("lock.acquire", order_id=order_id, kind="payment")).get("lock")
            await timed("lock.release", order_id=order_id, kind="payment",
                        token=lock.get("token") if isinstance(lock, dict) else None)
