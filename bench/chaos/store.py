"""The store's own system: its ERP's order book, which both ERP terminals share."""

from __future__ import annotations

import itertools
import json
import random

from .settings import Frame

DISHES = [("rice", 300), ("noodles", 1200), ("dumplings", 900), ("tea", 400), ("soup", 800),
          ("fish", 3800), ("tofu", 1100), ("greens", 700)]


class StoreSim:
    """One restaurant's ERP database, shared by its two ERP terminals."""

    def __init__(self, store_id: str, tables: int, rng: random.Random) -> None:
        self.store_id = store_id
        self.rng = rng
        self.tables = [f"t{j}" for j in range(tables)]
        self.book: dict[str, Frame] = {}
        self.current: dict[str, str] = {}
        self.unpublished: set[str] = set()
        self.to_close: set[str] = set()
        self.paid: set[str] = set()
        self._ids = itertools.count(1)
        for table in self.tables:
            self.new_order(table)

    def new_order(self, table: str) -> str:
        order_id = f"{table}-{next(self._ids)}"
        items = [self._item() for _ in range(self.rng.randint(1, 3))]
        self.book[order_id] = {"order_id": order_id, "table_id": table, "version": 1,
                               "amount_cents": _amount(items), "items": items, "status": "open"}
        self.current[table] = order_id
        self.unpublished.add(order_id)
        return order_id

    def _item(self) -> Frame:
        sku, price = self.rng.choice(DISHES)
        return {"sku": sku, "qty": self.rng.randint(1, 3), "price": price}

    def open_orders(self) -> list[str]:
        return [oid for oid in (self.current[t] for t in self.tables)
                if self.book[oid]["status"] == "open"]

    def evolve(self, order_id: str, change: str) -> Frame:
        """The next version of an order, as an ERP terminal would publish it."""
        order = json.loads(json.dumps(self.book[order_id]))
        items = order["items"]
        if change == "add_items" or not items:
            if len(items) < 12:
                items.append(self._item())
            else:
                items[-1]["qty"] += 1
        elif self.rng.random() < 0.3 and len(items) > 1:
            items.pop(self.rng.randrange(len(items)))
        else:
            self.rng.choice(items)["qty"] = self.rng.randint(1, 4)
        order["amount_cents"] = _amount(items)
        order["version"] += 1
        return order

    def learn(self, order: Frame) -> None:
        """The broker's copy (a reply or an event): the book follows it when it is newer."""
        known = self.book.get(order["order_id"])
        if known is None:
            return
        if order["version"] > known["version"]:
            self.book[order["order_id"]] = json.loads(json.dumps(order))
        if order["status"] == "paid":
            self.mark_paid(order["order_id"])
        elif order["status"] == "closed":
            self.to_close.discard(order["order_id"])
        self.unpublished.discard(order["order_id"])

    def mark_paid(self, order_id: str) -> None:
        if order_id in self.paid or order_id not in self.book:
            return
        self.paid.add(order_id)
        order = self.book[order_id]
        if order["status"] == "open":
            order["status"] = "paid"
        self.to_close.add(order_id)
        if self.current.get(order["table_id"]) == order_id:
            self.new_order(order["table_id"])


def _amount(items: list[Frame]) -> int:
    return sum(int(i["qty"]) * int(i["price"]) for i in items)

