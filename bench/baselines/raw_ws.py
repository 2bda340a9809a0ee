"""The limit: the minimal broker on the raw `websockets` asyncio server, under uvloop.

    python -m bench.baselines.raw_ws --port P --secret S
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from .core import MiniBroker

decode, encode = msgspec.json.decode, msgspec.json.Encoder().encode


async def session(broker: MiniBroker, ws: ServerConnection) -> None:
    who: dict[str, Any] | None = None
    channels: list[str] = []
    try:
        async for frame in ws:
            msg = decode(frame)
            if who is None:
                who = broker.hello(msg.get("token")) if msg.get("type") == "hello" else None
                if who is None:
                    await ws.close(4003, "auth failed")
                    return
                await ws.send(encode({"id": msg.get("id"), "ok": True}).decode())
                continue
            reply, events = broker.handle(ws, who, msg)
            if msg.get("type") == "subscribe":
                channels.append(msg["channel"])
            for channel, event in events:
                broadcast(broker.rooms.get(channel, ()), encode(event).decode())
            await ws.send(encode(reply).decode())
    except ConnectionClosed:
        pass
    finally:
        broker.leave(ws, channels)


async def main(port: int, secret: str) -> None:
    broker = MiniBroker(secret)
    async with serve(lambda ws: session(broker, ws), "127.0.0.1", port,
                     subprotocols=["tablelock.v1"], compression=None, max_size=65536,  # type: ignore[list-item]
                     ping_interval=20, ping_timeout=20, backlog=2048) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.secret))
