"""A blocking facade for ERP programs that are not asyncio.

The asyncio client runs on its own event loop in a background thread; each
call here hands a coroutine to that loop and waits for its result. Renewals,
reconnects and `order.fetch` answers go on in the background meanwhile.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from .client import Client, FetchHandler, OrderLike
from .client import connect as _aconnect
from .connection import Frame, TokenSource
from .locks import LockHandle
from .mirror import Change, ChangeSink, Mirror, OrderMirror, StoreMirror
from .model import (
    CheckResult,
    Contention,
    Lock,
    Order,
    OrderView,
    PaymentResult,
    StoreConfig,
    Terminal,
)

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

    def _stop_on_loop(self, stop: Callable[[], None]) -> None:
        """Call a callback's stop function on the loop, without waiting (callbacks may)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(stop)

    def _on_loop(self, action: Callable[[], T]) -> T:
        """Run `action` on the client's loop, where the mirrors and handles live."""
        async def run() -> T:
            return action()
        return self._call(run())

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

    def wait_fresh(self, timeout: float | None = None) -> None:
        """Block until connected and every mirror is live again."""
        self._call(self.client.wait_fresh(timeout))

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

    def subscribe(self, channel: str) -> SyncOrderMirror | SyncStoreMirror:
        """The channel's live mirror (the same one if already subscribed)."""
        return self._wrap(self._call(self.client.subscribe(channel)))

    def subscribe_order(self, order_id: str) -> SyncOrderMirror:
        return SyncOrderMirror(self, self._call(self.client.subscribe_order(order_id)))

    def subscribe_store(self) -> SyncStoreMirror:
        return SyncStoreMirror(self, self._call(self.client.subscribe_store()))

    def mirror(self, channel: str) -> SyncOrderMirror | SyncStoreMirror | None:
        """The mirror of a subscribed channel, or None."""
        mirror = self._on_loop(lambda: self.client.mirror(channel))
        return self._wrap(mirror) if mirror is not None else None

    def _wrap(self, mirror: Mirror) -> SyncOrderMirror | SyncStoreMirror:
        if isinstance(mirror, StoreMirror):
            return SyncStoreMirror(self, mirror)
        assert isinstance(mirror, OrderMirror)
        return SyncOrderMirror(self, mirror)

    def unsubscribe(self, channel: str) -> None:
        self._call(self.client.unsubscribe(channel))

    def on_event(self, callback: Callable[[Frame], None]) -> Callable[[], None]:
        """Call `callback(frame)` for every raw event frame, on the client's thread.

        Keep it short (hand work to your own thread): it runs where the socket
        is read. Returns a function that stops the calls.
        """
        stop = self._on_loop(lambda: self.client.on_event(callback))
        return lambda: self._stop_on_loop(stop)

    def events(self) -> BlockingChangeStream:
        """`for change in client.events():` every raw event frame, as a Change."""
        return BlockingChangeStream(self, self.client.event_sinks)

    def lock(self, order_id: str, kind: str, *, force: bool = False,
             operator: str | None = None, reason: str | None = None) -> SyncLock:
        """Take the lock now (raising the typed refusal) and return its handle.

        `with client.lock(order_id, "payment") as lock:` releases it on leaving;
        `lock = client.lock(...)` holds it until `lock.release()`. ERP locks are
        renewed in the background meanwhile.
        """
        return SyncLock(self, self.client.lock(order_id, kind, force=force, operator=operator,
                                               reason=reason)).acquire()

    def acquire(self, order_id: str, kind: str, *, force: bool = False,
                operator: str | None = None, reason: str | None = None) -> SyncLock:
        """The same as `lock()`."""
        return self.lock(order_id, kind, force=force, operator=operator, reason=reason)


