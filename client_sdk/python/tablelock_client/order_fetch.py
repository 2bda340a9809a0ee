"""The ERP side of `order.fetch`: answering the broker's rpc with the application's handler."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .connection import Frame
from .errors import Disconnected, TablelockError
from .model import as_wire, capability
from .requests import OrderLike
from .session import Session

log = logging.getLogger("tablelock_client")

# handler(params) -> the order, or None for "no such order"; params is {order_id} or {table_id}
FetchHandler = Callable[[dict[str, str]], OrderLike | Awaitable[OrderLike | None] | None]


class OrderFetchServer:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.handler: FetchHandler | None = None

    def serve(self, handler: FetchHandler) -> None:
        """Answer `order.fetch` with `handler`, claiming the order authority at every hello."""
        role = self.session.terminal.role
        if not capability(role, "order_authority"):
            raise ValueError(f"a {role} terminal is never asked for orders: only the roles "
                             "that may be the order authority serve order.fetch")
        self.handler = handler
        self.session.connection.order_authority = True

    async def answer(self, frame: Frame) -> None:
        """Answer one `rpc` frame from the broker."""
        rid = frame.get("rid")
        handler = self.handler
        answer: dict[str, Any]
        if frame.get("method") != "order.fetch" or handler is None:
            answer = {"ok": False, "error": {"code": "UNAVAILABLE",
                                             "message": "this terminal does not serve that"}}
        else:
            params = dict(frame.get("params") or {})
            try:
                if inspect.iscoroutinefunction(handler):
                    result = await handler(params)
                else:
                    result = await asyncio.to_thread(handler, params)
                    if inspect.isawaitable(result):
                        result = await result
                if result is None:
                    answer = {"ok": False, "error": {"code": "NOT_FOUND", "message": "no order"}}
                else:
                    answer = {"ok": True, "result": {"order": as_wire(result)}}
            except TablelockError as exc:
                answer = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            except Exception as exc:
                log.exception("order.fetch handler failed")
                answer = {"ok": False, "error": {"code": "ERROR", "message": str(exc)[:500]}}
        # If the socket dropped meanwhile, the broker has stopped waiting for this rid anyway.
        with contextlib.suppress(Disconnected):
            await self.session.connection.send({"type": "rpc.result", "rid": rid, **answer})
