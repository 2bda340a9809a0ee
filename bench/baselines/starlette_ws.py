"""The minimal broker as a Starlette WebSocket route under uvicorn, with one of uvicorn's
WebSocket implementations (`websockets-sansio`, `websockets`, `wsproto`) and otherwise the
broker's own server options (`tablelock.cli.uvicorn_options`).

    python -m bench.baselines.starlette_ws --port P --secret S --ws wsproto
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tablelock.cli import uvicorn_options
from tablelock.settings import Settings

from .core import MiniBroker

decode, encode = msgspec.json.decode, msgspec.json.Encoder().encode


def create_app(broker: MiniBroker) -> Starlette:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept(subprotocol="tablelock.v1")
        who: dict[str, Any] | None = None
        channels: list[str] = []
        try:
            while True:
                msg = decode(await ws.receive_text())
                if who is None:
                    who = broker.hello(msg.get("token")) if msg.get("type") == "hello" else None
                    if who is None:
                        await ws.close(4003)
                        return
                    await ws.send_text(encode({"id": msg.get("id"), "ok": True}).decode())
                    continue
                reply, events = broker.handle(ws, who, msg)
                if msg.get("type") == "subscribe":
                    channels.append(msg["channel"])
                for channel, event in events:
                    text = encode(event).decode()
                    for peer in list(broker.rooms.get(channel, ())):
                        with contextlib.suppress(Exception):
                            await peer.send_text(text)  # type: ignore[attr-defined]
                await ws.send_text(encode(reply).decode())
        except WebSocketDisconnect:
            pass
        finally:
            broker.leave(ws, channels)

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--ws", default="websockets-sansio",
                        choices=["websockets-sansio", "websockets", "wsproto"])
    args = parser.parse_args()
    options = uvicorn_options(Settings(port=args.port))
    options.update(ws=args.ws, lifespan="off")
    uvicorn.run(create_app(MiniBroker(args.secret)), **options)  # type: ignore[arg-type]
