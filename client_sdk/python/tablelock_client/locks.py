"""Lock handles: acquire, keep alive, release, and tell when the lock is lost."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import Disconnected, TablelockError
from .model import Contention, Lock, Order, PaymentResult, convert

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("tablelock_client")

# Refusals of a renew that mean the lock is no longer ours, and what to call that.
GONE: dict[str, str] = {
    "FENCED": "forced",
    "LOCK_EXPIRED": "expired",
    "NOT_HOLDER": "gone",
    "NOT_FOUND": "gone",
    "ORDER_PAID": "paid",
}


class LockHandle:
    """One lock, taken with `async with client.lock(order_id, kind) as lock:`
    or `lock = await client.lock(order_id, kind)` (then `await lock.release()`).

    A handle that is neither entered nor awaited holds nothing: using it
    raises RuntimeError, and dropping it warns (like an un-awaited coroutine).
    Entering acquires (raising the typed refusal, e.g. PaymentLocked with
    `can_force`); ERP locks are renewed at a third of their TTL; leaving
    releases with the lock's token. `lost` is set when the lock ends other
    than by this handle's release: `lost_reason` is `forced`, `expired`,
    `released`, `upgraded`, `paid`, `holder_disconnected`, `disconnected`
    (the connection stayed down past the grace), `gone` or `closed`.
    `on_contended` tells when someone was refused because of this lock (a
    customer trying to pay while the cashier holds it, say).
    """

    def __init__(self, client: Client, order_id: str, kind: str, *, force: bool = False,
                 operator: str | None = None, reason: str | None = None) -> None:
        self._client = client
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
        # h5 payment locks cannot be renewed (PROTOCOL.md section 2): they end at their TTL.
        return (self.lock is not None and self.lock.holder.role != "h5"
                and self._client.terminal.role != "h5")

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
        reply = await self._client._request(
            "lock.acquire", order_id=self.order_id, kind=self.kind,
            force=True if self.force else None, operator=self.operator, reason=self.reason)
        self.enforced = bool(reply.get("enforced", True))
        self.lock = convert(reply["lock"], Lock) if reply.get("lock") else None
        self.order = convert(reply["order"], Order) if reply.get("order") else None
        self.released_locks = [convert(raw, Lock) for raw in reply.get("released") or ()]
        self.forced_locks = [convert(raw, Lock) for raw in reply.get("forced") or ()]
        self._state = "held"
        for mine in self.released_locks:  # taking the payment lock gave up our order lock
            self._client._lock_ended(mine.order_id, mine.token, "upgraded")
        if self.lock is not None:
            self._client._register(self)
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
            await self._client.release(self.order_id, self.kind, self.lock.token)
        except Disconnected:
            # Sent once the connection is back: a lock we reconnect to within the
            # grace would otherwise stay until its TTL.
            self._client._release_later(self.lock)
        except TablelockError as exc:
            if exc.code not in GONE:
                log.warning("releasing %s/%s: %s", self.order_id, self.kind, exc)

    async def renew(self) -> Lock | None:
        """Renew now (the handle does this by itself for ERP locks)."""
        self._require_acquired()
        if self.lock is None:
            return None
        lock = await self._client.renew(self.order_id, self.kind, self.lock.token)
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
        return await self._client.complete_payment(
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

    # --- driven by the client ---------------------------------------------------------------

    def _finish(self, state: str) -> None:
        self._state = state
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not asyncio.current_task():
            renewer.cancel()
        self._client._unregister(self)

    def _mark_lost(self, reason: str) -> None:
        if self._state != "held":
            return
        self._finish("lost")
        self.lost_reason = reason
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
        """Start the clock: past the grace (ERP) or the TTL (h5) the lock is gone."""
        if not self.held or self.lock is None or self._grace is not None:
            return
        remaining = self.lock.expires_at - self._client.server_now_ms()
        if self.lock.holder.role != "h5":  # an h5 lock survives a dropped socket until its TTL
            remaining = min(remaining, self._client.config.disconnect_grace_ms)
        self._grace = asyncio.get_running_loop().call_later(max(0.0, remaining / 1000),
                                                            self._given_up)

    def _given_up(self) -> None:
        self._grace = None
        if self.held and self.lock is not None:
            # Our clock guessed the broker's grace: if we come back just in time after
            # all, release it then rather than leave it to its TTL.
            self._client._release_later(self.lock)
        self._mark_lost("disconnected")

    def _connection_up(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _renew_delay(self) -> float:
        assert self.lock is not None
        remaining = self.lock.expires_at - self._client.server_now_ms()
        ttl = self._client.config.erp_lock_ttl_ms
        return max(0.25, min(ttl, remaining) / 3 / 1000)

    async def _keep_alive(self) -> None:
        while self.held:
            await asyncio.sleep(self._renew_delay())
            if not self.held:
                return
            await self._client._wait_connected()
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
