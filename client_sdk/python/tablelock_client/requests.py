"""The broker's requests, one method each, and the re-read after an unknown outcome."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .connection import Frame, now_ms
from .errors import NotFound, OutcomeUnknown, TablelockError
from .model import CheckResult, Lock, Order, OrderView, as_wire, convert
from .session import Session

log = logging.getLogger("tablelock_client")

OrderLike = Order | Mapping[str, Any]


class Requests:
    def __init__(self, session: Session) -> None:
        self.session = session

    async def request(self, type_: str, **params: Any) -> Frame:
        """Send a request; a write whose outcome is unknown is re-read before it is reported."""
        try:
            return await self.session.request(type_, params)
        except OutcomeUnknown as unknown:
            # The write may have been applied: read what the broker holds before reporting.
            order = params.get("order")
            order_id = params.get("order_id") or (order.get("order_id")
                                                  if isinstance(order, dict) else None)
            if order_id:
                unknown.view = await self._reread(str(order_id))
            raise

    async def _reread(self, order_id: str) -> OrderView | None:
        try:
            return await self.get_order(order_id)
        except NotFound:
            return OrderView(None, [])
        except TablelockError as exc:
            log.warning("re-reading %s after an unknown outcome: %s", order_id, exc)
            return None

    async def ping(self) -> int:
        sent = now_ms()
        reply = await self.request("ping")
        server_time = int(reply["server_time"])
        self.session.offset_ms = server_time - (sent + now_ms()) // 2
        return server_time

    async def refresh_token(self, token: str | None) -> int:
        connection = self.session.connection
        if token is None:
            token = await connection.fresh_token()
        reply = await self.request("token.refresh", token=token)
        if isinstance(connection.token, str):
            connection.token = token
        return int(reply["expires_at"])

    async def check(self, order_id: str, action: str) -> CheckResult:
        reply = await self.request("check", order_id=order_id, action=action)
        return convert({k: v for k, v in reply.items() if k not in ("id", "ok")}, CheckResult)

    async def get_order(self, order_id: str | None = None, *, table_id: str | None = None,
                        fresh: bool = False) -> OrderView:
        reply = await self.request("order.get", order_id=order_id, table_id=table_id,
                                   fresh=True if fresh else None)
        return convert({"order": reply.get("order"), "locks": reply.get("locks") or []},
                       OrderView)

    async def publish_order(self, order: OrderLike, change: str, token: int | None,
                            force: bool, operator: str | None, reason: str | None) -> Order:
        reply = await self.request("order.publish", order=as_wire(order), change=change,
                                   token=token, force=True if force else None,
                                   operator=operator, reason=reason)
        return convert(reply["order"], Order)

    async def renew(self, order_id: str, kind: str, token: int) -> Lock | None:
        reply = await self.request("lock.renew", order_id=order_id, kind=kind, token=token)
        return convert(reply["lock"], Lock) if reply.get("lock") else None

    async def release(self, order_id: str, kind: str, token: int | None = None, *,
                      force: bool = False, operator: str | None = None,
                      reason: str | None = None) -> Lock | None:
        reply = await self.request("lock.release", order_id=order_id, kind=kind, token=token,
                                   force=True if force else None, operator=operator,
                                   reason=reason)
        return convert(reply["lock"], Lock) if reply.get("lock") else None
