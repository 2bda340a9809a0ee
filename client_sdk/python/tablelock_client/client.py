"""The asyncio client: requests, mirrors, lock handles and the ERP's `order.fetch`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

from .connection import VERSION, Connection, Frame, TokenSource, now_ms
from .errors import Disconnected, Forbidden, NotFound, OutcomeUnknown, TablelockError
from .locks import LockHandle
from .mirror import Change, ChangeSink, ChangeStream, Mirror, OrderMirror, StoreMirror
from .model import (
    CheckResult,
    Contention,
    Lock,
    Order,
    OrderView,
    PaymentResult,
    StoreConfig,
    Terminal,
    as_wire,
    convert,
)

log = logging.getLogger("tablelock_client")

OrderLike = Order | Mapping[str, Any]
# handler(params) -> the order, or None for "no such order"; params is {order_id} or {table_id}
FetchHandler = Callable[[dict[str, str]], OrderLike | Awaitable[OrderLike | None] | None]
M = TypeVar("M", bound=Mirror)

PHONE_NEVER_PAYS = (
    "A phone never records a payment: it holds the payment lock while the customer pays "
    "through the payment provider, and the platform's payment service records the payment "
    "with this lock's token (tablelock_client.PaymentService, role service).")


async def connect(url: str, token: TokenSource, *, locale: str | None = None,
                  order_authority: bool = False, order_fetch: FetchHandler | None = None,
                  backoff_initial: float = 0.2, backoff_max: float = 10.0,
                  request_timeout: float = 30.0, client_name: str = "tablelock_client-python",
                  ) -> Client:
    """Connect and say hello. Raises AuthFailed, UnsupportedProtocol or Disconnected.

    `token` may be a callable (sync or async) returning a fresh token, called at
    every (re)connect. `order_fetch` registers the `order.fetch` handler at once.
    """
    client = Client(url, token, locale=locale, order_authority=order_authority,
                    backoff_initial=backoff_initial, backoff_max=backoff_max,
                    request_timeout=request_timeout, client_name=client_name)
    if order_fetch is not None:
        client._fetch_handler = order_fetch
        client._conn.order_authority = True
    await client._conn.open()
    return client


class Client:
    """A terminal's connection to the broker. Make one with `await connect(...)`."""

    def __init__(self, url: str, token: TokenSource, *, locale: str | None = None,
                 order_authority: bool = False, backoff_initial: float = 0.2,
                 backoff_max: float = 10.0, request_timeout: float = 30.0,
                 client_name: str = "tablelock_client-python") -> None:
        self._conn = Connection(url, token, self, locale=locale, order_authority=order_authority,
                                client_name=client_name, client_version=VERSION,
                                backoff_initial=backoff_initial, backoff_max=backoff_max,
                                request_timeout=request_timeout)
        self.terminal: Terminal = Terminal("", "")
        self.store_id = ""
        self.config = StoreConfig()
        self.session_id: str | None = None
        self.resumed = False
        self.closed = False
        self.error: TablelockError | None = None  # why the client gave up reconnecting
        self._closed_event = asyncio.Event()
        self._offset_ms = 0  # broker clock minus ours, from hello and ping
        self._epoch = 0  # +1 per connection, so a late catch-up cannot mark a newer one fresh
        self._up = asyncio.Event()
        self._fresh = asyncio.Event()
        self._mirrors: dict[str, Mirror] = {}
        self._handles: dict[tuple[str, int], set[LockHandle]] = {}
        # Locks that ended lately, in case the news beats the acquire reply.
        self._ended: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._unreleased: list[Lock] = []
        self._fetch_handler: FetchHandler | None = None
        self._event_callbacks: list[Callable[[Frame], None]] = []
        self._event_streams: set[ChangeSink] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn.up

    @property
    def stale(self) -> bool:
        """True while the connection is down or the mirrors are catching up."""
        return not self._fresh.is_set()

    @property
    def store_channel(self) -> str:
        return f"store:{self.store_id}"

    def order_channel(self, order_id: str) -> str:
        return f"order:{self.store_id}:{order_id}"

    def server_now_ms(self) -> int:
        """The broker's clock, estimated: every deadline is the broker's, never ours."""
        return now_ms() + self._offset_ms

    async def wait_fresh(self, timeout: float | None = None) -> None:
        """Wait until connected and every mirror is live again."""
        async with asyncio.timeout(timeout):
            await self._fresh.wait()

    @property
    def _ws(self) -> Any:
        """The current socket (for tests that cut it)."""
        return self._conn.ws

    # --- life ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Release the locks this client holds, then close. Idempotent."""
        if self.closed:
            return
        held = [h for hs in self._handles.values() for h in hs]
        if held and self.connected:
            try:
                async with asyncio.timeout(2):
                    await asyncio.gather(*(h.release() for h in held), return_exceptions=True)
            except TimeoutError:
                log.warning("closing: releasing %d lock(s) timed out", len(held))
        self.closed = True
        self._unreleased.clear()
        await self._conn.close()
        self._shut("closed")

    async def wait_closed(self) -> None:
        """Wait until the client is closed, or gave up (see `error`: AuthFailed, say)."""
        await self._closed_event.wait()

    def _shut(self, reason: str) -> None:
        self.closed = True
        self._closed_event.set()
        for handle in [h for hs in self._handles.values() for h in hs]:
            handle._mark_lost(reason)
        for mirror in self._mirrors.values():
            mirror._close()
        for stream in list(self._event_streams):
            stream._put(None)
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- the Connection's listener ------------------------------------------------------------

    def _connection_up(self, hello: Frame) -> None:
        self.session_id = hello.get("session_id")
        self.resumed = bool(hello.get("resumed"))
        self.terminal = convert(hello["terminal"], Terminal)
        store = hello.get("store") or {}
        self.store_id = store.get("store_id", self.terminal.store_id)
        if store.get("config"):
            self.config = convert(store["config"], StoreConfig)
        if isinstance(hello.get("server_time"), int):
            self._offset_ms = hello["server_time"] - now_ms()
        self._up.set()
        for handles in self._handles.values():
            for handle in handles:
                handle._connection_up()
        # Mark the mirrors before the reader runs on: replayed events wait for the snapshot.
        gens = {mirror: mirror._begin_sync() for mirror in self._mirrors.values()}
        self._epoch += 1
        self._spawn(self._catch_up(gens, self._epoch))

    def _connection_down(self) -> None:
        self._up.clear()
        self._fresh.clear()
        if self.closed:
            return
        for mirror in self._mirrors.values():
            mirror._set_stale()
        for handles in list(self._handles.values()):
            for handle in list(handles):
                handle._connection_down()

    def _connection_failed(self, error: TablelockError) -> None:
        log.error("tablelock: giving up reconnecting: %s", error)
        self.error = error
        self._shut("closed")

    def _connection_frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "event":
            self._on_event(frame)
        elif kind == "rpc":
            self._spawn(self._answer_rpc(frame))
        else:
            log.debug("unexpected frame: %.200r", frame)

    async def _catch_up(self, gens: dict[Mirror, int], epoch: int) -> None:
        """After a (re)connect: re-subscribe with `since`, check our locks, send late releases.

        Every channel is subscribed again even when the session was resumed: the
        broker counts an event as delivered once it is queued, so what was queued
        on the dead socket would be lost; `since` (our own last seq) recovers it.
        """
        await asyncio.gather(*(self._sync(mirror, gen, mirror.seq if mirror.synced else None)
                               for mirror, gen in gens.items()))
        await self._verify_locks()
        await self._flush_releases()
        if self.connected and epoch == self._epoch:
            self._fresh.set()

    async def _sync(self, mirror: Mirror, gen: int, since: int | None) -> None:
        try:
            reply = await self._conn.request("subscribe", {"channel": mirror.channel,
                                                           "since": since})
        except Disconnected:
            return  # the next connection starts over
        except TablelockError as exc:
            log.warning("re-subscribing to %s: %s", mirror.channel, exc)
            return
        if isinstance(mirror, StoreMirror):
            mirror.config = self.config
        for frame in mirror._apply_subscribe(gen, reply, since) or ():
            self._lock_event(frame)

    def _resync(self, mirror: Mirror) -> None:
        """A seq gap: take a new snapshot (subscribe without since)."""
        if self.connected and self._mirrors.get(mirror.channel) is mirror:
            self._spawn(self._sync(mirror, mirror._begin_sync(), None))

    async def _verify_locks(self) -> None:
        """Ask the broker whether the locks we held across the drop are still ours."""
        by_order: dict[str, list[LockHandle]] = {}
        for handles in list(self._handles.values()):
            for handle in handles:
                by_order.setdefault(handle.order_id, []).append(handle)
        for order_id, held in by_order.items():
            try:
                view = await self.get_order(order_id)
            except NotFound:
                view = OrderView(None, [])
            except Disconnected:
                return
            except TablelockError as exc:
                log.warning("checking the locks of %s: %s", order_id, exc)
                continue
            current = {(lock.kind, lock.token) for lock in view.locks}
            paid = view.order is not None and view.order.status == "paid"
            for handle in held:
                if (handle.kind, handle.token) not in current:
                    handle._mark_lost("paid" if paid else "gone")

    async def _flush_releases(self) -> None:
        pending, self._unreleased = self._unreleased, []
        for lock in pending:
            try:
                await self.release(lock.order_id, lock.kind, lock.token)
            except Disconnected:
                self._unreleased.append(lock)
            except TablelockError:
                pass  # fenced, expired, paid: gone anyway

    def _release_later(self, lock: Lock) -> None:
        self._unreleased.append(lock)

    async def _wait_connected(self) -> None:
        await self._up.wait()

    # --- events -------------------------------------------------------------------------------

    def on_event(self, callback: Callable[[Frame], None]) -> Callable[[], None]:
        """Call `callback(frame)` for every raw event frame, direct ones included.

        Frames are as they arrive: after a reconnect some may repeat. Use a
        mirror for state; this is for `lock.contended` toasts and the like.
        """
        self._event_callbacks.append(callback)
        return lambda: (self._event_callbacks.remove(callback)
                        if callback in self._event_callbacks else None)

    def events(self) -> ChangeStream:
        """`async for change in client.events():` every raw event frame, as a Change."""
        return ChangeStream(self._event_streams)

    def _on_event(self, frame: Frame) -> None:
        channel = frame.get("channel")
        if channel:
            mirror = self._mirrors.get(channel)
            if mirror is not None:
                mirror._feed(frame)
            if frame.get("event") == "config.updated" and frame.get("config"):
                self.config = convert(frame["config"], StoreConfig)
        self._lock_event(frame)
        change = Change(channel or "", str(frame.get("event", "")), frame.get("seq"), frame)
        for callback in list(self._event_callbacks):
            try:
                callback(frame)
            except Exception:
                log.exception("event callback failed")
        for stream in list(self._event_streams):
            stream._put(change)

    def _lock_event(self, frame: Frame) -> None:
        name = frame.get("event")
        if name == "lock.contended":
            self._lock_contended(frame)
            return
        if name == "lock.forced":
            reason = "forced"
        elif name == "lock.expired":
            reason = "expired"
        elif name == "lock.released":
            reason = str(frame.get("reason") or "released")
        else:
            return
        lock = frame.get("lock") or {}
        if isinstance(lock.get("token"), int):
            self._lock_ended(str(lock.get("order_id")), lock["token"], reason)

    def _lock_contended(self, frame: Frame) -> None:
        try:
            contention = convert(frame, Contention)
        except ValueError:
            log.warning("unreadable lock.contended: %.200r", frame)
            return
        for handle in list(self._handles.get((contention.lock.order_id,
                                              contention.lock.token), ())):
            handle._contended(contention)

    def _lock_ended(self, order_id: str, token: int, reason: str) -> None:
        key = (order_id, token)
        self._ended[key] = reason
        while len(self._ended) > 512:
            self._ended.popitem(last=False)
        for handle in list(self._handles.get(key, ())):
            handle._mark_lost(reason)

    def _register(self, handle: LockHandle) -> None:
        assert handle.lock is not None
        key = (handle.order_id, handle.lock.token)
        ended = self._ended.get(key)
        if ended is not None:
            handle._mark_lost(ended)
            return
        self._handles.setdefault(key, set()).add(handle)
        if not self.connected:
            handle._connection_down()

    def _unregister(self, handle: LockHandle) -> None:
        if handle.lock is None:
            return
        key = (handle.order_id, handle.lock.token)
        handles = self._handles.get(key)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._handles[key]

    # --- order.fetch (ERP side) -----------------------------------------------------------------

    def serve_order_fetch(self, handler: FetchHandler) -> None:
        """Answer the broker's `order.fetch` with `handler(params)` (sync or async).

        `params` is `{"order_id": ...}` or `{"table_id": ...}`; return the order
        (an Order or a mapping), or None when there is no such order. A sync
        handler runs in a worker thread, so a slow ERP database does not stall
        the connection. The broker asks the store's `erp_main`, else a terminal
        that connected with `order_authority=True`.
        """
        if self.terminal.role != "erp_main" and not self._conn.order_authority:
            raise ValueError("only an erp_main terminal is asked for orders: connect another "
                             "role with order_authority=True to serve order.fetch")
        self._fetch_handler = handler

    async def _answer_rpc(self, frame: Frame) -> None:
        rid = frame.get("rid")
        handler = self._fetch_handler
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
            await self._conn.send({"type": "rpc.result", "rid": rid, **answer})

    # --- requests ---------------------------------------------------------------------------------

    async def _request(self, type_: str, **params: Any) -> Frame:
        if self.closed:
            raise Disconnected("the client is closed")
        try:
            return await self._conn.request(type_, params)
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
        """The broker's time (ms since the epoch); also refreshes the clock offset."""
        sent = now_ms()
        reply = await self._request("ping")
        server_time = int(reply["server_time"])
        self._offset_ms = server_time - (sent + now_ms()) // 2
        return server_time

    async def refresh_token(self, token: str | None = None) -> int:
        """`token.refresh`: a new token for this terminal before the current one ends.

        The broker closes a connection when its token expires. Without `token`
        the token source given to connect() is asked. The new token is also
        used for later reconnects. Returns its expiry (ms since the epoch).
        """
        if token is None:
            token = await self._conn._token()
        reply = await self._request("token.refresh", token=token)
        if isinstance(self._conn.token, str):
            self._conn.token = token
        return int(reply["expires_at"])

    async def subscribe(self, channel: str) -> Mirror:
        """Subscribe and return the channel's live mirror (the same one if already subscribed)."""
        existing = self._mirrors.get(channel)
        if existing is not None:
            return existing
        kind = StoreMirror if channel.startswith("store:") else OrderMirror
        return await self._subscribe(channel, kind)

    async def subscribe_order(self, order_id: str) -> OrderMirror:
        mirror = self._mirrors.get(self.order_channel(order_id))
        if isinstance(mirror, OrderMirror):
            return mirror
        return await self._subscribe(self.order_channel(order_id), OrderMirror)

    async def subscribe_store(self) -> StoreMirror:
        mirror = self._mirrors.get(self.store_channel)
        if isinstance(mirror, StoreMirror):
            return mirror
        return await self._subscribe(self.store_channel, StoreMirror)

    async def _subscribe(self, channel: str, kind: type[M]) -> M:
        if self.closed or not self.connected:
            raise Disconnected("not connected to the broker")
        mirror = kind(channel, self._resync)
        self._mirrors[channel] = mirror  # before the request: its events must find it
        gen = mirror._begin_sync()
        try:
            reply = await self._request("subscribe", channel=channel)
        except BaseException:
            if self._mirrors.get(channel) is mirror:
                del self._mirrors[channel]
            raise
        if isinstance(mirror, StoreMirror):
            mirror.config = self.config
        mirror._apply_subscribe(gen, reply, None)
        return mirror

    async def unsubscribe(self, channel: str) -> None:
        mirror = self._mirrors.pop(channel, None)
        if mirror is not None:
            mirror._close()
        if self.connected:
            await self._request("unsubscribe", channel=channel)

    def mirror(self, channel: str) -> Mirror | None:
        return self._mirrors.get(channel)

    async def check(self, order_id: str, action: str) -> CheckResult:
        """Would `action` be allowed now? Never raises for a lock conflict: see `.error`."""
        reply = await self._request("check", order_id=order_id, action=action)
        return convert({k: v for k, v in reply.items() if k not in ("id", "ok")}, CheckResult)

    async def get_order(self, order_id: str | None = None, *, table_id: str | None = None,
                        fresh: bool = False) -> OrderView:
        """The order and its locks; `fresh=True` pulls it from the ERP first."""
        reply = await self._request("order.get", order_id=order_id, table_id=table_id,
                                    fresh=True if fresh else None)
        return convert({"order": reply.get("order"), "locks": reply.get("locks") or []},
                       OrderView)

    async def publish_order(self, order: OrderLike, change: str, token: int | None = None,
                            force: bool = False, *, operator: str | None = None,
                            reason: str | None = None) -> Order:
        """`order.publish` (ERP): the whole order as the ERP has it, with a grown version."""
        reply = await self._request("order.publish", order=as_wire(order), change=change,
                                    token=token, force=True if force else None,
                                    operator=operator, reason=reason)
        return convert(reply["order"], Order)

    def lock(self, order_id: str, kind: str, *, force: bool = False,
             operator: str | None = None, reason: str | None = None) -> LockHandle:
        """A lock handle: `async with client.lock(...) as lock:` or `lock = await client.lock(...)`.

        `force=True` revokes a conflicting lock (ERP and manager only) and must be
        the application's explicit choice, after the user confirmed the prompt.
        """
        return LockHandle(self, order_id, kind, force=force, operator=operator, reason=reason)

    async def acquire(self, order_id: str, kind: str, *, force: bool = False,
                      operator: str | None = None, reason: str | None = None) -> LockHandle:
        """Take a lock now; release it with `await handle.release()`."""
        return await self.lock(order_id, kind, force=force, operator=operator, reason=reason)

    async def renew(self, order_id: str, kind: str, token: int) -> Lock | None:
        reply = await self._request("lock.renew", order_id=order_id, kind=kind, token=token)
        return convert(reply["lock"], Lock) if reply.get("lock") else None

    async def release(self, order_id: str, kind: str, token: int | None = None, *,
                      force: bool = False, operator: str | None = None,
                      reason: str | None = None) -> Lock | None:
        """`lock.release`; with `force=True` (ERP, manager) revokes someone else's lock."""
        reply = await self._request("lock.release", order_id=order_id, kind=kind, token=token,
                                    force=True if force else None, operator=operator,
                                    reason=reason)
        return convert(reply["lock"], Lock) if reply.get("lock") else None

    async def complete_payment(self, order_id: str, *, token: int | None, version: int,
                               amount_cents: int, payment_ref: str) -> PaymentResult:
        """`payment.complete`; retrying with the same `payment_ref` returns the same success.

        An ERP or manager holder records its own counter payment here. An `h5`
        session gets Forbidden at once, without asking the broker: a phone's
        payment is recorded by the payment service (`PaymentService`).
        """
        if self.terminal.role == "h5":
            raise Forbidden(PHONE_NEVER_PAYS)
        try:
            reply = await self._request("payment.complete", order_id=order_id, token=token,
                                        version=version, amount_cents=amount_cents,
                                        payment_ref=payment_ref)
        except OutcomeUnknown as unknown:
            view = unknown.view
            if view is not None and view.order is not None and view.order.status == "paid":
                self._order_paid(order_id)
            raise
        self._order_paid(order_id)
        return convert({"order": reply["order"], "payment": reply.get("payment")},
                       PaymentResult)

    def _order_paid(self, order_id: str) -> None:
        """Paying ends every lock of the order (reason `paid`), ours included."""
        for (oid, token), _ in list(self._handles.items()):
            if oid == order_id:
                self._lock_ended(oid, token, "paid")

    # --- helpers ----------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
