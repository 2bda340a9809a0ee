"""An ERP terminal's habits (erp_main and erp_secondary): publish the store's new orders,
edit them under the order lock, add items, presettle, take payments at the counter,
release and renew, close paid orders; both keep the store's order book in step."""

from __future__ import annotations

import asyncio

from .screen import Screen
from .settings import Frame


class ErpScreen(Screen):
    def learn(self, frame: Frame) -> None:
        super().learn(frame)
        if frame["event"] == "order.paid":
            self.store.mark_paid(frame["order"]["order_id"])
        elif frame["event"] == "order.updated":
            self.store.learn(frame["order"])

    async def habit(self) -> None:
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
