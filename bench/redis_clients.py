"""Redis clients side by side, for the broker's access pattern: client-side CPU per call.

    python -m bench.redis_clients [--rounds 3] [--scale 1.0]

One redis-server of our own (free port, no persistence, on the load generator's core); this
process on the server core, on uvloop like the broker. Every client runs the same workloads,
alternately, `--rounds` times in one run (the machine is shared: ratios between clients of the
same round are what count), and the median round of each is printed:

- `evalsha x1`: one caller, EVALSHA of a small script (HINCRBY one field), call after call;
- `evalsha x100`: 100 concurrent callers, as when many connections commit at once;
- `commit x100`: the same with a commit's size: 14 keys and 40 arguments (~1.6 kB), as the
  broker's COMMIT script is called (packing the command is then a cost of its own);
- `hget x100`: 100 concurrent callers of a plain HGET (the broker's record read);
- `pubsub recv`: messages of ~300 bytes published by another process on one channel, received
  and each decoded with msgspec (the broker decodes every event once).

CPU is the whole process's (time.process_time: every thread, so valkey-glide's Rust core is
counted too) divided by the calls or messages; calls/s is calls over wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from tablelock.backends.resp import PubSubConnection, RespConnection, Script

from .procs import SERVER_CORE, pin_self, start_redis

SCRIPT = "return redis.call('HINCRBY', KEYS[1], 'n', 1)"
KEY = "bench:rec"
# A commit-sized call: the keys and arguments of backends/redis.py's COMMIT, roughly.
COMMIT_KEYS = [KEY] + [f"tl:{{store-0001}}:key-{n}" for n in range(13)]
COMMIT_ARGS: list[bytes | str | int] = (
    [n * 7 for n in range(20)] + [f"arg-{n}" for n in range(16)] + [b"x" * 300] * 4)
CHANNEL = "bench:ev"
PAYLOAD = msgspec.json.encode({
    "type": "event", "channel": "order:store-0001:order-00042", "seq": 123456,
    "event": "lock.acquired",
    "lock": {"order_id": "order-00042", "holder": "terminal-erp-07", "kind": "payment",
             "token": "c0ffee00c0ffee00c0ffee00c0ffee00", "fence": 98765,
             "expires_at": 1764806400123, "acquired_at": 1764806370123},
    "by": {"terminal_id": "terminal-erp-07", "role": "erp_secondary"},
    "ts": 1764806370123,
}).ljust(300)

# Publishes COUNT messages on CHANNEL once told "go" on stdin, in pipelined batches of 100 (a
# process of its own, so its CPU is not counted against the client under test).
PUBLISHER = r"""
import socket, sys
port, count, payload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
cmd = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
    len(sys.argv[4]), sys.argv[4].encode(), len(payload), payload)
sock = socket.create_connection(("127.0.0.1", port))
sys.stdin.readline()
sent = 0
while sent < count:
    batch = min(100, count - sent)
    sock.sendall(cmd * batch)
    got = 0
    while got < batch:
        got += sock.recv(65536).count(b"\r\n")
    sent += batch
