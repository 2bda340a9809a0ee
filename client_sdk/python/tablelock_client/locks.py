"""Lock handles: acquire, keep alive, release, and tell when the lock is lost.

`LockHandle` is what applications hold; `HeldLocks` is the client's register of
them, which routes the broker's lock events and the connection's ups and downs
to the handles. Both talk to the rest of the client through the public methods
of its Session, Requests and Payments.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .connection import Frame
from .constants import LOST_LOCK_REASONS
from .errors import Disconnected, NotFound, TablelockError
from .model import (
    Contention,
    Lock,
    Order,
    OrderView,
    PaymentResult,
    capability,
    convert,
    lock_ttl_ms,
)
from .requests import Requests
from .session import Session

if TYPE_CHECKING:
    from .payments import Payments

log = logging.getLogger("tablelock_client")

# Refusals of a renew that mean the lock is no longer ours, and what to call that.
GONE: dict[str, str] = {
    "FENCED": "forced",
    "LOCK_EXPIRED": "expired",
    "NOT_HOLDER": "gone",
    "NOT_FOUND": "gone",
    "ORDER_PAID": "paid",
}
ENDED_REMEMBERED = 512  # locks that ended lately, in case the news beats the acquire reply


class LockHandle:
    """One lock, taken with `async with client.lock(order_id, kind) as lock:`
    or `lock = await client.lock(order_id, kind)` (then `await lock.release()`).

    A handle that is neither entered nor awaited holds nothing: using it
    raises RuntimeError, and dropping it warns (like an un-awaited coroutine).
    Entering acquires (raising the typed refusal, e.g. PaymentLocked with
    `can_force`); locks of roles that may renew are renewed at a third of
    their TTL; leaving releases with the lock's token. `lost` is set when the
    lock ends other than by this handle's release: `lost_reason` is one of
    `LOST_LOCK_REASONS` (`released`, `upgraded`, `paid`, `holder_disconnected`,
    `expired`, `forced`, `gone`). `holder_disconnected` and `expired` are also
    said when the connection stayed down past the grace or the TTL; `gone`
    when the lock is no longer there, cause unknown (or the client closed).
    `on_contended` tells when someone was refused because of this lock (a
    customer trying to pay while the cashier holds it, say).
    """

    def __init__(self, held: HeldLocks, payments: Payments, order_id: str, kind: str, *,
                 force: bool = False, operator: str | None = None,
                 reason: str | None = None) -> None:
        self._held = held
        self._payments = payments
        self.order_id = order_id
        self.kind = kind
        self.force = force
        self.operator = operator
        self.reason = reason
        self.lock: Lock | None = None
        self.order: Order | None = None
        self.enforced = True
        self.released_locks: list[Lock] = []  # our own locks given up in the same step
        self.forced_locks: list[Lock] = []  # other terminals' locks this force revoked
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._state = "new"  # new -> held -> released | lost
        self._tried = False  # acquire was called (a refusal leaves the state "new")
        self._renewer: asyncio.Task[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._callbacks: list[Callable[[LockHandle], None]] = []
        self._contended_callbacks: list[Callable[[Contention], None]] = []

    def __repr__(self) -> str:
        token = self.lock.token if self.lock is not None else None
        return f"<LockHandle {self.order_id}/{self.kind} token={token} state={self._state}>"

    def __del__(self) -> None:
        if not getattr(self, "_tried", True):
            warnings.warn(f"the lock {self.order_id}/{self.kind} was never acquired: use "
                          "`async with client.lock(...)` or `await client.lock(...)`",
                          RuntimeWarning, stacklevel=2)

    def _require_acquired(self) -> None:
        if self._state == "new":
            raise RuntimeError(f"the lock {self.order_id}/{self.kind} was not acquired: use "
                               "`async with client.lock(...) as lock` or "
                               "`lock = await client.lock(...)`")

    @property
    def token(self) -> int | None:
        """The fencing token: every write made under this lock carries it.

        None when the broker enforces nothing (`strong_link` off); RuntimeError
        on a handle that was never acquired.
        """
        self._require_acquired()
        return self.lock.token if self.lock is not None else None

    @property
    def held(self) -> bool:
        return self._state == "held"

    @property
    def renewable(self) -> bool:
        # An h5 payment lock, say, ends at its TTL (PROTOCOL.md section 2): the table says.
        return self.lock is not None and bool(capability(self.lock.holder.role, "renew"))

    def add_lost_callback(self, callback: Callable[[LockHandle], None]) -> None:
        """Call `callback(handle)` when the lock is lost (at once if it already was)."""
        if self._state == "lost":
            callback(self)
        else:
            self._callbacks.append(callback)

    def on_contended(self, callback: Callable[[Contention], None]) -> Callable[[], None]:
        """Call `callback(contention)` whenever someone is refused because of this lock.

        The broker sends `lock.contended` to the holder alone (coalesced per
        requester), so that a cashier sees a customer trying to pay. Returns a
        function that stops the calls.
        """
        self._contended_callbacks.append(callback)
        return lambda: (self._contended_callbacks.remove(callback)
                        if callback in self._contended_callbacks else None)

    # --- acquire and release ---------------------------------------------------------------

    async def acquire(self) -> LockHandle:
        if self._state == "held":
            return self
        if self._state != "new":
            raise RuntimeError("a lock handle is used once: call client.lock() again")
        self._tried = True
        reply = await self._held.requests.request(
            "lock.acquire", order_id=self.order_id, kind=self.kind,
            force=True if self.force else None, operator=self.operator, reason=self.reason)
        self.enforced = bool(reply.get("enforced", True))
        self.lock = convert(reply["lock"], Lock) if reply.get("lock") else None
        self.order = convert(reply["order"], Order) if reply.get("order") else None
        self.released_locks = [convert(raw, Lock) for raw in reply.get("released") or ()]
        self.forced_locks = [convert(raw, Lock) for raw in reply.get("forced") or ()]
        self._state = "held"
        for mine in self.released_locks:  # taking the payment lock gave up our order lock
            self._held.lock_ended(mine.order_id, mine.token, "upgraded")
        if self.lock is not None:
            self._held.add(self)
            if self.held and self.renewable:
                self._renewer = asyncio.create_task(self._keep_alive(),
                                                    name=f"tablelock-renew-{self.order_id}")
        return self

    async def release(self) -> None:
        """Release the lock with its token. Idempotent; a lock already gone is not an error."""
        self._require_acquired()
        if self._state != "held":
            return
        self._finish("released")
        if self.lock is None:
            return
        try:
            await self._held.requests.release(self.order_id, self.kind, self.lock.token)
        except Disconnected:
            # Sent once the connection is back: a lock we reconnect to within the
            # grace would otherwise stay until its TTL.
            self._held.release_later(self.lock)
        except TablelockError as exc:
            if exc.code not in GONE:
                log.warning("releasing %s/%s: %s", self.order_id, self.kind, exc)

    async def renew(self) -> Lock | None:
        """Renew now (the handle does this by itself for the roles that may renew)."""
        self._require_acquired()
        if self.lock is None:
            return None
        lock = await self._held.requests.renew(self.order_id, self.kind, self.lock.token)
        if lock is None:  # strong link was turned off: the broker keeps no locks now
            self._mark_lost("released")
        elif self.held:
            self.lock = lock
        return lock

    async def complete_payment(self, payment_ref: str, *, version: int | None = None,
                               amount_cents: int | None = None) -> PaymentResult:
        """`payment.complete` under this lock, at the order's version and amount by default.

        For an ERP or manager holder. A phone (`h5`) gets Forbidden: the payment
        service records its payment (`PaymentService`).
        """
        self._require_acquired()
        if self.order is None and (version is None or amount_cents is None):
            raise ValueError("version and amount_cents are needed: the order is not known")
        return await self._payments.complete_payment(
            self.order_id, token=self.token,
            version=version if version is not None else self.order.version,  # type: ignore[union-attr]
            amount_cents=amount_cents if amount_cents is not None
            else self.order.amount_cents,  # type: ignore[union-attr]
            payment_ref=payment_ref)

    def __await__(self) -> Generator[Any, None, LockHandle]:
        return self.acquire().__await__()

    async def __aenter__(self) -> LockHandle:
        return await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.release()

    # --- driven by HeldLocks ----------------------------------------------------------------

    def _finish(self, state: str) -> None:
        self._state = state
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not asyncio.current_task():
            renewer.cancel()
        self._held.discard(self)

    def _mark_lost(self, reason: str) -> None:
        if self._state != "held":
            return
        self._finish("lost")
        # A reason this SDK does not know yet (a newer broker's) is reported as "gone".
        self.lost_reason = reason if reason in LOST_LOCK_REASONS else "gone"
        self.lost.set()
        for callback in self._callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("lost callback failed")

    def _contended(self, contention: Contention) -> None:
        for callback in list(self._contended_callbacks):
            try:
                callback(contention)
            except Exception:
                log.exception("contended callback failed")

    def _connection_down(self) -> None:
        """Start the clock: past the disconnect grace or the TTL the lock is gone."""
        if not self.held or self.lock is None or self._grace is not None:
            return
        remaining = self.lock.expires_at - self._held.session.server_now_ms()
        reason = "expired"
        grace = self._held.session.config.disconnect_grace_ms
        if capability(self.lock.holder.role, "disconnect_grace") and grace < remaining:
            remaining, reason = grace, "holder_disconnected"
        self._grace = asyncio.get_running_loop().call_later(
            max(0.0, remaining / 1000), self._given_up, reason)

    def _given_up(self, reason: str) -> None:
        self._grace = None
        if self.held and self.lock is not None:
            # Our clock guessed the broker's: if we come back just in time after all,
            # release it then rather than leave it to its TTL.
            self._held.release_later(self.lock)
        self._mark_lost(reason)

    def _connection_up(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _renew_delay(self) -> float:
        assert self.lock is not None
        remaining = self.lock.expires_at - self._held.session.server_now_ms()
        ttl = lock_ttl_ms(self._held.session.config, self.lock.holder.role)
        return max(0.25, min(ttl, remaining) / 3 / 1000)

    async def _keep_alive(self) -> None:
        while self.held:
            await asyncio.sleep(self._renew_delay())
            if not self.held:
                return
            await self._held.session.wait_connected()
            try:
                await self.renew()
            except Disconnected:
                continue
            except TablelockError as exc:
                if exc.code in GONE:
                    self._mark_lost(GONE[exc.code])
                    return
                # UNAVAILABLE, RATE_LIMITED: the next try comes at a third of what is
                # left, so attempts get closer together as the expiry nears.
                log.warning("renewing %s/%s: %s", self.order_id, self.kind, exc)


class HeldLocks:
    """The handles of the locks this client holds, kept true across events and reconnects."""

    def __init__(self, session: Session, requests: Requests) -> None:
        self.session = session
        self.requests = requests
        self._handles: dict[tuple[str, int], set[LockHandle]] = {}
        self._ended: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._unreleased: list[Lock] = []

    def handles(self) -> list[LockHandle]:
        return [handle for handles in self._handles.values() for handle in handles]

    def add(self, handle: LockHandle) -> None:
        assert handle.lock is not None
        key = (handle.order_id, handle.lock.token)
        ended = self._ended.get(key)
        if ended is not None:
            handle._mark_lost(ended)
            return
        self._handles.setdefault(key, set()).add(handle)
        if not self.session.connected:
            handle._connection_down()

    def discard(self, handle: LockHandle) -> None:
        if handle.lock is None:
            return
        key = (handle.order_id, handle.lock.token)
        handles = self._handles.get(key)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._handles[key]

    def release_later(self, lock: Lock) -> None:
        """Release `lock` once the connection is back."""
        self._unreleased.append(lock)

    # --- how locks end --------------------------------------------------------------------------

    def lock_event(self, frame: Frame) -> None:
        """An event that reached the client: does it end or contend one of our locks?"""
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
            self.lock_ended(str(lock.get("order_id")), lock["token"], reason)

    def _lock_contended(self, frame: Frame) -> None:
        try:
            contention = convert(frame, Contention)
        except ValueError:
            log.warning("unreadable lock.contended: %.200r", frame)
            return
        for handle in list(self._handles.get((contention.lock.order_id,
                                               contention.lock.token), ())):
            handle._contended(contention)

    def lock_ended(self, order_id: str, token: int, reason: str) -> None:
        key = (order_id, token)
        self._ended[key] = reason
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        for handle in list(self._handles.get(key, ())):
            handle._mark_lost(reason)

    def order_paid(self, order_id: str) -> None:
        """Paying ends every lock of the order (reason `paid`), ours included."""
        for oid, token in list(self._handles):
            if oid == order_id:
                self.lock_ended(oid, token, "paid")

    # --- following the connection (a SessionPart) ----------------------------------------------

    def connection_up(self) -> Callable[[], Awaitable[None]]:
        for handle in self.handles():
            handle._connection_up()
        return self._catch_up

    def connection_down(self) -> None:
        for handle in self.handles():
            handle._connection_down()

    def shut(self) -> None:
        self._unreleased.clear()
        for handle in self.handles():
            handle._mark_lost("gone")

    async def _catch_up(self) -> None:
        await self._verify()
        await self._flush_releases()

    async def _verify(self) -> None:
        """Ask the broker whether the locks we held across the drop are still ours."""
        by_order: dict[str, list[LockHandle]] = {}
        for handle in self.handles():
            by_order.setdefault(handle.order_id, []).append(handle)
        for order_id, held in by_order.items():
            try:
                view = await self.requests.get_order(order_id)
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
                await self.requests.release(lock.order_id, lock.kind, lock.token)
            except Disconnected:
                self._unreleased.append(lock)
            except TablelockError:
                pass  # fenced, expired, paid: gone anyway
