"""Pub/sub messages each broker receives per lock pair, with connections spread over brokers.

In one process: N Redis backends (one per broker) on our own `redis-server`, each with a
sink that only counts; the store workload's subscriptions (E ERP terminals per store on
the store channel, H phones per order on its order channel) spread round-robin over the
brokers or all of a store's on one broker (store-affine); then P lock pairs (acquire,
release) driven through the brokers in turn. Prints, per layout, the messages each broker
received per pair (the most and the mean) and the process CPU per pair.

    .venv/bin/python -m bench.interest --brokers 2 --pairs 2000
    .venv/bin/python -m bench.interest --brokers 3 --erp 0   # phones only: interest shows

It counts by wrapping the backend's `_on_message`, so the same script measures the code
before interest by channel (run it with PYTHONPATH pointing at an older tree's `server`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tablelock.backends.redis import RedisBackend
from tablelock.model import Order, Terminal
from tablelock.protocol import order_channel, store_channel
from tablelock.rules import Acquire, Ingest, Release

from .sink import DropSink


def counted(backend: RedisBackend) -> list[int]:
    """Count every pub/sub message the backend receives: its `_on_pubsub` (the handler given
    to each subscription, so wrap it before `start`), or in code before it, `_on_message`."""
    count = [0]
    if hasattr(backend, "_on_pubsub"):
        handler = backend._on_pubsub

        def on_pubsub(channel: bytes, data: bytes) -> None:
            count[0] += 1
            handler(channel, data)

        backend._on_pubsub = on_pubsub  # type: ignore[method-assign]
        return count
    original = backend._on_message

    async def on_message(name: str, data: bytes) -> None:
        count[0] += 1
        await original(name, data)

    backend._on_message = on_message  # type: ignore[method-assign]
    return count


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="interest-redis-")
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server",
                             "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def run(url: str, brokers: int, affinity: str, stores: int, orders: int, erp: int,
              h5: int, pairs: int) -> dict[str, Any]:
    tag = time.monotonic_ns()
    prefix = f"i{tag}:"
    backends = [RedisBackend(url, prefix=prefix) for _ in range(brokers)]
    sinks = [DropSink(follows=set()) for _ in backends]
    counts = [counted(b) for b in backends]
    for backend, sink in zip(backends, sinks, strict=True):
        await backend.start(sink)  # type: ignore[arg-type]
    spread = itertools.cycle(range(brokers))
    try:
        for s in range(stores):
            store = f"st{tag}x{s}"
            home = s % brokers

            def place(home: int = home) -> int:
                return home if affinity == "store" else next(spread)

            for e in range(erp):
                n = place()
                await backends[n].terminal_up(Terminal(f"erp{e}", "erp_secondary", "erp", store))
                sinks[n].follows.add(store_channel(store))
                await backends[n].snapshot(store_channel(store))
            for o in range(orders):
                await backends[0].apply(store, f"o{o}", Ingest(Order(f"o{o}", f"t{o}", 1, 100)),
                                        None)
                for p in range(h5):
                    n = place()
                    channel = order_channel(store, f"o{o}")
                    await backends[n].terminal_up(Terminal(f"p{o}.{p}", "h5", "phone", store,
                                                           f"t{o}"))
                    sinks[n].follows.add(channel)
                    await backends[n].snapshot(channel)
        await asyncio.sleep(0.3)  # what set-up published has arrived
        before = [c[0] for c in counts]
        cpu0 = time.process_time()
        actor = itertools.count()
        for k in range(pairs):
            s, o = k % stores, (k // stores) % orders
            store = f"st{tag}x{s}"
            home = s % brokers
            n = home if affinity == "store" else k % brokers
            till = Terminal(f"a{next(actor) % 4}", "erp_secondary", "till", store)
            out = await backends[n].apply(store, f"o{o}", Acquire("payment"), till)
            lock = out.events[0].lock if out.events else None
            if lock is not None:
                await backends[n].apply(store, f"o{o}", Release("payment", lock.token), till)
        await asyncio.sleep(0.3)
        cpu = time.process_time() - cpu0
        per_broker = [(c[0] - b) / pairs for c, b in zip(counts, before, strict=True)]
        return {"brokers": brokers, "affinity": affinity,
                "max_msgs_per_pair": round(max(per_broker), 2),
                "mean_msgs_per_pair": round(sum(per_broker) / brokers, 2),
                "cpu_us_per_pair": round(cpu / pairs * 1e6)}
    finally:
        for backend in backends:
            await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--stores", type=int, default=10)
    parser.add_argument("--erp", type=int, default=3,
                        help="ERP terminals per store on its store channel (0: phones only)")
    args = parser.parse_args()
    with redis_server() as url:
        for brokers, affinity in ((1, "round-robin"), (args.brokers, "round-robin"),
                                  (args.brokers, "store")):
            row = asyncio.run(run(url, brokers, affinity, args.stores, 10, args.erp, 2,
                                  args.pairs))
            print(row, flush=True)


if __name__ == "__main__":
    main()
