"""What an open connection keeps of its handshake (bench/README.md, "Hot path").

The broker runs in this process (uvicorn with tablelock's own protocol classes, on a real
socket) so that its connection objects can be looked at; the client is a real WebSocket
client saying hello over that socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import uvicorn
import websockets

from tablelock.app import create_app
from tablelock.cli import uvicorn_options
from tablelock.settings import Settings

from .support import SECRET, mint, unique


async def test_an_open_connection_keeps_no_handshake_headers() -> None:
    settings = Settings.from_env(secrets=[SECRET], port=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), **{**uvicorn_options(settings),
                                                      "log_config": None})
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        store = unique()
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws",
                                      additional_headers={"X-Padding": "p" * 2000}) as ws:
            await ws.send(json.dumps({"type": "hello", "id": 1, "protocol": 1,
                                      "token": mint(store, "erp_main", "erp1")}))
            reply = json.loads(await ws.recv())
            assert reply["ok"] is True
            (protocol,) = server.server_state.connections
            assert protocol.scope["headers"] == []
            # websockets' parser still holds the request it parsed, as a local of its
            # generator, for the connection's whole life: it must be empty by now.
            retained: Any = protocol.conn.parser.gi_frame.f_locals.get("request")
            assert retained is not None and len(retained.headers) == 0
    finally:
        server.should_exit = True
        await serving
