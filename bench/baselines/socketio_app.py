"""What a typical team would build instead: python-socketio (rooms and acks) under uvicorn.

A request is a Socket.IO event named after its type, answered by its ack; the token comes
as the connect auth payload; events go to a room per channel as the `event` event.

    python -m bench.baselines.socketio_app --port P --secret S
"""

from __future__ import annotations

import argparse
from typing import Any

import socketio
import uvicorn

from tablelock.cli import uvicorn_options
from tablelock.settings import Settings

from .core import MiniBroker


def create_app(broker: MiniBroker) -> socketio.ASGIApp:
    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[],
                               ping_interval=20, ping_timeout=20)
    clients: dict[str, dict[str, Any]] = {}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> bool:
        who = broker.hello((auth or {}).get("token"))
        if who is None:
            return False
        clients[sid] = who
        return True

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        clients.pop(sid, None)

    async def request(kind: str, sid: str, msg: dict[str, Any]) -> dict[str, Any]:
        if kind == "subscribe":  # Socket.IO's own rooms, not the core's
            await sio.enter_room(sid, msg["channel"])
            return {"ok": True, "channel": msg["channel"], "snapshot": {}}
        reply, events = broker.handle(sid, clients[sid], {**msg, "type": kind})
        for channel, event in events:
            await sio.emit("event", event, room=channel)
        return reply

    def handler(kind: str) -> Any:
        async def on(sid: str, msg: dict[str, Any]) -> dict[str, Any]:
            return await request(kind, sid, msg)
        return on

    for kind in ("subscribe", "lock.acquire", "lock.release", "order.publish", "ping"):
        sio.on(kind, handler(kind))
    return socketio.ASGIApp(sio, socketio_path="socket.io")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    options = uvicorn_options(Settings(port=args.port))
    options.update(lifespan="off")
    uvicorn.run(create_app(MiniBroker(args.secret)), **options)  # type: ignore[arg-type]
