"""What the data file (`serve --data PATH`) costs per lock pair, in one run, side by side.

    .venv/bin/python -m bench.durable [--seconds 3] [--dir /var/lib/tablelock]

In one process, on uvloop as the broker runs: the memory backend alone, then with a WAL
SQLite file at `synchronous=FULL` (what `--data` uses: a commit survives a power cut) and at
`NORMAL` (a commit survives a crash of the process, not of the machine). Each runs payment
lock pairs (acquire, then release with the token, each awaited as a request is) on distinct
orders, from 1 actor and from 64 at once: with many actors, one fsync carries the writes of
all that queued during the last one (group commit). No sockets: this is the backend's share.
`--dir` must be on the disk the broker would use (a tmpfs measures nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import uvloop

from tablelock.backends.durable import Journal, Synchronous
from tablelock.backends.memory import MemoryBackend
from tablelock.model import Order, Terminal
from tablelock.rules import Acquire, Ingest, Release

from .sink import DropSink

STORE = "bench"


async def run(synchronous: Synchronous | None, directory: Path, actors: int,
              seconds: float) -> tuple[int, float]:
    """(pairs, elapsed s) of `actors` closed-loop actors for about `seconds`."""
    journal = None
    if synchronous is not None:
        path = directory / f"bench-{synchronous.lower()}-{actors}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        journal = Journal(str(path), synchronous)
    backend = MemoryBackend(journal=journal)
    await backend.start(DropSink(follows=set()))
    for n in range(actors):
        await backend.apply(STORE, f"o{n}", Ingest(Order(f"o{n}", f"t{n}", 1, 1000)), None)
    deadline = time.perf_counter() + seconds
    done = [0] * actors

    async def actor(n: int) -> None:
        till = Terminal(f"till-{n}", "erp_secondary", "till", STORE)
        order_id = f"o{n}"
        while time.perf_counter() < deadline:
            out = await backend.apply(STORE, order_id, Acquire("payment"), till)
            assert out.record is not None and out.refusal is None
            token = out.record.locks["payment"].token
            out = await backend.apply(STORE, order_id, Release("payment", token), till)
            assert out.refusal is None
            done[n] += 1

    started = time.perf_counter()
    await asyncio.gather(*(actor(n) for n in range(actors)))
    elapsed = time.perf_counter() - started
    await backend.close()
    return sum(done), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--dir", type=Path, help="where the data files go (default: a temp "
                        "dir under the current directory, on its disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd()) as tmp:
        print(f"data files in {tmp} ({os.cpu_count()} cores), {args.seconds:g} s a run")
        print(f"{'backend':<22}{'actors':>7}{'pairs/s':>10}{'µs/pair':>10}")
        for actors in (1, 64):
            for label, synchronous in (("memory", None), ("memory + data FULL", "FULL"),
                                       ("memory + data NORMAL", "NORMAL")):
                pairs, elapsed = uvloop.run(run(synchronous, Path(tmp),  # type: ignore[arg-type]
                                                actors, args.seconds))
                print(f"{label:<22}{actors:>7}{pairs / elapsed:>10,.0f}"
                      f"{elapsed / pairs * 1e6:>10,.1f}", flush=True)


if __name__ == "__main__":
    main()
