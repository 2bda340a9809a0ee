"""Broker liveness: each broker heart-beats; the others take a dead one's presence away,
which starts its terminals' disconnect grace."""

from __future__ import annotations

import asyncio
import logging
import time

from ..model import Terminal
from .redis_core import RedisCore, as_text, terminal_decoder

log = logging.getLogger("tablelock.redis")


class RedisLiveness(RedisCore):
    """The heartbeat, and the retirement of brokers that stopped it."""

    async def _heartbeat(self) -> None:
        """Say we are alive; take the presence away from brokers that stopped saying so."""
        stores_key = f"{self._prefix}broker:{self.broker_id}:stores"
        while True:
            try:
                now = await self.now()
                added = await self._call(self.brokers, "ZADD", self.brokers, now, self.broker_id)
                self._live_brokers = max(1, await self._call(
                    self.brokers, "ZCOUNT", self.brokers, now - self._dead_after_ms, "+inf"))
                if added and self._healthy_since is not None:  # taken for dead: we aren't
                    await self._reannounce()
                if self._healthy_since is None:
                    self._healthy_since = time.monotonic()
                if self._stores_heard:
                    await self._call(stores_key, "SADD", stores_key, *self._stores_heard)
                await self._refresh_counts(now)
                # After an outage, every broker's heartbeat is old: give them all a full
                # period to say they live before any is taken for dead.
                if (time.monotonic() - self._healthy_since) * 1000 >= self._dead_after_ms:
                    dead = await self._call(self.brokers, "ZRANGEBYSCORE", self.brokers, "-inf",
                                            now - self._dead_after_ms, "WITHSCORES")
                    for broker, last_seen in zip(dead[::2], dead[1::2], strict=True):
                        await self._retire_dead_broker(as_text(broker), int(float(last_seen)))
                for channel in [c for c in self._seen if not self.sink.has_subscribers(c)]:
                    del self._seen[channel]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)
                self._healthy_since = None
            await asyncio.sleep(self._heartbeat_s)

    async def _retire_dead_broker(self, broker_id: str, last_seen: int) -> None:
        log.warning("broker %s stopped heart-beating: its terminals go offline", broker_id)
        stores_key = f"{self._prefix}broker:{broker_id}:stores"
        for store in await self._call(stores_key, "SMEMBERS", stores_key):
            store_id = as_text(store)
            keys = self.keys(store_id)
            holders = await self._guard(self._evalsha("DEAD_FIELDS",
                keys=[keys.conns], args=[broker_id]))
            for holder in holders:
                raw = await self._call(keys.terms, "HGET", keys.terms, holder)
                role, _, sub = as_text(holder).partition(":")
                terminal = (terminal_decoder.decode(raw) if raw else
                            Terminal(sub, role, sub, store_id))  # type: ignore[arg-type]
                await self._announce(terminal, 0, False, broker_id=broker_id, since=last_seen)
        await self._call(stores_key, "DEL", stores_key)
        await self._call(self.brokers, "ZREM", self.brokers, broker_id)
