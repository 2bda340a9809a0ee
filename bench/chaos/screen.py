"""A simulated screen's habits: what an erp_main, an erp_secondary, a manager or a phone (h5)
does when the traffic picks it, on the connection of connection.py."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .connection import Connection
from .http_client import http
from .mirror import Mirror
from .settings import H5_TTL_MS, Frame
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
    """One simulated screen: its connection, the locks it believes it holds, the payments it
    must see through to a definite answer, and its habits."""

    def __init__(self, run: Run, store: StoreSim, role: str, sub: str, home: int,
                 table: str | None = None) -> None:
        super().__init__(run, store, role, sub, home, table)
        self.held: dict[tuple[str, str], int] = {}
        self.uncertain: list[Pay] = []
        self.order_id: str | None = None  # h5: the order of its table it follows
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
            if self.role in ("erp_main", "erp_secondary"):
                self.store.mark_paid(order["order_id"])
        elif name == "order.updated" and self.role in ("erp_main", "erp_secondary"):
            self.store.learn(frame["order"])

    def forget_lock(self, lock: Frame | None) -> None:
        if lock and lock["holder"]["terminal_id"] == self.sub:
            key = (lock["order_id"], lock["kind"])
            if self.held.get(key) == lock["token"]:
                del self.held[key]

    async def step(self) -> None:
        self.busy = True
        try:
            if self.uncertain:
                await self.complete(self.uncertain[0])
            elif self.role == "h5":
                await self.h5_step()
            elif self.role == "manager":
                await self.manager_step()
            else:
                await self.erp_step()
        except Exception as exc:
            if len(self.run.stats.reader_errors) < 5:
                self.run.stats.reader_errors.append(f"step {type(exc).__name__}: {exc}")
        finally:
            self.busy = False

    async def h5_step(self) -> None:
        r = self.rng.random()
        mirror = self.mirrors.get(self.order_channel(self.order_id or ""))
        shown = json.loads(next(iter(mirror.orders.values()))) if mirror and mirror.orders else {}
        if self.order_id is None or r < 0.15 or (shown.get("status", "open") != "open"
                                                  and r < 0.6):
            self.run.stats.ops["h5.scan"] += 1
            await self.h5_scan(fresh=self.rng.random() < 0.4)
        elif r < 0.9:
            self.run.stats.ops["h5.pay"] += 1
            await self.h5_pay()
        else:
            self.run.stats.ops["h5.check"] += 1
            await self.req("check", order_id=self.order_id, action="pay")

    async def h5_scan(self, fresh: bool) -> None:
        reply = await self.req("order.get", timeout=8, table_id=self.table, fresh=fresh)
        if reply is not None and reply.get("ok") and reply.get("order"):
            order_id = reply["order"]["order_id"]
            if order_id != self.order_id:
                await self.follow(order_id)

    async def follow(self, order_id: str) -> None:
        """Watch another order of the table: subscribe to it, leave the old one."""
        old = self.order_id
        self.order_id = order_id
        channel = self.order_channel(order_id)
        self.mirrors[channel] = Mirror(channel)
        if old is not None:
            old_channel = self.order_channel(old)
            self.mirrors.pop(old_channel, None)
            await self.req("unsubscribe", channel=old_channel)
        link = self.link
        if link is None or not link.ready:
            return  # subscribed when the connection comes back
        reply = await self.subscribe(link, channel)
        if reply is None or not reply.get("ok"):
            self.abort(resume=False)  # come back and subscribe everything again

    async def h5_pay(self) -> None:
        assert self.order_id is not None
        order_id = self.order_id
        reply = await self.req("lock.acquire", timeout=8, order_id=order_id, kind="payment")
        if reply is None or not reply.get("ok"):
            if reply is not None and reply["error"]["code"] == "ORDER_PAID":
                await self.h5_scan(fresh=True)
            return
        self.run.note_grant(self, reply)
        lock, order = reply["lock"], reply["order"]
        self.held[(order_id, "payment")] = lock["token"]
        if self.rng.random() < 0.15:  # the customer closes the payment page
            await self.release(order_id, "payment", lock["token"])
            return
        if self.rng.random() < 0.08:  # ... or takes too long in the payment app
            await asyncio.sleep(H5_TTL_MS / 1000 + self.rng.uniform(0.3, 1.5))
        else:
            await asyncio.sleep(self.rng.uniform(0.1, 1.2))
        await self.pay(order_id, lock["token"], order["version"], order["amount_cents"])

    async def pay(self, order_id: str, token: int, version: int, amount: int) -> None:
        payment = Pay(self.store.store_id, order_id, token, version, amount,
                      f"{self.store.store_id}-{self.sub}-{next(self.run.refs)}")
        self.uncertain.append(payment)
        await self.complete(payment)

    async def record_payment(self, p: Pay) -> Frame | None:
        """payment.complete as this terminal may send it: an ERP or manager itself; a phone's
        through the platform's payment service (HTTP, role `service`), as the provider would."""
        if self.role != "h5":
            return await self.req("payment.complete", order_id=p.order_id, token=p.token,
                                  version=p.version, amount_cents=p.amount, payment_ref=p.ref)
        link = self.link
        if self.run.front is not None:
            port = self.run.front.port
        else:
            port = self.run.brokers[link.broker or 0 if link is not None else self.home].port
        body = {"token": p.token, "version": p.version, "amount_cents": p.amount,
                "payment_ref": p.ref}
        sent = time.monotonic()
        try:
            status, answer = await http(
                "POST", port, f"/v1/stores/{p.store_id}/orders/{p.order_id}/payment",
                self.run.mint(p.store_id, "service", "payment-service"), body)
        except (OSError, TimeoutError, ValueError, IndexError):
            status, answer = 0, None  # the broker is down: the service tries again later
        reply: Frame | None = None
        if isinstance(answer, dict) and status != 503:
            reply = {"ok": status == 200, **answer}
        self.run.history.record(p.store_id, "payment-service", "payment.complete",
                                {"order_id": p.order_id, "token": p.token,
                                 "payment_ref": p.ref}, sent, time.monotonic(), reply)
        code = "LOST" if reply is None else "OK" if reply["ok"] else reply["error"]["code"]
        self.run.stats.requests[("payment.service", code)] += 1
        return reply

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

    async def erp_step(self) -> None:
        store = self.store
        if store.unpublished and self.rng.random() < 0.8:
            self.run.stats.ops["erp.create"] += 1
            await self.publish_new(self.rng.choice(sorted(store.unpublished)))
            return
        if store.to_close and self.rng.random() < 0.5:
            self.run.stats.ops["erp.close"] += 1
            await self.close_order(self.rng.choice(sorted(store.to_close)))
            return
        open_orders = store.open_orders()
        if not open_orders:
            return
        order_id = self.rng.choice(open_orders)
        op = self.rng.choices(["edit", "add_items", "presettle", "pay", "release", "renew",
                               "get"], [22, 18, 10, 16, 12, 14, 8])[0]
        self.run.stats.ops[f"erp.{op}"] += 1
        if op == "edit":
            granted = await self.acquire(order_id, "order")
            if granted is None:
                return
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))
            token = granted["lock"]["token"]
            await self.publish(store.evolve(order_id, "modify"), "modify", token=token)
            if self.rng.random() < 0.75:
                await self.release(order_id, "order", token)
        elif op == "add_items":
            await self.publish(store.evolve(order_id, "add_items"), "add_items")
        elif op == "presettle":
            await self.acquire(order_id, "presettle")
        elif op == "pay":
            granted = await self.acquire(order_id, "payment")
            if granted is None:
                return
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))
            lock, order = granted["lock"], granted["order"]
            if self.rng.random() < 0.1:
                await self.release(order_id, "payment", lock["token"])
            else:
                await self.pay(order_id, lock["token"], order["version"], order["amount_cents"])
        elif op in ("release", "renew"):
            if not self.held:
                return
            (held_order, kind), token = self.rng.choice(sorted(self.held.items()))
            if op == "release":
                await self.release(held_order, kind, token)
            else:
                reply = await self.req("lock.renew", order_id=held_order, kind=kind, token=token)
                if reply is not None and not reply.get("ok") and reply["error"]["code"] in (
                        "FENCED", "LOCK_EXPIRED", "NOT_HOLDER", "ORDER_PAID"):
                    self.held.pop((held_order, kind), None)
        else:
            reply = await self.req("order.get", order_id=order_id)
            if reply is not None and reply.get("ok") and reply.get("order"):
                store.learn(reply["order"])

    async def acquire(self, order_id: str, kind: str) -> Frame | None:
        reply = await self.req("lock.acquire", order_id=order_id, kind=kind)
        if (reply is not None and not reply.get("ok") and reply["error"].get("can_force")
                and self.rng.random() < 0.3):
            self.run.stats.ops["erp.force"] += 1
            reply = await self.req("lock.acquire", order_id=order_id, kind=kind, force=True,
                                   operator=self.sub, reason="chaos takeover")
        if reply is None:
            return None
        if not reply.get("ok"):
            code = reply["error"]["code"]
            if code == "NOT_FOUND":
                self.store.unpublished.add(order_id)
            elif code == "ORDER_PAID":
                self.store.mark_paid(order_id)
            return None
        self.run.note_grant(self, reply)
        self.held[(order_id, kind)] = reply["lock"]["token"]
        for lock in reply.get("released") or []:
            self.forget_lock(lock)
        if reply.get("order"):
            self.store.learn(reply["order"])
        return reply

    async def release(self, order_id: str, kind: str, token: int) -> None:
        reply = await self.req("lock.release", order_id=order_id, kind=kind, token=token)
        if reply is not None and (reply.get("ok") or reply["error"]["code"] in (
                "FENCED", "LOCK_EXPIRED", "NOT_HOLDER", "ORDER_PAID")
                ) and self.held.get((order_id, kind)) == token:
            del self.held[(order_id, kind)]

    async def publish(self, order: Frame, change: str, token: int | None = None) -> None:
        params: Frame = {"order": order, "change": change}
        if token is not None:
            params["token"] = token
        reply = await self.req("order.publish", **params)
        if (reply is not None and not reply.get("ok") and reply["error"].get("can_force")
                and token is None and self.rng.random() < 0.25):
            self.run.stats.ops["erp.force_publish"] += 1
            reply = await self.req("order.publish", force=True, operator=self.sub,
                                   reason="chaos forced publish", **params)
        if reply is None:
            return
        if reply.get("ok"):
            self.store.learn(reply["order"])
            return
        code = reply["error"]["code"]
        if code == "STALE_VERSION":  # someone published this version first: read it again
            fresh = await self.req("order.get", order_id=order["order_id"])
            if fresh is not None and fresh.get("ok") and fresh.get("order"):
                self.store.learn(fresh["order"])
        elif code == "ORDER_PAID":
            self.store.mark_paid(order["order_id"])

    async def publish_new(self, order_id: str) -> None:
        order = self.store.book[order_id]
        reply = await self.req("order.publish", order=order, change="modify")
        if reply is not None and (reply.get("ok") or reply["error"]["code"] in (
                "STALE_VERSION", "ORDER_PAID")):
            self.store.unpublished.discard(order_id)  # there (maybe pulled by a phone first)

    async def close_order(self, order_id: str) -> None:
        order = dict(self.store.book[order_id], status="closed")
        order["version"] += 1
        reply = await self.req("order.publish", order=order, change="status")
        if reply is None:
            return
        if reply.get("ok"):
            self.store.book[order_id] = order
            self.store.to_close.discard(order_id)
        elif reply["error"]["code"] == "STALE_VERSION":
            fresh = await self.req("order.get", order_id=order_id)
            if fresh is not None and fresh.get("ok") and fresh.get("order"):
                if fresh["order"]["status"] == "closed":
                    self.store.to_close.discard(order_id)
                self.store.learn(fresh["order"])
        elif reply["error"]["code"] == "NOT_FOUND":
            self.store.to_close.discard(order_id)

    async def manager_step(self) -> None:
        mirror = self.mirrors.get(self.store_channel)
        if mirror is None or not mirror.tokens or self.rng.random() < 0.3:
            self.run.stats.ops["manager.check"] += 1
            open_orders = self.store.open_orders()
            if open_orders:
                await self.req("check", order_id=self.rng.choice(open_orders),
                               action=self.rng.choice(["edit", "pay", "presettle"]))
            return
        self.run.stats.ops["manager.force_release"] += 1
        order_id, kind = self.rng.choice(sorted(mirror.tokens))
        await self.req("lock.release", order_id=order_id, kind=kind, force=True,
                       operator="manager", reason="chaos: stuck screen")
