"""Python heap per idle connection, by tracemalloc, for two brokers one after the other.

    python -m bench.connmem --a-src DIR [--a-python PY] [--connections N]

Each broker (A: the code in DIR, a checkout of the revision to compare; B: this checkout's)
runs with tracemalloc on; bench's load generator opens N authenticated h5 connections, each
subscribed to an order channel, and the broker reports its traced heap before and after.
Prints KiB per connection for each, and B - A.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .procs import LOADGEN_CORE, SERVER_CORE, Child, free_port, pin_self, python
from .scenarios import Options
from .session import Generators
from .workload import Workload

HERE = Path(__file__).resolve().parent.parent

# Run in the broker process: the broker, plus a job that reports the traced heap (after a
# full collection) for each line read on stdin.
_SERVE = """
import asyncio, gc, sys, tracemalloc
tracemalloc.start()
from tablelock.cli import run_broker
from tablelock.settings import Settings

async def report():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        gc.collect()
        print("heap", tracemalloc.get_traced_memory()[0], flush=True)

settings = Settings.from_env(port=int(sys.argv[1]))
run_broker(settings, lambda base: print("up", base, flush=True), [report])
"""


def heap(child: Child) -> int:
    assert child.proc.stdin is not None and child.proc.stdout is not None
    child.proc.stdin.write("\n")
    child.proc.stdin.flush()
    while True:
        line = child.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{child.name} exited{child.log_tail()}")
        if line.startswith("heap "):
            return int(line.split()[1])


def measure(name: str, src: Path, interpreter: str, connections: int, secret: str,
            log: Path) -> float:
    port = free_port()
    child = Child(name, [interpreter, "-c", _SERVE, str(port)], SERVER_CORE,
                  env={"TABLELOCK_SECRET": secret, "PYTHONPATH": str(src / "server")},
                  stdin=True, stdout=True, log=log)
    gens: Generators | None = None
    try:
        assert child.proc.stdout is not None
        while not child.proc.stdout.readline().startswith("up "):
            if not child.alive():
                raise RuntimeError(f"{name} exited{child.log_tail()}")
        # a few connections first, so that what every connection shares is counted before
        warm = Workload(urls=[f"ws://127.0.0.1:{port}"], secret=secret, idle=20)
        gens = Generators([warm])
        gens.collect(timeout=120)
        before = heap(child)
        load = Workload(urls=[f"ws://127.0.0.1:{port}"], secret=secret, idle=connections,
                        idle_first=20)
        more = Generators([load])
        ready = more.collect(timeout=600)[0]
        after = heap(child)
        more.stop()
        per = (after - before) / 1024 / ready["connections"]
        print(json.dumps({"broker": name, "connections": ready["connections"],
                          "heap_before_kib": before // 1024, "heap_after_kib": after // 1024,
                          "kib_per_connection": round(per, 2)}), flush=True)
        return per
    finally:
        if gens is not None:
            gens.stop()
        child.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.connmem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-src", type=Path, required=True)
    parser.add_argument("--a-python")
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args(argv)
    pin_self(LOADGEN_CORE)
    a_python = args.a_python or (str(args.a_src / ".venv/bin/python")
                                 if (args.a_src / ".venv/bin/python").exists() else python())
    secret = Options().secret
    with tempfile.TemporaryDirectory(prefix="tablelock-connmem-") as tmp:
        a = measure("A", args.a_src, a_python, args.connections, secret, Path(tmp) / "a.log")
        b = measure("B", HERE, python(), args.connections, secret, Path(tmp) / "b.log")
    print(json.dumps({"A_kib": round(a, 2), "B_kib": round(b, 2), "B-A": round(b - a, 2)}))


if __name__ == "__main__":
    main()
