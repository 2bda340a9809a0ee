"""What counting connections across brokers costs Redis: the capacity model's inputs.

    .venv/bin/python -m bench.limits [--stores 200] [--terminals 20] [--brokers 2]

One redis-server of our own (free port, no persistence); `--brokers` RedisBackend instances
in this process (not started: only their counting is exercised). Every terminal of every
store says hello once on each broker in turn (Presence.count_connection) and goodbye
(uncount_connection); between them each broker refreshes its counts ten times (the
heartbeat's part: one ZADD per store it holds, pipelined). Prints the redis-server CPU per
call of each, from its /proc CPU time before and after, and the broker's own CPU per call
(time.process_time).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tablelock.backends.redis import RedisBackend
from tablelock.model import Terminal

from .procs import Child, start_redis

REFRESHES = 10


async def measured(redis: Child, calls: int, work: Callable[[], Awaitable[None]],
                   ) -> tuple[float, float]:
    """(redis-server µs per call, this process's µs per call) of `work`."""
    redis_before, own_before = redis.cpu_s(), time.process_time()
    await work()
    await asyncio.sleep(0.2)  # let redis-server's CPU time reach /proc
    return ((redis.cpu_s() - redis_before) / calls * 1e6,
            (time.process_time() - own_before) / calls * 1e6)


async def run(port: int, redis: Child, stores: int, terminals: int, brokers: int) -> None:
    backends = [RedisBackend(f"redis://127.0.0.1:{port}") for _ in range(brokers)]
    everyone = [Terminal(f"t{n}", "erp_secondary", f"t{n}", f"store-{s}")
                for s in range(stores) for n in range(terminals)]
    calls = len(everyone) * brokers

    async def hellos() -> None:
        for backend in backends:
            for chunk in range(0, len(everyone), 100):
                await asyncio.gather(*(backend.count_connection(t)
                                       for t in everyone[chunk:chunk + 100]))

    async def refresh() -> None:
        for _ in range(REFRESHES):
            for backend in backends:
                await backend._refresh_counts(int(time.time() * 1000))

    async def goodbyes() -> None:
        for backend in backends:
            for chunk in range(0, len(everyone), 100):
                await asyncio.gather(*(backend.uncount_connection(t)
                                       for t in everyone[chunk:chunk + 100]))

    hello_redis, hello_own = await measured(redis, calls, hellos)
    for backend in backends:  # a broker's entries lapsed while the others said hello
        await backend._refresh_counts(int(time.time() * 1000))
    refresh_redis, refresh_own = await measured(redis, stores * brokers * REFRESHES, refresh)
    bye_redis, bye_own = await measured(redis, calls, goodbyes)
    print(f"{stores} stores x {terminals} terminals, each on {brokers} brokers")
    print(f"count_connection (hello):  redis {hello_redis:.1f} µs, broker {hello_own:.1f} µs")
    print(f"uncount_connection (bye):  redis {bye_redis:.1f} µs, broker {bye_own:.1f} µs")
    print(f"refresh per store held, per heartbeat: redis {refresh_redis:.2f} µs, "
          f"broker {refresh_own:.2f} µs")
    for backend in backends:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", type=int, default=200)
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--brokers", type=int, default=2)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis, port = start_redis(Path(tmp))
        try:
            asyncio.run(run(port, redis, opts.stores, opts.terminals, opts.brokers))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
