"""A blocking facade for ERP programs that are not asyncio.

The asyncio client runs on its own event loop in a background thread; each
call here hands a coroutine to that loop and waits for its result. Renewals,
reconnects and `order.fetch` answers go on in the background meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from .client import Client, FetchHandler, OrderLike
from .client import connect as _aconnect
from .connection import TokenSource
from .locks import LockHandle
from .mirror import Mirror
from .model import CheckResult, Lock, Order, OrderView, PaymentResult, StoreConfig, Terminal

T = TypeVar("T")


def connect(url: str, token: TokenSource, *, timeout: float | None = 30.0,
            **options: Any) -> SyncClient:
    """Connect on a background thread; takes the options of `tablelock_client.connect`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="tablelock-client",
                              daemon=True)
    thread.start()
    try:
        client = asyncio.run_coroutine_threadsafe(_aconnect(url, token, **options),
                                                  loop).result(timeout)
    except BaseException:
        _stop_loop(loop, thread)
        raise
    return SyncClient(client, loop, thread)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_default_executor())  # order.fetch workers
    finally:
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class SyncClient:
    """Blocking versions of the Client's calls. Make one with `tablelock_client.sync.connect`."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.client = client  # the asyncio client underneath
        self._loop = loop
        self._thread = thread

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking call from the client's own loop would deadlock: "
                               "use the asyncio client there")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def terminal(self) -> Terminal:
        return self.client.terminal

    @property
    def config(self) -> StoreConfig:
        return self.client.config

    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def stale(self) -> bool:
        return self.client.stale

    def close(self) -> None:
        """Release held locks, close, and stop the background thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.client.close(), 10)
        finally:
            _stop_loop(self._loop, self._thread)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- calls -----------------------------------------------------------------------------

    def serve_order_fetch(self, handler: FetchHandler) -> None:
        """Answer `order.fetch` with `handler(params)`; it runs in a worker thread."""
        async def register() -> None:
            self.client.serve_order_fetch(handler)
        self._call(register())

    def ping(self) -> int:
        return self._call(self.client.ping())

    def refresh_token(self, token: str | None = None) -> int:
        return self._call(self.client.refresh_token(token))

    def check(self, order_id: str, action: str) -> CheckResult:
        return self._call(self.client.check(order_id, action))

    def get_order(self, order_id: str | None = None, *, table_id: str | None = None,
                  fresh: bool = False) -> OrderView:
        return self._call(self.client.get_order(order_id, table_id=table_id, fresh=fresh))

    def publish_order(self, order: OrderLike, change: str, token: int | None = None,
                      force: bool = False, *, operator: str | None = None,
                      reason: str | None = None) -> Order:
        return self._call(self.client.publish_order(order, change, token, force,
                                                    operator=operator, reason=reason))

    def complete_payment(self, order_id: str, *, token: int | None, version: int,
                         amount_cents: int, payment_ref: str) -> PaymentResult:
        return self._call(self.client.complete_payment(
            order_id, token=token, version=version, amount_cents=amount_cents,
            payment_ref=payment_ref))

    def renew(self, order_id: str, kind: str, token: int) -> Lock | None:
        return self._call(self.client.renew(order_id, kind, token))

    def release(self, order_id: str, kind: str, token: int | None = None, *,
                force: bool = False, operator: str | None = None,
                reason: str | None = None) -> Lock | None:
        return self._call(self.client.release(order_id, kind, token, force=force,
                                              operator=operator, reason=reason))

    def subscribe(self, channel: str) -> Mirror:
        """The channel's mirror; read its attributes, they are updated in the background."""
        return self._call(self.client.subscribe(channel))

    def unsubscribe(self, channel: str) -> None:
        self._call(self.client.unsubscribe(channel))

    def lock(self, order_id: str, kind: str, *, force: bool = False,
             operator: str | None = None, reason: str | None = None) -> SyncLock:
        """`with client.lock(order_id, "payment") as lock:` acquires, renews, releases."""
        return SyncLock(self, self.client.lock(order_id, kind, force=force, operator=operator,
                                               reason=reason))

    def acquire(self, order_id: str, kind: str, *, force: bool = False,
                operator: str | None = None, reason: str | None = None) -> SyncLock:
        return self.lock(order_id, kind, force=force, operator=operator,
                         reason=reason).acquire()


class SyncLock:
    """A lock handle for threads: `lost` is a threading.Event."""

    def __init__(self, owner: SyncClient, handle: LockHandle) -> None:
        self._owner = owner
        self.handle = handle
        self.lost = threading.Event()

    @property
    def token(self) -> int | None:
        return self.handle.token

    @property
    def lock(self) -> Lock | None:
        return self.handle.lock

    @property
    def order(self) -> Order | None:
        return self.handle.order

    @property
    def held(self) -> bool:
        return self.handle.held

    @property
    def lost_reason(self) -> str | None:
        return self.handle.lost_reason

    def acquire(self) -> SyncLock:
        async def take() -> None:
            await self.handle.acquire()
            self.handle.add_lost_callback(lambda _: self.lost.set())
        self._owner._call(take())
        return self

    def release(self) -> None:
        self._owner._call(self.handle.release())

    def complete_payment(self, payment_ref: str, *, version: int | None = None,
                         amount_cents: int | None = None) -> PaymentResult:
        return self._owner._call(self.handle.complete_payment(
            payment_ref, version=version, amount_cents=amount_cents))

    def __enter__(self) -> SyncLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
