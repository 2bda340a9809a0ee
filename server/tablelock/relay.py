"""`order.fetch`: ask the store's ERP for the latest order, with a timeout.

The broker sends an `rpc` frame to the store's order authority (an online
`erp_main`, else a terminal that said `order_authority: true`) and waits for
its `rpc.result`. No authority, no answer in time, an error or an order that
does not fit the question all come back as None: the caller answers
ERP_UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import msgspec

from .hub import Connection, Hub
from .model import Order
from .protocol import RpcCall, RpcResult, WireOrder, encode

log = logging.getLogger("tablelock.relay")


class Relay:
    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[Connection, asyncio.Future[RpcResult]]] = {}

    async def fetch(self, store_id: str, params: dict[str, str], timeout_ms: int) -> Order | None:
        conn = self._hub.authority(store_id)
        if conn is None:
            return None
        rid = f"r{next(self._ids)}"
        future: asyncio.Future[RpcResult] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (conn, future)
        conn.send(encode(RpcCall("rpc", rid, "order.fetch", params)).decode())
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                answer = await future
        except TimeoutError:
            log.warning("order.fetch %s to %s timed out", params, store_id)
            return None
        finally:
            self._pending.pop(rid, None)
        return _order_of(answer, params)

    def resolve(self, conn: Connection, answer: RpcResult) -> None:
        """An `rpc.result` arrived; only the connection that was asked may answer."""
        pending = self._pending.get(answer.rid)
        if pending is not None and pending[0] is conn and not pending[1].done():
            pending[1].set_result(answer)


def _order_of(answer: RpcResult, params: dict[str, str]) -> Order | None:
    if not answer.ok or answer.result is None:
        return None
    try:
        order = msgspec.convert(answer.result.get("order"), WireOrder).to_order()
    except msgspec.ValidationError as exc:
        log.warning("order.fetch answered with a bad order: %s", exc)
        return None
    for field, wanted in params.items():
        if getattr(order, field) != wanted:
            log.warning("order.fetch for %s=%s answered with another order", field, wanted)
            return None
    return order
