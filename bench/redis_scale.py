"""The `store` workload on Redis with 1, 2 and 3 broker processes, against memory, alternating.

One layout is one `Session` (bench/session.py): memory x1, then Redis x1, x2 and x3 with the
connections round-robin over the brokers and with each store's on one broker (store-affine),
and `redis-2-listener`: everything on the first broker but one ERP screen per store on the
second, whose CPU is then what receiving every event costs a broker.
Every round runs each layout once (a closed loop of `--seconds`), the order reversed every
other round: on a shared machine the ratios between layouts in the same round are what count.
Per layout and round it records pairs/s, the summed server CPU per pair over every broker,
redis-server's CPU per pair, the Redis commands per pair (INFO commandstats: the calls the
brokers sent, and every command Redis ran, the scripts' own calls included) and the pub/sub
messages each broker received per pair (its `tablelock_redis_events_total{kind="pubsub_message"}`).

    .venv/bin/python -m bench.redis_scale --rounds 3 --seconds 5
    .venv/bin/python -m bench.redis_scale --src /tmp/before --layouts redis-1   # older code
    .venv/bin/python -m bench.redis_scale --profile /tmp/p --layouts redis-1,redis-3-rr
    .venv/bin/python -m bench.redis_scale --layouts redis-2-listener --profile /tmp/p \\
        --profile-broker -1                                  # what receiving costs
    .venv/bin/python -m bench.redis_scale --rate 600 --idle 3 \\
        --layouts redis-1,redis-2-rr,redis-3-rr,redis-1@300,redis-1@200   # fixed rate

`--src DIR` runs the brokers from DIR/server (a checkout of another revision), `--profile F`
records the first broker (`--profile-broker K`: the K-th, -1 the last) of each layout's
first-round run with py-spy (raw format) into F.LAYOUT.raw. `--rate R` runs open loops of
R pairs/s in all instead of closed loops, and `LAYOUT@R` one layout at its own rate: one
broker at 1/N of the load against N brokers at the whole of it tells a cost of N from a cost
of the load per process. `--idle S` first measures the brokers' CPU with every connection
open and no load (their fixed cost). Every row also carries the brokers' user and system CPU
per pair (summed, and each broker's) and their context switches per pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tablelock.backends.resp import RespConnection

from .scenarios import Options, store_workload
from .session import Session
from .targets import TABLELOCK

LAYOUTS = {  # name: (redis, brokers, affinity)
    "memory": (False, 1, "round-robin"),
    "redis-1": (True, 1, "round-robin"),
    "redis-2-rr": (True, 2, "round-robin"),
    "redis-3-rr": (True, 3, "round-robin"),
    "redis-2-affine": (True, 2, "store"),
    "redis-3-affine": (True, 3, "store"),
    # everything on the first broker but one ERP screen per store on the second: the second's
    # CPU per pair is what one more round-robin broker adds (receiving every event)
    "redis-2-listener": (True, 2, "listener"),
}
# A script's own calls are not the broker's round trips.
_SCRIPT_CALLS = ("evalsha", "eval", "script")
_RECEIVED = re.compile(r'^tablelock_redis_events_total\{kind="pubsub_message"\} (\S+)$', re.M)


async def _commandstats(port: int) -> dict[str, int]:
    conn = await RespConnection.open("127.0.0.1", port)
    try:
        raw: bytes = await conn.execute("INFO", "commandstats")
    finally:
        conn.close()
    calls = {}
    for line in raw.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[8:].partition(":")
            calls[name] = int(fields.split(",")[0].split("=")[1])
    return calls


def commandstats(port: int) -> dict[str, int]:
    return asyncio.run(_commandstats(port))


def received(url: str) -> float:
    """Pub/sub messages a broker received so far (0 for a memory broker)."""
    http = url.replace("ws://", "http://") + "/metrics"
    with urllib.request.urlopen(http, timeout=5) as response:
        found = _RECEIVED.search(response.read().decode())
    return float(found.group(1)) if found else 0.0


def ctxt_switches(pids: list[int]) -> tuple[int, int]:
    """Voluntary and involuntary context switches so far, summed over `pids`."""
    vol = invol = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol


def idle_cpu_ms_per_s(session: Session, seconds: float) -> float:
    """The brokers' summed CPU with no load at all (every connection open, nothing asked):
    their fixed cost (sweeper, heartbeat, count refresh), in ms per second."""
    cpu0 = session.servers.cpu_s()
    time.sleep(seconds)
    return round((session.servers.cpu_s() - cpu0) / seconds * 1000, 2)


def redis_port(session: Session) -> int | None:
    if session.servers.redis is None:
        return None
    cmd = session.servers.redis.proc.args
    return int(cmd[cmd.index("--port") + 1])


def measure(layout: str, opts: Options, seconds: float, profile: Path | None,
            rate: float | None = None, idle_s: float = 0.0,
            profile_broker: int = 0) -> dict[str, Any]:
    """One layout: a closed loop, or an open loop of `rate` pairs/s in all when given."""
    use_redis, brokers, affinity = LAYOUTS[layout]
    workload = store_workload(opts)
    workload.affinity = affinity
    with tempfile.TemporaryDirectory(prefix="tablelock-scale-") as tmp:
        session = Session("redis", TABLELOCK, [workload], opts.secret, Path(tmp), use_redis,
                          brokers)
        try:
            port = redis_port(session)
            idle = idle_cpu_ms_per_s(session, idle_s) if idle_s else None
            pids = [b.pid for b in session.servers.brokers]
            switches0 = ctxt_switches(pids)
            stats0 = commandstats(port) if port else {}
            heard0 = [received(url) for url in session.servers.urls]
            cpu0 = [b.cpu_s() for b in session.servers.brokers]
            spy = None
            if profile is not None:
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                     "--format", "raw", "-d", str(int(seconds)), "-o", str(profile), "--pid",
                     str(session.servers.brokers[profile_broker].pid)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
            redis0 = session.servers.redis_cpu_s()
            if rate is None:
                row = session.measure({"cmd": "closed", "seconds": seconds}, "closed loop")
            else:
                row = session.measure({"cmd": "open", "rate": rate, "seconds": seconds},
                                      "open loop")
            redis_cpu = session.servers.redis_cpu_s() - redis0
            switches = [b - a for a, b in zip(switches0, ctxt_switches(pids), strict=True)]
            cpu = [b.cpu_s() - c0 for b, c0 in zip(session.servers.brokers, cpu0, strict=True)]
            if spy is not None:
                spy.wait(timeout=60)
            stats1 = commandstats(port) if port else {}
            heard = [received(url) - h0
                     for url, h0 in zip(session.servers.urls, heard0, strict=True)]
        finally:
            session.close()
    pairs = row["pairs"]
    delta = {name: stats1.get(name, 0) - stats0.get(name, 0) for name in stats1}
    sent = sum(n for name, n in delta.items() if name not in ("info",))
    return {
        "layout": layout, "rate": rate, "pairs_per_s": row["pairs_per_s"],
        "server_cpu_us_per_pair": row["server_cpu_us_per_pair"],
        "server_user_us_per_pair": row["server_user_us_per_pair"],
        "server_sys_us_per_pair": row["server_sys_us_per_pair"],
        "idle_cpu_ms_per_s": idle,
        "broker_cpu_us_per_pair": [round(c / pairs * 1e6, 1) for c in cpu] if pairs else [],
        "ctxt_switches_per_pair": [round(n / pairs, 2) for n in switches] if pairs else [],
        "missed": row["open_loop_missed"],
        "redis_cpu_us_per_pair": round(redis_cpu / pairs * 1e6, 1) if use_redis and pairs
        else None,
        "redis_calls_per_pair": round(sent / pairs, 2) if pairs and use_redis else None,
        "redis_commands_per_pair": {k: round(v / pairs, 2) for k, v in sorted(delta.items())
                                    if v and k != "info"} if pairs else {},
        "messages_per_broker_per_pair": [round(h / pairs, 2) for h in heard] if pairs else [],
        "errors": row["error_count"], "error_kinds": row["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="comma-separated; LAYOUT@R runs that one at R pairs/s")
    parser.add_argument("--rate", type=float, help="open loop: this many pairs/s in all")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="first measure the brokers' CPU for this many idle seconds")
    parser.add_argument("--src", type=Path, help="run the brokers from DIR/server")
    parser.add_argument("--profile", type=Path,
                        help="py-spy raw profile of each layout's first run into F.LAYOUT.raw")
    parser.add_argument("--profile-broker", type=int, default=0,
                        help="which broker --profile records (-1: the last)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    args = parser.parse_args()
    if args.src is not None:  # the brokers (children) import tablelock from there
        os.environ["PYTHONPATH"] = str(args.src.resolve() / "server")
    opts = Options()
    layouts = args.layouts.split(",")
    rows: list[dict[str, Any]] = []
    for n in range(args.rounds):
        for spec in layouts if n % 2 == 0 else layouts[::-1]:
            layout, _, at = spec.partition("@")
            rate = float(at) if at else args.rate
            profile = args.profile.with_suffix(f".{layout}.raw") if (
                args.profile is not None and n == 0) else None
            row = measure(layout, opts, args.seconds, profile, rate, args.idle,
                          args.profile_broker)
            row["layout"], row["round"] = spec, n
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'layout':16} {'pairs/s':>8} {'x memory':>9} {'cpu µs/pair':>12} "
          f"{'user/sys':>9} {'x redis-1':>18} {'redis µs/pair':>14} {'calls/pair':>11} "
          f"{'ctxsw/pair':>10} {'idle ms/s':>9} {'per broker µs/pair':>20} msgs/broker/pair")
    base = next((spec for spec in layouts if spec.startswith("redis-1")), "redis-1")
    for layout in layouts:
        mine = [r for r in rows if r["layout"] == layout]
        print(f"{layout:16} {_med(mine, 'pairs_per_s'):>8.0f} "
              f"{_ratio(rows, mine, 'memory', 'pairs_per_s'):>9} "
              f"{_med(mine, 'server_cpu_us_per_pair'):>12.0f} "
              f"{_med(mine, 'server_user_us_per_pair'):>4.0f}/"
              f"{_med(mine, 'server_sys_us_per_pair'):<4.0f} "
              f"{_ratio(rows, mine, base, 'server_cpu_us_per_pair'):>18} "
              f"{_med(mine, 'redis_cpu_us_per_pair'):>14.0f} "
              f"{_med(mine, 'redis_calls_per_pair'):>11.2f} "
              f"{statistics.median(sum(r['ctxt_switches_per_pair']) for r in mine):>10.2f} "
              f"{_med(mine, 'idle_cpu_ms_per_s'):>9.1f} "
              f"{_per_broker(mine)!s:>20} "
              f"{[max(r['messages_per_broker_per_pair'], default=0) for r in mine]}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


def _med(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _per_broker(rows: list[dict[str, Any]]) -> list[float]:
    """Each broker's median CPU µs per pair over the rows."""
    columns = zip(*(r["broker_cpu_us_per_pair"] for r in rows), strict=True)
    return [round(statistics.median(column)) for column in columns]


def _ratio(rows: list[dict[str, Any]], mine: list[dict[str, Any]], base: str, key: str) -> str:
    """The median of the per-round ratios to `base`, and their range."""
    ratios = []
    for row in mine:
        other = [r for r in rows if r["layout"] == base and r["round"] == row["round"]]
        if other and other[0].get(key) and row.get(key):
            ratios.append(row[key] / other[0][key])
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    main()