"""


class Client:
    """What every client under test offers the bench."""

    name = ""

    async def start(self) -> None: ...
    async def evalsha(self) -> Any: ...
    async def commit(self) -> Any: ...
    async def hget(self) -> Any: ...
    async def subscribe(self, on_message: Callable[[bytes], None]) -> None: ...
    async def close(self) -> None: ...


class RedisPy(Client):
    def __init__(self, port: int, hiredis: bool) -> None:
        import redis.asyncio as aioredis
        from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
        self.name = "redis-py+hiredis" if hiredis else "redis-py (pure)"
        self.hiredis = hiredis
        # As the broker configures it (backends/redis.py: connect).
        pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=port, max_connections=128,
                                               timeout=0.5,
                                               parser_class=_AsyncHiredisParser if hiredis
                                               else _AsyncRESP2Parser)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.sha = await self.redis.script_load(SCRIPT)
        from redis._parsers import _AsyncHiredisParser
        conn = await self.redis.connection_pool.get_connection()
        # hiredis really in use (or really not, for the pure-Python row)
        assert isinstance(conn._parser, _AsyncHiredisParser) == self.hiredis, conn._parser
        await self.redis.connection_pool.release(conn)

    async def evalsha(self) -> Any:
        return await self.redis.evalsha(self.sha, 1, KEY)

    async def commit(self) -> Any:
        return await self.redis.evalsha(self.sha, len(COMMIT_KEYS), *COMMIT_KEYS, *COMMIT_ARGS)

    async def hget(self) -> Any:
        return await self.redis.hget(KEY, "n")

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(CHANNEL)

        async def listen() -> None:
            async for message in self._pubsub.listen():
                if message["type"] == "message":
                    on_message(message["data"])
        self._listener = asyncio.create_task(listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await self._pubsub.aclose()
        await self.redis.aclose()


class Coredis(Client):
    name = "coredis"

    def __init__(self, port: int) -> None:
        import coredis
        self.redis: Any = coredis.Redis(host="127.0.0.1", port=port, max_connections=128)
        self._stack: Any = None
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import contextlib
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(self.redis)
        self.sha = await self.redis.script_load(SCRIPT)

    async def evalsha(self) -> Any:
        return await self.redis.evalsha(self.sha, keys=[KEY])

    async def commit(self) -> Any:
        return await self.redis.evalsha(self.sha, keys=COMMIT_KEYS, args=COMMIT_ARGS)

    async def hget(self) -> Any:
        return await self.redis.hget(KEY, "n")

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        pubsub = self.redis.pubsub(channels=[CHANNEL], ignore_subscribe_messages=True)
        await self._stack.enter_async_context(pubsub)

        async def listen() -> None:
            async for message in pubsub:
                on_message(message["data"])
        self._listener = asyncio.create_task(listen())
        await asyncio.sleep(0.2)  # the context entered means subscribed; let the loop settle

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await self._stack.aclose()


class Glide(Client):
    name = "valkey-glide"

    def __init__(self, port: int) -> None:
        self.port = port
        self._listener: asyncio.Task[None] | None = None
        self._subscriber: Any = None

    async def start(self) -> None:
        from glide import (
            GlideClient,
            GlideClientConfiguration,
            Logger,
            LogLevel,
            NodeAddress,
            Script,
        )
        Logger.set_logger_config(LogLevel.ERROR)  # its slow-response warnings are not figures
        self._config = (GlideClientConfiguration, NodeAddress)
        self.redis: Any = await GlideClient.create(
            GlideClientConfiguration([NodeAddress("127.0.0.1", self.port)]))
        self.script = Script(SCRIPT)

    async def evalsha(self) -> Any:
        return await self.redis.invoke_script(self.script, keys=[KEY])

    async def commit(self) -> Any:
        return await self.redis.invoke_script(
            self.script, keys=COMMIT_KEYS, args=[str(a) if isinstance(a, int) else a
                                                 for a in COMMIT_ARGS])

    async def hget(self) -> Any:
        return await self.redis.hget(KEY, "n")

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        from glide import GlideClient
        config_cls, address = self._config
        modes = config_cls.PubSubChannelModes
        subs = config_cls.PubSubSubscriptions(channels_and_patterns={modes.Exact: {CHANNEL}},
                                              callback=None, context=None)
        self._subscriber = await GlideClient.create(
            config_cls([address("127.0.0.1", self.port)], pubsub_subscriptions=subs))

        async def listen() -> None:
            while True:
                on_message((await self._subscriber.get_pubsub_message()).message)
        self._listener = asyncio.create_task(listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await self._subscriber.close()
        await self.redis.close()


class Resp(Client):
    name = "resp (hiredis, ours)"

    def __init__(self, port: int) -> None:
        self.port = port
        self.script = Script(SCRIPT)
        self._subscriber: PubSubConnection | None = None

    async def start(self) -> None:
        self.conn = await RespConnection.open("127.0.0.1", self.port)

    async def evalsha(self) -> Any:
        return await self.conn.evalsha(self.script, (KEY,))

    async def commit(self) -> Any:
        return await self.conn.evalsha(self.script, COMMIT_KEYS, COMMIT_ARGS)

    async def hget(self) -> Any:
        return await self.conn.execute("HGET", KEY, "n")

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        self._subscriber = await PubSubConnection.open("127.0.0.1", self.port)
        await self._subscriber.subscribe([CHANNEL], lambda _channel, data: on_message(data))

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
        self.conn.close()


@dataclass
class Sample:
    cpu_us: float  # client-process CPU per call
    per_s: float   # calls (or messages) per second of wall time


async def measure(calls: int, run: Callable[[], Awaitable[None]]) -> Sample:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await run()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return Sample(cpu * 1e6 / calls, calls / wall)


async def callers(call: Callable[[], Awaitable[Any]], concurrency: int, calls: int) -> Sample:
    async def caller() -> None:
        for _ in range(calls // concurrency):
            await call()

    async def run() -> None:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return await measure(calls // concurrency * concurrency, run)


async def pubsub(client: Client, port: int, count: int) -> Sample:
    received = 0
    done = asyncio.Event()

    def on_message(data: bytes) -> None:
        nonlocal received
        msgspec.json.decode(data)
        received += 1
        if received == count:
            done.set()

    await client.subscribe(on_message)
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(port), str(count),
                                  PAYLOAD.decode(), CHANNEL], stdin=subprocess.PIPE)
    await asyncio.sleep(0.1)  # the publisher's start-up is not the client's cost

    async def run() -> None:
        assert publisher.stdin is not None
        publisher.stdin.write(b"go\n")
        publisher.stdin.flush()
        await asyncio.wait_for(done.wait(), 120)
    try:
        return await measure(count, run)
    finally:
        publisher.wait(30)


WORKLOADS = ["evalsha x1", "evalsha x100", "commit x100", "hget x100", "pubsub recv"]


async def one_client(make: Callable[[], Client], port: int, scale: float
                     ) -> tuple[str, dict[str, Sample]]:
    client = make()
    await client.start()
    try:
        for _ in range(200):  # warm up connections and the script cache
            await client.evalsha()
        samples = {
            "evalsha x1": await callers(client.evalsha, 1, int(4000 * scale)),
            "evalsha x100": await callers(client.evalsha, 100, int(20000 * scale)),
            "commit x100": await callers(client.commit, 100, int(10000 * scale)),
            "hget x100": await callers(client.hget, 100, int(20000 * scale)),
            "pubsub recv": await pubsub(client, port, int(20000 * scale)),
        }
    finally:
        await client.close()
    return client.name, samples


async def main_async(port: int, rounds: int, scale: float) -> None:
    makers: list[Callable[[], Client]] = [
        lambda: RedisPy(port, hiredis=True), lambda: RedisPy(port, hiredis=False),
        lambda: Coredis(port), lambda: Glide(port), lambda: Resp(port)]
    results: dict[str, list[dict[str, Sample]]] = {}
    for round_no in range(rounds):
        order = makers if round_no % 2 == 0 else makers[::-1]  # alternate, both directions
        for make in order:
            name, samples = await one_client(make, port, scale)
            results.setdefault(name, []).append(samples)
            print(f"round {round_no + 1} {name}: " + ", ".join(
                f"{w} {s.cpu_us:.1f} us" for w, s in samples.items()), file=sys.stderr)
    print_table(results)


def print_table(results: dict[str, list[dict[str, Sample]]]) -> None:
    base = "resp (hiredis, ours)"

    def median(name: str, workload: str, attr: str) -> float:
        return statistics.median(getattr(r[workload], attr) for r in results[name])

    print("\nclient-side CPU per call, µs (median of rounds; x = relative to resp)")
    print("| client | " + " | ".join(WORKLOADS) + " |")
    print("| --- |" + " --- |" * len(WORKLOADS))
    for name in results:
        cells = []
        for workload in WORKLOADS:
            cpu = median(name, workload, "cpu_us")
            ratio = cpu / median(base, workload, "cpu_us") if base in results else 1.0
            cells.append(f"{cpu:.1f} ({ratio:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\ncalls (messages) per second, wall time (median of rounds)")
    print("| client | " + " | ".join(WORKLOADS) + " |")
    print("| --- |" + " --- |" * len(WORKLOADS))
    for name in results:
        cells = [f"{median(name, w, 'per_s'):,.0f}" for w in WORKLOADS]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every call count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-redis-clients-") as tmp:
        redis, port = start_redis(Path(tmp))
        try:
            pin_self(SERVER_CORE)
            uvloop.run(main_async(port, args.rounds, args.scale))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
