"""A simulated screen on the connection of connection.py: the locks it believes it holds, and
the payments it sees through to a definite answer, retrying a lost reply with its ref."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .connection import Connection
from .settings import Frame
from .store import StoreSim

if TYPE_CHECKING:
    from .run import Run


@dataclass
class Pay:
    """A payment.complete the terminal must see through to a definite answer."""

    store_id: str
    order_id: str
    token: int
    version: int
    amount: int
    ref: str
    attempts: int = 0


class Screen(Connection):
    """One simulated screen: its connection, the locks it believes it holds, and the payments
    it must see through to a definite answer. Its habits are its role's (erp.py, phone.py,
    manager.py)."""

    def __init__(self, run: Run, store: StoreSim, role: str, sub: str, home: int,
                 table: str | None = None) -> None:
        super().__init__(run, store, role, sub, home, table)
        self.held: dict[tuple[str, str], int] = {}
        self.uncertain: list[Pay] = []
        self.busy = False

    def learn(self, frame: Frame) -> None:
        """What a screen does with an event beyond its mirror."""
        name = frame["event"]
        if name in ("lock.released", "lock.expired", "lock.forced"):
            self.forget_lock(frame.get("lock"))
        elif name == "order.paid":
            order = frame["order"]
            for kind in ("order", "payment", "presettle"):
                self.held.pop((order["order_id"], kind), None)

    def forget_lock(self, lock: Frame | None) -> None:
        if lock and lock["holder"]["terminal_id"] == self.sub:
            key = (lock["order_id"], lock["kind"])
            if self.held.get(key) == lock["token"]:
                del self.held[key]

    async def step(self) -> None:
        """One action, when the traffic picks this screen: an uncertain payment first."""
        self.busy = True
        try:
            if self.uncertain:
                await self.complete(self.uncertain[0])
            else:
                await self.habit()
        except Exception as exc:
            if len(self.run.stats.reader_errors) < 5:
                self.run.stats.reader_errors.append(f"step {type(exc).__name__}: {exc}")
        finally:
            self.busy = False

    async def habit(self) -> None:
        raise NotImplementedError  # each role has its own

    async def pay(self, order_id: str, token: int, version: int, amount: int) -> None:
        payment = Pay(self.store.store_id, order_id, token, version, amount,
                      f"{self.store.store_id}-{self.sub}-{next(self.run.refs)}")
        self.uncertain.append(payment)
        await self.complete(payment)

    async def record_payment(self, p: Pay) -> Frame | None:
        """payment.complete as this terminal sends it: an ERP or manager records its own."""
        return await self.req("payment.complete", order_id=p.order_id, token=p.token,
                              version=p.version, amount_cents=p.amount, payment_ref=p.ref)

    async def complete(self, p: Pay) -> None:
        """payment.complete until a definite answer: a lost reply is retried with its ref."""
        p.attempts += 1
        reply = await self.record_payment(p)
        if reply is None or (not reply.get("ok") and reply["error"]["code"] in (
                "UNAVAILABLE", "RATE_LIMITED")):
            if p.attempts >= 12 and not self.run.final:
                self.uncertain.remove(p)
                self.run.stats.payments_unresolved += 1
            return
        self.uncertain.remove(p)
        if not reply.get("ok"):
            self.run.stats.payments_rejected[reply["error"]["code"]] += 1
            return
        self._paid(p, reply, retry=p.attempts > 1)
        if self.rng.random() < 0.3:  # the network dropped the answer: the same ref again
            again = await self.record_payment(p)
            if again is not None and (again.get("ok") or again["error"]["code"] not in (
                    "UNAVAILABLE", "RATE_LIMITED")):
                self._paid(p, again, retry=True)

    def _paid(self, p: Pay, reply: Frame, retry: bool) -> None:
        check = self.run.checks["payments"]
        if not reply.get("ok"):
            check.fail(f"{p.store_id}/{p.order_id}: retry of successful ref {p.ref} answered "
                       f"{reply['error']['code']}")
            return
        got = reply["payment"]["payment_ref"]
        if got != p.ref:
            check.fail(f"{p.store_id}/{p.order_id}: payment {p.ref} answered with {got}")
        if retry:
            self.run.stats.payment_retries_ok += 1
        else:
            self.run.stats.payments_ok += 1
        self.run.paid_ok[(p.store_id, p.order_id)].add(p.ref)
        for kind in ("order", "payment", "presettle"):
            self.held.pop((p.order_id, kind), None)
        self.store.mark_paid(p.order_id)

    async def release(self, order_id: str, kind: str, token: int) -> None:
        reply = await self.req("lock.release", order_id=order_id, kind=kind, token=token)
        if reply is not None and (reply.get("ok") or reply["error"]["code"] in (
                "FENCED", "LOCK_EXPIRED", "NOT_HOLDER", "ORDER_PAID")
                ) and self.held.get((order_id, kind)) == token:
            del self.held[(order_id, kind)]
