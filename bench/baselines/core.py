"""The minimal broker every baseline shares: locks in a dict, channels with a seq, broadcast.

It speaks just enough of PROTOCOL.md for the load generator: `hello` (a verified token),
`subscribe`, `lock.acquire`, `lock.release`, with events numbered per channel and a lock
of the same shape as tablelock's. Anything else is answered `ok`. No rules, no expiry, no
fencing beyond the token's equality: it exists only as a yardstick.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from typing import Any

import jwt

Event = tuple[str, dict[str, Any]]  # (channel, event)


def now_ms() -> int:
    return int(time.time() * 1000)


class MiniBroker:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.locks: dict[str, dict[str, Any]] = {}
        self.seqs: dict[str, int] = {}
        self.rooms: dict[str, set[Hashable]] = {}
        self.tokens = itertools.count(now_ms())

    def hello(self, token: Any) -> dict[str, Any] | None:
        try:
            return jwt.decode(str(token), self.secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            return None

    def leave(self, conn: Hashable, channels: list[str]) -> None:
        for channel in channels:
            self.rooms.get(channel, set()).discard(conn)

    def handle(self, conn: Hashable, who: dict[str, Any], msg: dict[str, Any],
               ) -> tuple[dict[str, Any], list[Event]]:
        kind, order_id = msg.get("type"), str(msg.get("order_id", ""))
        reply: dict[str, Any] = {"id": msg.get("id"), "ok": True}
        if kind == "subscribe":
            channel = str(msg["channel"])
            self.rooms.setdefault(channel, set()).add(conn)
            reply.update(channel=channel, seq=self.seqs.get(channel, 0), snapshot={})
            return reply, []
        lock = self.locks.get(order_id)
        if kind == "lock.acquire":
            if lock is not None and lock["holder"]["terminal_id"] != who["sub"]:
                return _refuse(reply, "PAYMENT_LOCKED", lock), []
            at = now_ms()
            lock = {"store_id": who["store"], "order_id": order_id, "kind": msg.get("kind"),
                    "token": next(self.tokens), "holder": {"terminal_id": who["sub"],
                    "role": who["role"], "name": who["sub"]}, "acquired_at": at,
                    "expires_at": at + 600_000, "order_version": 1}
            self.locks[order_id] = lock
            reply.update(lock=lock, order=None)
            return reply, self._events(who, order_id, "lock.acquired", lock)
        if kind == "lock.release":
            if lock is None or lock["token"] != msg.get("token"):
                return _refuse(reply, "NOT_HOLDER", lock), []
            del self.locks[order_id]
            reply.update(lock=lock)
            return reply, self._events(who, order_id, "lock.released", lock, reason="released")
        return reply, []

    def _events(self, who: dict[str, Any], order_id: str, name: str, lock: dict[str, Any],
                **extra: Any) -> list[Event]:
        events = []
        for channel in (f"order:{who['store']}:{order_id}", f"store:{who['store']}"):
            seq = self.seqs[channel] = self.seqs.get(channel, 0) + 1
            events.append((channel, {"type": "event", "channel": channel, "seq": seq,
                                     "event": name, "ts": now_ms(), "lock": lock, **extra}))
        return events


def _refuse(reply: dict[str, Any], code: str, lock: dict[str, Any] | None) -> dict[str, Any]:
    reply.update(ok=False, error={"code": code, "message": code, "can_force": False,
                                  "lock": lock})
    return reply
