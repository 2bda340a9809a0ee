"""ERP actors: take an order's payment lock, wait for the reply, release it, wait again.

A closed loop starts the next pair as soon as the last one ends; an open loop starts pairs
at a fixed rate on whichever actor is idle (and counts a start with none idle as `missed`).
Actors are callbacks driven by the connection's frame reader, not coroutines, so a pair
costs the load generator two sends and two decodes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from .codec import Msg
from .conn import Conn
from .stats import Stats

_now = time.perf_counter
IDLE, ACQUIRING, RELEASING = 0, 1, 2


class Driver:
    """Where actors go when a pair ends: straight into the next (closed) or to the idle pool."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.closed_loop = False
        self.end = 0.0
        self.idle: deque[Actor] = deque()
        self.busy = 0
        self.drained = asyncio.Event()

    def done(self, actor: Actor, now: float, failed: bool = False) -> None:
        if self.closed_loop and now < self.end:
            if failed:  # no storm of instant retries: try again in 50 ms
                asyncio.get_running_loop().call_later(0.05, self._retry, actor)
            else:
                actor.start(now)
            return
        self.busy -= 1
        self.idle.append(actor)
        if self.busy == 0:
            self.drained.set()

    def _retry(self, actor: Actor) -> None:
        now = _now()
        if self.closed_loop and now < self.end:
            actor.start(now)
        else:
            self.done(actor, now)

    def launch(self, actor: Actor, now: float) -> None:
        self.busy += 1
        self.drained.clear()
        actor.start(now)

    async def closed(self, seconds: float) -> None:
        now = _now()
        self.closed_loop, self.end = True, now + seconds
        while self.idle:
            self.launch(self.idle.popleft(), now)
        await asyncio.sleep(seconds)
        self.closed_loop = False

    async def open(self, rate: float, seconds: float) -> int:
        """Start `rate` pairs a second for `seconds`; return how many found no idle actor."""
        self.closed_loop = False
        start = _now()
        end = start + seconds
        started = missed = 0
        while True:
            now = _now()
            if now >= end:
                return missed
            due = int((now - start) * rate)
            while started < due:
                started += 1
                if self.idle:
                    self.launch(self.idle.popleft(), now)
                else:
                    missed += 1
            await asyncio.sleep(max(0.0, start + (started + 1) / rate - _now()))

    async def drain(self, timeout: float) -> bool:
        if self.busy == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.drained.wait()
            return True
        except TimeoutError:
            return False


class Actor:
    __slots__ = ("_acquire", "conn", "driver", "order_id", "sent", "state", "stats", "token")

    def __init__(self, conn: Conn, order_id: str, driver: Driver) -> None:
        self.conn = conn
        self.order_id = order_id
        self.driver = driver
        self.stats = driver.stats
        self.state = IDLE
        self.sent = 0.0
        self.token = 0
        self._acquire = {"order_id": order_id, "kind": "payment"}
        conn.actor = self
        driver.idle.append(self)

    def start(self, now: float) -> None:
        self.state = ACQUIRING
        self.sent = now
        self.conn.send("lock.acquire", self._acquire)

    def on_reply(self, msg: Msg, now: float) -> None:
        stats = self.stats
        stats.reply.add(now - self.sent)
        if self.state == ACQUIRING:
            lock = msg.lock
            if not msg.ok or lock is None:
                stats.error(msg.error.code if msg.error else "no lock")
                self.state = IDLE
                self.driver.done(self, now, failed=True)
                return
            self.token = lock.token
            stats.granted(self.order_id, lock.token, self.sent)
            self.state = RELEASING
            self.sent = now
            self.conn.send("lock.release", {"order_id": self.order_id, "kind": "payment",
                                            "token": lock.token})
        elif self.state == RELEASING:
            if msg.ok:
                stats.pairs += 1
            else:
                stats.error(msg.error.code if msg.error else "release refused")
            self.state = IDLE
            self.driver.done(self, now, failed=not msg.ok)
