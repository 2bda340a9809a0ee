"""The asyncio client: the one object applications hold, over the client's parts.

Each part does one job: the Session (connection, identity, catch-up after a
reconnect), Requests, Subscriptions (mirrors and the raw event feed),
HeldLocks (lock handles), Payments and the OrderFetchServer. The Client wires
them together and hands their calls out; it holds no state of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .connection import Frame, TokenSource
from .errors import TablelockError
from .locks import HeldLocks, LockHandle
from .mirror import ChangeSink, ChangeStream, Mirror, OrderMirror, StoreMirror
from .model import CheckResult, Lock, Order, OrderView, PaymentResult, StoreConfig, Terminal
from .order_fetch import FetchHandler, OrderFetchServer
from .payments import Payments
from .requests import OrderLike, Requests
from .session import Session
from .subscriptions import Subscriptions

log = logging.getLogger("tablelock_client")

__all__ = ["Client", "FetchHandler", "OrderLike", "connect"]


async def connect(url: str, token: TokenSource, *, locale: str | None = None,
                  order_authority: bool = False, order_fetch: FetchHandler | None = None,
                  backoff_initial: float = 0.2, backoff_max: float = 10.0,
                  request_timeout: float = 30.0, client_name: str = "tablelock_client-python",
                  ) -> Client:
    """Connect and say hello. Raises AuthFailed, UnsupportedProtocol or Disconnected.

    `token` may be a callable (sync or async) returning a fresh token, called at
    every (re)connect. `order_fetch` registers the `order.fetch` handler at once.
    """
    client = Client(url, token, locale=locale,
                    order_authority=order_authority or order_fetch is not None,
                    backoff_initial=backoff_initial, backoff_max=backoff_max,
                    request_timeout=request_timeout, client_name=client_name)
    client._order_fetch.handler = order_fetch
    await client._session.open()
    return client


class Client:
    """A terminal's connection to the broker. Make one with `await connect(...)`."""

    def __init__(self, url: str, token: TokenSource, *, locale: str | None = None,
                 order_authority: bool = False, backoff_initial: float = 0.2,
                 backoff_max: float = 10.0, request_timeout: float = 30.0,
                 client_name: str = "tablelock_client-python") -> None:
        self._session = Session(url, token, locale=locale, order_authority=order_authority,
                                backoff_initial=backoff_initial, backoff_max=backoff_max,
                                request_timeout=request_timeout, client_name=client_name)
        self._requests = Requests(self._session)
        self._held = HeldLocks(self._session, self._requests)
        self._subscriptions = Subscriptions(self._session, self._requests,
                                            self._held.lock_event)
        self._payments = Payments(self._session, self._requests, self._held)
        self._order_fetch = OrderFetchServer(self._session)
        # Catch-up order: mirrors first (their snapshots), then the held locks.
        self._session.attach([self._subscriptions, self._held],
                             on_event=self._subscriptions.event_received,
                             on_rpc=self._order_fetch.answer)

    # --- state ------------------------------------------------------------------------------

    @property
    def terminal(self) -> Terminal:
        return self._session.terminal

    @property
    def store_id(self) -> str:
        return self._session.store_id

    @property
    def config(self) -> StoreConfig:
        return self._session.config

    @property
    def session_id(self) -> str | None:
        return self._session.session_id

    @property
    def closed(self) -> bool:
        return self._session.closed

    @property
    def error(self) -> TablelockError | None:
        """Why the client gave up reconnecting (AuthFailed, say), else None."""
        return self._session.error

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def stale(self) -> bool:
        """True while the connection is down or the mirrors are catching up."""
        return not self._session.fresh

    @property
    def store_channel(self) -> str:
        return self._subscriptions.store_channel

    def order_channel(self, order_id: str) -> str:
        return self._subscriptions.channel_of_order(order_id)

    def server_now_ms(self) -> int:
        """The broker's clock, estimated: every deadline is the broker's, never ours."""
        return self._session.server_now_ms()

    async def wait_fresh(self, timeout: float | None = None) -> None:
        """Wait until connected and every mirror is live again."""
        await self._session.wait_fresh(timeout)

    @property
    def _ws(self) -> Any:
        """The current socket (for tests that cut it)."""
        return self._session.connection.ws

    # --- life ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Release the locks this client holds, then close. Idempotent."""
        if self.closed:
            return
        held = self._held.handles()
        if held and self.connected:
            try:
                async with asyncio.timeout(2):
                    await asyncio.gather(*(h.release() for h in held), return_exceptions=True)
            except TimeoutError:
                log.warning("closing: releasing %d lock(s) timed out", len(held))
        await self._session.close()

    async def wait_closed(self) -> None:
        """Wait until the client is closed, or gave up (see `error`: AuthFailed, say)."""
        await self._session.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- events -------------------------------------------------------------------------------

    def on_event(self, callback: Callable[[Frame], None]) -> Callable[[], None]:
        """Call `callback(frame)` for every raw event frame, direct ones included.

        Frames are as they arrive: after a reconnect some may repeat. Use a
        mirror for state; this is for `lock.contended` toasts and the like.
        """
        return self._subscriptions.on_event(callback)

    def events(self) -> ChangeStream:
        """`async for change in client.events():` every raw event frame, as a Change."""
        return self._subscriptions.events()

    @property
    def event_sinks(self) -> set[ChangeSink]:
        """Where every raw event goes as a Change (the streams of `events()`)."""
        return self._subscriptions.event_sinks

    # --- order.fetch (ERP side) -----------------------------------------------------------------

    def serve_order_fetch(self, handler: FetchHandler) -> None:
        """Answer the broker's `order.fetch` with `handler(params)` (sync or async).

        `params` is `{"order_id": ...}` or `{"table_id": ...}`; return the order
        (an Order or a mapping), or None when there is no such order. A sync
        handler runs in a worker thread, so a slow ERP database does not stall
        the connection. Only a role that may be the order authority (CAPABILITIES)
        serves it: the broker asks the store's `erp_main`, else a terminal that
        claimed `order_authority` in hello (connect with `order_authority=True` or
        `order_fetch=` to be asked from the first hello on).
        """
        self._order_fetch.serve(handler)

    # --- requests ---------------------------------------------------------------------------------

    async def ping(self) -> int:
        """The broker's time (ms since the epoch); also refreshes the clock offset."""
        return await self._requests.ping()

    async def refresh_token(self, token: str | None = None) -> int:
        """`token.refresh`: a new token for this terminal before the current one ends.

        The broker closes a connection when its token expires. Without `token`
        the token source given to connect() is asked. The new token is also
        used for later reconnects. Returns its expiry (ms since the epoch).
        """
        return await self._requests.refresh_token(token)

    async def check(self, order_id: str, action: str) -> CheckResult:
        """Would `action` be allowed now? Never raises for a lock conflict: see `.error`."""
        return await self._requests.check(order_id, action)

    async def get_order(self, order_id: str | None = None, *, table_id: str | None = None,
                        fresh: bool = False) -> OrderView:
        """The order and its locks; `fresh=True` pulls it from the ERP first."""
        return await self._requests.get_order(order_id, table_id=table_id, fresh=fresh)

    async def publish_order(self, order: OrderLike, change: str, token: int | None = None,
                            force: bool = False, *, operator: str | None = None,
                            reason: str | None = None) -> Order:
        """`order.publish` (ERP): the whole order as the ERP has it, with a grown version."""
        return await self._requests.publish_order(order, change, token, force, operator, reason)

    async def renew(self, order_id: str, kind: str, token: int) -> Lock | None:
        return await self._requests.renew(order_id, kind, token)

    async def release(self, order_id: str, kind: str, token: int | None = None, *,
                      force: bool = False, operator: str | None = None,
                      reason: str | None = None) -> Lock | None:
        """`lock.release`; with `force=True` (ERP, manager) revokes someone else's lock."""
        return await self._requests.release(order_id, kind, token, force=force,
                                            operator=operator, reason=reason)

    # --- subscriptions ----------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> Mirror:
        """Subscribe and return the channel's live mirror (the same one if already subscribed)."""
        return await self._subscriptions.subscribe(channel)

    async def subscribe_order(self, order_id: str) -> OrderMirror:
        return await self._subscriptions.subscribe_as(self.order_channel(order_id), OrderMirror)

    async def subscribe_store(self) -> StoreMirror:
        return await self._subscriptions.subscribe_as(self.store_channel, StoreMirror)

    async def unsubscribe(self, channel: str) -> None:
        await self._subscriptions.unsubscribe(channel)

    def mirror(self, channel: str) -> Mirror | None:
        return self._subscriptions.mirrors.get(channel)

    # --- locks and payments -----------------------------------------------------------------------

    def lock(self, order_id: str, kind: str, *, force: bool = False,
             operator: str | None = None, reason: str | None = None) -> LockHandle:
        """A lock handle: `async with client.lock(...) as lock:` or `lock = await client.lock(...)`.

        `force=True` revokes a conflicting lock (ERP and manager only) and must be
        the application's explicit choice, after the user confirmed the prompt.
        """
        return LockHandle(self._held, self._payments, order_id, kind, force=force,
                          operator=operator, reason=reason)

    async def acquire(self, order_id: str, kind: str, *, force: bool = False,
                      operator: str | None = None, reason: str | None = None) -> LockHandle:
        """Take a lock now; release it with `await handle.release()`."""
        return await self.lock(order_id, kind, force=force, operator=operator, reason=reason)

    async def complete_payment(self, order_id: str, *, token: int | None, version: int,
                               amount_cents: int, payment_ref: str) -> PaymentResult:
        """`payment.complete`; retrying with the same `payment_ref` returns the same success.

        An ERP or manager holder records its own counter payment here. A role
        that may not record a payment (`h5`: CAPABILITIES) gets Forbidden at once,
        without asking the broker: a phone's payment is recorded by the payment
        service (`PaymentService`).
        """
        return await self._payments.complete_payment(
            order_id, token=token, version=version, amount_cents=amount_cents,
            payment_ref=payment_ref)