class BlockingChangeStream:
    """`for change in stream:` on any thread; it ends when the mirror or the client closes."""

    def __init__(self, owner: SyncClient, sinks: set[ChangeSink]) -> None:
        self._owner = owner
        self._sinks = sinks
        self._queue: queue.SimpleQueue[Change | None] = queue.SimpleQueue()
        owner._on_loop(lambda: sinks.add(self))

    def put(self, change: Change | None) -> None:
        self._queue.put(change)

    def get(self, timeout: float | None = None) -> Change:
        """The next change; TimeoutError if none comes within `timeout` s."""
        try:
            change = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no change within {timeout} s") from None
        if change is None:
            self._queue.put(None)  # the stream stays ended
            raise StopIteration
        return change

    def __iter__(self) -> BlockingChangeStream:
        return self

    def __next__(self) -> Change:
        return self.get()

    def close(self) -> None:
        self._owner._loop.call_soon_threadsafe(self._sinks.discard, self)


class SyncMirror:
    """A live mirror for threads. Reads are copies taken on the client's loop, so each is
    consistent; the mirror itself is updated there in the background."""

    def __init__(self, owner: SyncClient, mirror: Mirror) -> None:
        self._owner = owner
        self.mirror = mirror  # the asyncio mirror underneath
        self.channel = mirror.channel

    @property
    def seq(self) -> int:
        return self.mirror.seq

    @property
    def stale(self) -> bool:
        return self.mirror.stale

    def on_change(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call `callback(change)` on every change, on the client's thread; returns a stop."""
        stop = self._owner._on_loop(lambda: self.mirror.on_change(callback))
        return lambda: self._owner._stop_on_loop(stop)

    def changes(self) -> BlockingChangeStream:
        """`for change in mirror.changes():` every change from now on."""
        return BlockingChangeStream(self._owner, self.mirror.sinks)

    def wait_fresh(self, timeout: float | None = None) -> None:
        self._owner._call(self.mirror.wait_fresh(timeout))


class SyncOrderMirror(SyncMirror):
    """`order:<store>:<order>`: the order (None until the ERP publishes it) and its locks."""

    mirror: OrderMirror

    @property
    def order(self) -> Order | None:
        return self.mirror.order

    @property
    def locks(self) -> dict[str, Lock]:
        """kind -> lock."""
        return self._owner._on_loop(lambda: dict(self.mirror.locks))


class SyncStoreMirror(SyncMirror):
    """`store:<store>`: every open order, their locks, the online terminals and the config."""

    mirror: StoreMirror

    @property
    def orders(self) -> dict[str, Order]:
        return self._owner._on_loop(lambda: dict(self.mirror.orders))

    @property
    def locks(self) -> dict[tuple[str, str], Lock]:
        """(order_id, kind) -> lock."""
        return self._owner._on_loop(lambda: dict(self.mirror.locks))

    @property
    def terminals(self) -> dict[str, Terminal]:
        return self._owner._on_loop(lambda: dict(self.mirror.terminals))

    @property
    def config(self) -> StoreConfig | None:
        return self.mirror.config

    def locks_of(self, order_id: str) -> dict[str, Lock]:
        """The locks of one order, by kind."""
        return self._owner._on_loop(lambda: self.mirror.locks_of(order_id))


class SyncLock:
    """A lock handle for threads: `lost` is a threading.Event."""

    def __init__(self, owner: SyncClient, handle: LockHandle) -> None:
        self._owner = owner
        self.handle = handle
        self.lost = threading.Event()
        self._watching = False

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
        """Take the lock if not held yet (`client.lock()` already did)."""
        async def take() -> None:
            await self.handle.acquire()
            if not self._watching:
                self._watching = True
                self.handle.add_lost_callback(lambda _: self.lost.set())
        self._owner._call(take())
        return self

    def on_contended(self, callback: Callable[[Contention], None]) -> Callable[[], None]:
        """Call `callback(contention)`, on the client's thread, whenever someone is refused
        because of this lock; returns a function that stops the calls."""
        stop = self._owner._on_loop(lambda: self.handle.on_contended(callback))
        return lambda: self._owner._stop_on_loop(stop)

    def release(self) -> None:
        self._owner._call(self.handle.release())

    def complete_payment(self, payment_ref: str, *, version: int | None = None,
                         amount_cents: int | None = None) -> PaymentResult:
        return self._owner._call(self.handle.complete_payment(
            payment_ref, version=version, amount_cents=amount_cents))

    def __enter__(self) -> SyncLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
