"""Live news for the demo's H5 pages: "your table has an order now", the moment it does.

A phone may follow only orders it knows the id of (an `h5` cannot subscribe to the
store channel), so a new order at its table would reach it only when it asks
again. The scan-to-order platform tells it instead: `GET /demo/tables/{table}/feed`
is a server-sent event stream of the ids of the orders published for that table.
It carries ids only; the page reads the order from the broker under its own
token, with its table scope. One manager connection of this process follows the
store channel for every page (opened at the first page, kept while the broker runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tablelock.auth import AuthError, Tokens
from tablelock_client import Client, TablelockError, connect
from tablelock_client.connection import Frame

log = logging.getLogger("tablelock.demo")

KEEPALIVE_S = 15.0  # a comment line, so that proxies keep the stream open
QUEUE_BOUND = 16  # notices a slow page may lag behind; older ones are dropped (ids repeat)
RELAY_TOKEN_TTL_S = 24 * 3600  # minted again at every (re)connect


def table_feed_routes(tokens: Tokens, store_id: str) -> list[BaseRoute]:
    pages: dict[str, set[asyncio.Queue[str]]] = {}
    relay: list[asyncio.Task[Client]] = []  # the store's follower: one, started once needed

    def on_event(frame: Frame) -> None:
        order = frame.get("order")
        if not isinstance(order, dict):
            return
        notice = json.dumps({"event": frame.get("event"), "order_id": order.get("order_id")})
        for queue in pages.get(str(order.get("table_id")), ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(notice)

    async def follow(ws_url: str) -> Client:
        def token() -> str:
            return tokens.mint(store=store_id, role="manager", sub="demo-table-feed",
                               name="Scan-to-order platform", ttl_s=RELAY_TOKEN_TTL_S)

        client = await connect(ws_url, token, client_name="tablelock-demo-table-feed")
        client.on_event(on_event)
        await client.subscribe_store()
        return client

    def started(request: Request) -> asyncio.Task[Client]:
        if not relay or (relay[0].done() and (relay[0].cancelled() or relay[0].exception())):
            base = str(request.base_url).rstrip("/")
            ws_url = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
            relay[:] = [asyncio.create_task(follow(f"{ws_url}/ws"))]
        return relay[0]

    async def feed(request: Request) -> Response:
        table = request.path_params["table"]
        try:
            terminal, _ = tokens.verify(request.query_params.get("token", ""))
        except AuthError as exc:
            return Response(str(exc), 401)
        if terminal.store_id != store_id or (terminal.role == "h5"
                                              and terminal.table_id != table):
            return Response("a token of another store or table", 403)
        try:
            await started(request)
        except TablelockError as exc:
            log.warning("the table feed cannot follow the store: %s", exc)
            return Response("the table feed is not available", 503)
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_BOUND)
        pages.setdefault(table, set()).add(queue)

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n\n"
                while True:
                    try:
                        notice = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    yield f"data: {notice}\n\n"
            finally:
                listeners = pages.get(table)
                if listeners is not None:
                    listeners.discard(queue)
                    if not listeners:
                        del pages[table]

        headers: dict[str, Any] = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return [Route("/demo/tables/{table}/feed", feed, methods=["GET"])]
