"""What `TABLELOCK_REDIS_WAIT_REPLICAS=1` costs: lock pairs/s with and without WAIT.

    python -m bench.redis_wait [--seconds 10] [--actors 50] [--rounds 3]

One broker on a Redis master that has one replica (both our own, on free ports, without
persistence). Actors are `erp_secondary` connections, each driving its own order in a closed
loop: `lock.acquire` (payment) → reply → `lock.release` with the token → reply. The same
run is made without and with WAIT, alternately, `--rounds` times (a fresh broker each), and
the best of each is kept, since other load only ever slows a run down. Each run prints
pairs/s, the acquire latency (p50, p99) and how many WAITs the master ran. With WAIT the
acquire is answered only once the replica confirmed the grant; the release is not waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import websockets

from tablelock.auth import Tokens

from .procs import SERVER_CORE, Child, free_port, python, start_redis, tcp_ready

SECRET = "bench-redis-wait-secret-0123456789abcdef"


def waits_run(master_port: int) -> int:
    """How many WAIT commands the master has run (INFO commandstats)."""
    info = subprocess.run(["redis-cli", "-p", str(master_port), "info", "commandstats"],
                          capture_output=True, text=True, timeout=5).stdout
    for line in info.splitlines():
        if line.startswith("cmdstat_wait:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def replicate(replica_port: int, master_port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(replica_port), "replicaof", "127.0.0.1",
                    str(master_port)], check=True, stdout=subprocess.DEVNULL, timeout=5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = subprocess.run(["redis-cli", "-p", str(replica_port), "info", "replication"],
                              capture_output=True, text=True, timeout=5).stdout
        if "master_link_status:up" in info:
            return
        time.sleep(0.05)
    raise RuntimeError("the replica did not catch up")


async def actor(url: str, token: str, store: str, order_id: str, until: float,
                latencies: list[float]) -> int:
    pairs = 0
    async with websockets.connect(url, subprotocols=["tablelock.v1"],  # type: ignore[list-item]
                                  compression=None) as ws:
        async def call(request_id: int, **frame: object) -> dict[str, object]:
            await ws.send(json.dumps({"id": request_id, **frame}))
            while True:
                reply: dict[str, object] = json.loads(await ws.recv())
                if reply.get("id") == request_id:
                    return reply
        await call(0, type="hello", token=token, protocol=1)
        order = {"order_id": order_id, "table_id": "t1", "version": 1, "amount_cents": 1000,
                 "status": "open", "items": [{"sku": "rice", "qty": 1}]}
        assert (await call(1, type="order.publish", order=order, change="modify"))["ok"]
        request_id = 2
        while time.monotonic() < until:
            started = time.perf_counter()
            held = await call(request_id, type="lock.acquire", order_id=order_id, kind="payment")
            latencies.append(time.perf_counter() - started)
            assert held["ok"], held
            lock = held["lock"]
            assert isinstance(lock, dict)
            released = await call(request_id + 1, type="lock.release", order_id=order_id,
                                  kind="payment", token=lock["token"])
            assert released["ok"], released
            request_id += 2
            pairs += 1
    return pairs


async def measure(url: str, actors: int, seconds: float) -> dict[str, float]:
    tokens = Tokens([SECRET])
    store = f"wait{time.monotonic_ns()}"
    latencies: list[float] = []
    until = time.monotonic() + seconds
    counts = await asyncio.gather(*(
        actor(url, tokens.mint(store=store, role="erp_secondary", sub=f"a{n}"), store,
              f"o{n}", until, latencies) for n in range(actors)))
    cuts = statistics.quantiles(latencies, n=100)
    return {"pairs_per_s": round(sum(counts) / seconds, 1),
            "acquire_p50_ms": round(cuts[49] * 1000, 2),
            "acquire_p99_ms": round(cuts[98] * 1000, 2)}


def run(wait_replicas: int, master_port: int, workdir: Path, actors: int,
        seconds: float) -> dict[str, float]:
    port = free_port()
    broker = Child("broker", [python(), "-m", "tablelock", "serve", "--port", str(port),
                              "--backend", f"redis://127.0.0.1:{master_port}"], SERVER_CORE,
                   env={"TABLELOCK_SECRET": SECRET, "TABLELOCK_LOG_LEVEL": "WARNING",
                        "TABLELOCK_RATE_PER_S": "100000", "TABLELOCK_RATE_BURST": "100000",
                        "TABLELOCK_REDIS_WAIT_REPLICAS": str(wait_replicas),
                        "TABLELOCK_REDIS_WAIT_TIMEOUT_MS": "1000"},
                   log=workdir / f"broker-wait{wait_replicas}.log")
    try:
        broker.wait_ready(tcp_ready(port))
        waits = waits_run(master_port)
        figures = asyncio.run(measure(f"ws://127.0.0.1:{port}/ws", actors, seconds))
        return {**figures, "waits": waits_run(master_port) - waits}
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--actors", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tl-wait-") as tmp:
        workdir = Path(tmp)
        master, master_port = start_redis(workdir / "master")
        replica, replica_port = start_redis(workdir / "replica")
        try:
            replicate(replica_port, master_port)
            best: dict[int, dict[str, float]] = {}
            for _ in range(args.rounds):
                for wait_replicas in (0, 1):
                    figures = run(wait_replicas, master_port, workdir, args.actors,
                                  args.seconds)
                    print(json.dumps({"wait_replicas": wait_replicas, **figures}), flush=True)
                    kept = best.get(wait_replicas)
                    if kept is None or figures["pairs_per_s"] > kept["pairs_per_s"]:
                        best[wait_replicas] = figures
            for wait_replicas, figures in sorted(best.items()):
                print(json.dumps({"best_of": args.rounds, "wait_replicas": wait_replicas,
                                  "actors": args.actors, "seconds": args.seconds, **figures}),
                      flush=True)
        finally:
            replica.stop()
            master.stop()


if __name__ == "__main__":
    main()
