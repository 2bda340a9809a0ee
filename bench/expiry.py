"""The `expiry` load: h5 phones take payment locks at a fixed rate and wait for them to lapse.

Each acquire makes the broker pull the order from the store's erp_main (`order.fetch`,
answered by `Conn._answer_fetch`), so the reply latency includes that round trip. The
holder is not subscribed to the order's channel: it gets the direct `lock.expired`, and
`Stats` records how long after the lock's `expires_at` (broker clock) it arrived.
"""

from __future__ import annotations

import asyncio
import time

from .codec import Msg
from .conn import Conn
from .stats import Stats

_now = time.perf_counter


class Phone:
    __slots__ = ("conn", "latest_expiry", "next", "orders", "pending", "stats")

    def __init__(self, conn: Conn, orders: list[str], stats: Stats) -> None:
        self.conn = conn
        self.orders = orders
        self.stats = stats
        self.next = 0
        self.pending: dict[int, float] = {}
        self.latest_expiry = 0
        conn.actor = self  # type: ignore[assignment]

    def fire(self, now: float) -> bool:
        if self.next >= len(self.orders):
            return False
        order_id = self.orders[self.next]
        self.next += 1
        request_id = self.conn.send("lock.acquire", {"order_id": order_id, "kind": "payment"})
        self.pending[request_id] = now
        return True

    def on_reply(self, msg: Msg, now: float) -> None:
        sent = self.pending.pop(msg.id or 0, None)
        if sent is not None:
            self.stats.reply.add(now - sent)
        if msg.ok and msg.lock is not None:
            self.stats.pairs += 1  # here: locks granted
            self.latest_expiry = max(self.latest_expiry, msg.lock.expires_at)
        else:
            self.stats.error(msg.error.code if msg.error else "no lock")


async def run_expiry(phones: list[Phone], stats: Stats, count: int, seconds: float) -> int:
    """Take `count` locks evenly over `seconds`, round-robin over the phones; then wait for
    every granted lock's `lock.expired` (at most 5 s past the last deadline). Returns how
    many locks were asked for."""
    most = max((len(p.orders) for p in phones), default=0)
    schedule = [p for k in range(most) for p in phones if k < len(p.orders)][:count]
    rate = len(schedule) / seconds if schedule else 1.0
    start = _now()
    started = 0
    while started < len(schedule):
        due = min(len(schedule), int((_now() - start) * rate) + 1)
        while started < due:
            schedule[started].fire(_now())
            started += 1
        await asyncio.sleep(max(0.0, start + started / rate - _now()))
    await asyncio.sleep(1.0)  # the last replies
    latest = max((p.latest_expiry for p in phones), default=0)
    wait_s = (latest - stats.clock_offset_ms - time.time() * 1000) / 1000 + 5.0
    deadline = _now() + min(max(wait_s, 1.0), 600.0)
    while stats.expired < stats.pairs and _now() < deadline:
        await asyncio.sleep(0.05)
    return started
