"""A phone's habits (role h5, one per table): scan the table's code to find its order and
follow it, take the payment lock and pay through the payment service, or check."""

from __future__ import annotations

import asyncio
import json
import time

from .http_client import http
from .mirror import Mirror
from .run import Run
from .screen import Pay, Screen
from .settings import H5_TTL_MS, Frame
from .store import StoreSim


class PhoneScreen(Screen):
    def __init__(self, run: Run, store: StoreSim, sub: str, home: int, table: str) -> None:
        super().__init__(run, store, "h5", sub, home, table)
        self.order_id: str | None = None  # the order of its table it follows

    async def habit(self) -> None:
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

    async def record_payment(self, p: Pay) -> Frame | None:
        """A phone never records a payment: the platform's payment service does, over HTTP
        with role `service`, once the provider tells it."""
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
