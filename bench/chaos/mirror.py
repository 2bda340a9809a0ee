"""What an observer saw: numbered events in compact form, and a subscriber's mirror of a
channel (its snapshot, then its events), compared with fresh snapshots at the end."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from .settings import Frame


class Ev(NamedTuple):
    """The parts of a numbered event the analysis needs."""

    name: str
    order_id: str | None
    kind: str | None
    token: int | None
    holder: str | None
    reason: str | None
    version: int | None
    status: str | None
    pay_token: int | None
    pay_ref: str | None
    ts: int


def compact(frame: Frame) -> Ev:
    lock = frame.get("lock") or {}
    order = frame.get("order") or {}
    payment = frame.get("payment") or {}
    return Ev(frame["event"], lock.get("order_id") or order.get("order_id"), lock.get("kind"),
              lock.get("token"), (lock.get("holder") or {}).get("terminal_id"),
              frame.get("reason"), order.get("version"), order.get("status"),
              payment.get("token"), payment.get("payment_ref"), int(frame.get("ts") or 0))


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def lock_view(lock: Frame) -> str:
    """A lock as compared: everything but `expires_at`, which renewals move silently."""
    return canonical({k: v for k, v in lock.items() if k != "expires_at"})


class View(NamedTuple):
    orders: dict[str, str]
    locks: dict[tuple[str, str], str]
    terminals: frozenset[str]


class Mirror:
    """One subscriber's copy of a channel's state: its snapshot, then its events."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.store_scope = channel.startswith("store:")
        self.seq: int | None = None  # None: not synchronised yet
        self.orders: dict[str, str] = {}
        self.locks: dict[tuple[str, str], str] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.terminals: set[str] = set()

    def load(self, snapshot: Frame, seq: int) -> None:
        self.seq = seq
        if self.store_scope:
            orders = snapshot.get("orders") or []
            self.terminals = {t["terminal_id"] for t in snapshot.get("terminals") or []}
        else:
            orders = [snapshot["order"]] if snapshot.get("order") else []
        self.orders = {o["order_id"]: canonical(o) for o in orders}
        self.locks, self.tokens = {}, {}
        for lock in snapshot.get("locks") or []:
            key = (lock["order_id"], lock["kind"])
            self.locks[key] = lock_view(lock)
            self.tokens[key] = lock["token"]

    def apply(self, frame: Frame) -> str | None:
        """Apply the next event; a description of anything that does not fit, else None."""
        self.seq = frame["seq"]
        name = frame["event"]
        lock = frame.get("lock")
        if name == "lock.acquired" and lock:
            key = (lock["order_id"], lock["kind"])
            clash = key in self.locks
            self.locks[key] = lock_view(lock)
            old = self.tokens.get(key)
            self.tokens[key] = lock["token"]
            if clash:
                return f"{self.channel}#{self.seq}: {key} granted ({lock['token']}) over {old}"
        elif name in ("lock.released", "lock.expired", "lock.forced") and lock:
            key = (lock["order_id"], lock["kind"])
            current = self.tokens.pop(key, None)
            self.locks.pop(key, None)
            if current != lock["token"]:
                return (f"{self.channel}#{self.seq}: {name} of token {lock['token']} while "
                        f"{current} was held")
        elif name in ("order.updated", "order.paid"):
            order = frame["order"]
            if self.store_scope and order["status"] != "open":
                self.orders.pop(order["order_id"], None)
            else:
                self.orders[order["order_id"]] = canonical(order)
        elif name == "terminal.online":
            self.terminals.add(frame["terminal"]["terminal_id"])
        elif name == "terminal.offline":
            self.terminals.discard(frame["terminal"]["terminal_id"])
        return None

    def view(self) -> View:
        return View(dict(self.orders), dict(self.locks), frozenset(self.terminals))


def snapshot_view(channel: str, snapshot: Frame) -> View:
    mirror = Mirror(channel)
    mirror.load(snapshot, 0)
    return mirror.view()


def view_diff(mine: View, truth: View) -> str:
    parts = []
    for oid in sorted(set(mine.orders) | set(truth.orders)):
        if mine.orders.get(oid) != truth.orders.get(oid):
            parts.append(f"order {oid}: {mine.orders.get(oid)} != {truth.orders.get(oid)}")
    for key in sorted(set(mine.locks) | set(truth.locks)):
        if mine.locks.get(key) != truth.locks.get(key):
            parts.append(f"lock {key}: {mine.locks.get(key)} != {truth.locks.get(key)}")
    if mine.terminals != truth.terminals:
        parts.append(f"terminals +{sorted(mine.terminals - truth.terminals)} "
                     f"-{sorted(truth.terminals - mine.terminals)}")
    return "; ".join(parts)[:600]

