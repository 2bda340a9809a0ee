"""Connection counts across brokers: each broker's count per store and terminal, kept in
Redis where the limits are judged, alive while the broker heart-beats."""

from __future__ import annotations

import asyncio

from ..model import Terminal, holder_key
from ..rules import ConnectionCounts
from .base import Unavailable
from .redis_core import RedisCore


class RedisConnectionCounts(RedisCore):
    """The connection limits across brokers (rules.connection_limit judges the counts)."""

    async def count_connection(self, terminal: Terminal) -> ConnectionCounts:
        store, holder = terminal.store_id, holder_key(terminal)
        async with self._count_lock(store):
            held = self._counted.setdefault(store, {})
            try:
                store_total, terminal_total, lapsed = await self._write_counts(
                    store, holder, held, +1)
            except Unavailable:
                self._recount.add(store)  # Redis may have counted it: say the counts again
                raise
            if lapsed and any(held.values()):  # taken for dead: our other counts may be gone
                self._recount.add(store)
            held[holder] = held.get(holder, 0) + 1
        return ConnectionCounts(int(store_total), int(terminal_total))

    async def uncount_connection(self, terminal: Terminal) -> None:
        store, holder = terminal.store_id, holder_key(terminal)
        async with self._count_lock(store):
            held = self._counted.get(store, {})
            if held.get(holder, 0) > 0:
                held[holder] -= 1
            try:
                _, _, lapsed = await self._write_counts(store, holder, held, 0)
            except Unavailable:
                self._recount.add(store)
                raise
            if lapsed:
                self._recount.add(store)
            elif held.get(holder) == 0:
                del held[holder]
            if not held and store not in self._recount:
                del self._counted[store]

    def _count_lock(self, store_id: str) -> asyncio.Lock:
        """One count call at a time per store, so that each says this broker's exact count."""
        lock = self._count_locks.get(store_id)
        if lock is None:
            lock = self._count_locks[store_id] = asyncio.Lock()
        return lock

    def _count_keys(self, store_id: str) -> tuple[str, str]:
        """(the store's connections per broker, its brokers by last refresh); a terminal's
        connections per broker are at the first + ':' + its holder key."""
        tag = self.keys(store_id).prefix
        return f"{tag}:cc", f"{tag}:cc-live"

    async def _write_counts(self, store_id: str, holder: str, held: dict[str, int],
                            delta: int) -> list[int]:
        store_key, live_key = self._count_keys(store_id)
        return list(await self._eval(
            "COUNT_CONNECTIONS", [store_key, f"{store_key}:{holder}", live_key],
            [self.broker_id, sum(held.values()) + delta, held.get(holder, 0) + delta,
             self._dead_after_ms]))

    async def _refresh_counts(self, now: int) -> None:
        """Heartbeat: keep this broker's counts alive in every store it holds connections
        of, and say them again where they lapsed or a reply was lost."""
        stores = list(self._counted)
        if stores:
            live_keys = [self._count_keys(store)[1] for store in stores]
            added = await self._guard(asyncio.gather(*(  # one write: the link pipelines them
                self._link.execute(key, "ZADD", key, now, self.broker_id) for key in live_keys)))
            self._recount.update(store for store, new in zip(stores, added, strict=True) if new)
        for store in list(self._recount):
            async with self._count_lock(store):
                held = self._counted.get(store, {})
                store_key, live_key = self._count_keys(store)
                try:
                    await self._eval(
                        "RECOUNT_CONNECTIONS",
                        [store_key, live_key, *(f"{store_key}:{h}" for h in held)],
                        [self.broker_id, sum(held.values()), *held.values()])
                except Unavailable:
                    continue  # said again at the next heartbeat
                self._recount.discard(store)
                for holder in [h for h, n in held.items() if n == 0]:
                    del held[holder]
                if not held:
                    self._counted.pop(store, None)
