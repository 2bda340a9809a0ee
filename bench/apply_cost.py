"""In-process cost of one acquire+release pair through the memory backend, no sockets.

    python -m bench.apply_cost [--rounds N] [--pairs N]

Steps 100 orders of 50 stores through `MemoryBackend` with a sink that drops the frames, two
ways in alternating blocks: awaiting `apply` (what the gateway does) and calling `apply_now`
(a synchronous path would). Prints the best block of each in µs per pair: their difference is
what a synchronous path through the backend could save; the figure itself is the backend's
and the rules' Python cost per pair without the socket, the hub or the cache misses of a
loaded broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from tablelock.backends.memory import MemoryBackend
from tablelock.model import Order, Terminal
from tablelock.rules import Acquire, Acquired, Ingest, Release

from .sink import DropSink


async def measure(rounds: int, pairs: int) -> dict[str, float]:
    backend = MemoryBackend()
    await backend.start(DropSink())
    tills = [Terminal(f"till{i}", "erp_secondary", "till", f"s{i % 50}") for i in range(100)]
    for i, till in enumerate(tills):
        await backend.apply(till.store_id, f"o{i}", Ingest(Order(f"o{i}", f"t{i}", 1, 100)), None)

    async def awaited(n: int) -> None:
        for k in range(n):
            till = tills[k % 100]
            out = await backend.apply(till.store_id, f"o{k % 100}", Acquire("order"), till)
            assert isinstance(out.result, Acquired) and out.result.lock is not None
            await backend.apply(till.store_id, f"o{k % 100}",
                                Release("order", out.result.lock.token), till)

    async def called(n: int) -> None:
        for k in range(n):
            till = tills[k % 100]
            out = backend.apply_now(till.store_id, f"o{k % 100}", Acquire("order"), till)
            assert isinstance(out.result, Acquired) and out.result.lock is not None
            backend.apply_now(till.store_id, f"o{k % 100}",
                              Release("order", out.result.lock.token), till)

    best = {"await apply": float("inf"), "call apply_now": float("inf")}
    ways = list(zip(best, (awaited, called), strict=True))
    for turn in range(rounds):
        for name, way in ways if turn % 2 else ways[::-1]:
            started = time.perf_counter()
            await way(pairs)
            best[name] = min(best[name], (time.perf_counter() - started) / pairs * 1e6)
    await backend.close()
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.apply_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=10_000)
    args = parser.parse_args(argv)
    best = asyncio.run(measure(args.rounds, args.pairs))
    print(json.dumps({f"{name} µs/pair (best block)": round(us, 2) for name, us in best.items()},
                     ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
