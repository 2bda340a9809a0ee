"""The `/ws` request path's CPU per lock pair, this code against another, side by side.

    git archive <commit> server | tar -x -C /tmp/other
    .venv/bin/python -m bench.ws_path --against /tmp/other/server [--pairs 20000] [--rounds 8]

One ERP connection drives `lock.acquire` + `lock.release` pairs on one order through
`Gateway.__call__` over an in-process ASGI socket (memory backend, no network, rate limit
off): what the gateway, the conversation, the backend and the hub cost per request, without
the kernel's or the load generator's share. Each round runs both codes in fresh processes
(the tree under `--against` first on PYTHONPATH), which goes first alternating, and prints
CPU µs per pair; the last line is the median of the per-round ratios (other / this).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECRET = "ws-path-bench-secret-0123456789abcdef01"
SERVER = Path(__file__).resolve().parent.parent / "server"


async def measure(pairs: int, warm_up: int) -> float:
    """CPU µs per acquire + release pair (replies awaited one by one)."""
    from tablelock.app import make_backend
    from tablelock.auth import Tokens
    from tablelock.gateway import Gateway
    from tablelock.hub import Hub
    from tablelock.relay import Relay
    from tablelock.settings import Settings

    settings = Settings(secrets=[SECRET], rate_per_s=1e9, rate_burst=1e9)
    backend = make_backend(settings)
    hub = Hub(settings.max_queue_messages, settings.max_queue_bytes, settings.rate_per_s,
              settings.rate_burst)
    await backend.start(hub)
    tokens = Tokens([SECRET])
    gateway = Gateway(backend, hub, Relay(hub, backend), tokens, settings)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: asyncio.Queue[str] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            replies.put_nowait(message["text"])

    def say(**frame: Any) -> None:
        inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(frame)})

    inbox.put_nowait({"type": "websocket.connect"})
    served = asyncio.create_task(gateway({"type": "websocket", "headers": []}, receive, send))
    say(type="hello", id=0, protocol=1, token=tokens.mint(store="s1", role="erp_main", sub="e1"))
    say(type="order.publish", id=1, change="modify",
        order={"order_id": "o1", "table_id": "t1", "version": 1, "amount_cents": 100})
    for _ in range(2):
        if not json.loads(await replies.get())["ok"]:
            raise SystemExit("hello or publish refused")

    async def run(count: int) -> None:
        for n in range(count):
            say(type="lock.acquire", id=n, order_id="o1", kind="order")
            reply = json.loads(await replies.get())
            say(type="lock.release", id=n, order_id="o1", kind="order",
                token=reply["lock"]["token"])
            await replies.get()

    await run(warm_up)
    started = time.process_time()
    await run(pairs)
    cpu = time.process_time() - started
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await served
    await backend.close()
    return cpu / pairs * 1e6


def child(server: Path, pairs: int, warm_up: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(server), "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, "-m", "bench.ws_path", "--child", str(pairs),
                          str(warm_up)], env=env, cwd=SERVER.parent, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--against", type=Path, help="another code's server/ folder")
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--warm-up", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(asyncio.run(measure(*args.child)))
        return
    ratios = []
    for n in range(args.rounds):
        other = None
        if args.against is not None and n % 2:  # which runs first alternates too
            other = child(args.against, args.pairs, args.warm_up)
        this = child(SERVER, args.pairs, args.warm_up)
        line = f"round {n + 1}: this {this:.1f} µs/pair"
        if args.against is not None:
            if other is None:
                other = child(args.against, args.pairs, args.warm_up)
            ratios.append(other / this)
            line += f", other {other:.1f} µs/pair, other/this {other / this:.3f}"
        print(line, flush=True)
    if ratios:
        print(f"median other/this: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
