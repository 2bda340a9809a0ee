"""`order.fetch`: ask the store's ERP for the latest order, with a timeout.

The broker sends an `rpc` frame to the store's order authority (an online
`erp_main`, else a terminal that said `order_authority: true`) and waits for
its `rpc.result`. When the authority is connected to another broker (Redis
backend), the question and the answer travel through the backend. No
authority, no answer in time, an error or an order that does not fit the
question all come back as None: the caller answers ERP_UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable

import msgspec

from . import metrics
from .backends.base import Backend, Unavailable
from .hub import Connection, Hub
from .model import Order, Terminal
from .protocol import RpcCall, RpcResult, WireOrder, encode

log = logging.getLogger("tablelock.relay")


class BrokerMessage(msgspec.Struct, omit_defaults=True):
    """A question for an authority on another broker, or its answer."""

    op: str  # "fetch" | "answer"
    rid: str
    origin: str = ""
    store_id: str = ""
    params: dict[str, str] = {}
    timeout_ms: int = 0
    answer: RpcResult | None = None


_broker_decoder = msgspec.json.Decoder(BrokerMessage)


class PullLimited(Exception):
    """The terminal has used up its budget of order pulls: the ERP is not asked."""


class PullBudget:
    """A token bucket of order pulls per terminal (store, terminal id), so that a phone
    asking for random order ids cannot turn each request into a question to the ERP.
    Full buckets say nothing a missing one doesn't: they are dropped when the map grows."""

    def __init__(self, rate_per_s: float, burst: int, max_terminals: int = 10_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_terminals = max_terminals
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, stamp)

    def take(self, terminal: Terminal, now: float) -> bool:
        key = (terminal.store_id, terminal.terminal_id)
        tokens, stamp = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) * self.rate_per_s)
        if tokens < 1:
            return False
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self.max_terminals:
            self._forget_full(now)
        return True

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate_per_s if self.rate_per_s > 0 else math.inf
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


class Relay:
    def __init__(self, hub: Hub, backend: Backend, fetch_rate_per_s: float = 1.0,
                 fetch_burst: int = 20) -> None:
        self._hub = hub
        self._backend = backend
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[Connection | None, asyncio.Future[RpcResult | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = PullBudget(fetch_rate_per_s, fetch_burst)
        # (store, params) -> the pull under way: whoever asks the same meanwhile shares it
        self._inflight: dict[tuple[str, tuple[tuple[str, str], ...]],
                             asyncio.Future[Order | None]] = {}
        backend.on_broker_message(self._on_broker_message)

    async def fetch(self, requester: Terminal, params: dict[str, str],
                    timeout_ms: int) -> Order | None:
        """The ERP's latest order for `params`, pulled on behalf of `requester`: a pull of
        the same order already under way is shared (and costs no budget); otherwise one of
        the requester's budget is spent, and PullLimited says when it is spent out."""
        key = (requester.store_id, tuple(sorted(params.items())))
        pull = self._inflight.get(key)
        if pull is None:
            if not self._budget.take(requester, time.monotonic()):
                metrics.RATE_LIMITED.inc()
                raise PullLimited
            pull = self._inflight[key] = asyncio.ensure_future(
                self._pull(requester.store_id, params, timeout_ms))
            pull.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(pull)

    def _forget(self, key: tuple[str, tuple[tuple[str, str], ...]],
                pull: asyncio.Future[Order | None]) -> None:
        if self._inflight.get(key) is pull:
            del self._inflight[key]

    async def _pull(self, store_id: str, params: dict[str, str], timeout_ms: int) -> Order | None:
        try:
            target = await self._backend.authority(store_id)
            if target is None or target == self._backend.broker_id:
                answer = await self._ask_local(store_id, params, timeout_ms)
            else:
                answer = await self._ask_remote(target, store_id, params, timeout_ms)
        except Unavailable:
            return None
        return _order_of(answer, params) if answer is not None else None

    async def _await(self, rid: str, conn: Connection | None, timeout_ms: int,
                     send: Awaitable[None] | None) -> RpcResult | None:
        """Wait for the answer to `rid` (after sending the question, if `send` does that)."""
        future: asyncio.Future[RpcResult | None] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (conn, future)
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                if send is not None:
                    await send
                return await future
        except TimeoutError:
            log.warning("order.fetch %s timed out", rid)
            return None
        finally:
            self._pending.pop(rid, None)

    async def _ask_local(self, store_id: str, params: dict[str, str],
                         timeout_ms: int) -> RpcResult | None:
        conn = self._hub.authority(store_id)
        if conn is None:
            return None
        rid = f"r{next(self._ids)}"
        conn.send(encode(RpcCall("rpc", rid, "order.fetch", params)))
        return await self._await(rid, conn, timeout_ms, None)

    async def _ask_remote(self, broker_id: str, store_id: str, params: dict[str, str],
                          timeout_ms: int) -> RpcResult | None:
        rid = f"{self._backend.broker_id}-{next(self._ids)}"
        question = BrokerMessage("fetch", rid, self._backend.broker_id, store_id, params,
                                 timeout_ms)
        return await self._await(rid, None, timeout_ms,
                                 self._backend.send_to_broker(broker_id, encode(question)))

    def resolve(self, conn: Connection, answer: RpcResult) -> None:
        """An `rpc.result` arrived; only the connection that was asked may answer."""
        pending = self._pending.get(answer.rid)
        if pending is not None and pending[0] is conn and not pending[1].done():
            pending[1].set_result(answer)

    async def _on_broker_message(self, data: bytes) -> None:
        try:
            message = _broker_decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("an unreadable message from another broker")
            return
        if message.op == "answer":
            pending = self._pending.get(message.rid)
            if pending is not None and pending[0] is None and not pending[1].done():
                pending[1].set_result(message.answer)
        elif message.op == "fetch":
            task = asyncio.create_task(self._answer_remote(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer_remote(self, question: BrokerMessage) -> None:
        answer = await self._ask_local(question.store_id, question.params, question.timeout_ms)
        reply = BrokerMessage("answer", question.rid, answer=answer)
        try:
            await self._backend.send_to_broker(question.origin, encode(reply))
        except Unavailable:
            log.warning("could not return an order.fetch answer to broker %s", question.origin)


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
