"""Interest by channel: which pub/sub channels this broker hears (only those its
connections follow), subscribing and confirming them, and keeping the subscriber
connections alive (one to the master; on a Cluster, one per node)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from .. import metrics
from ..protocol import parse_channel
from .base import Unavailable
from .redis_core import Keys, RedisCore
from .resp import ReplyError, RespError

log = logging.getLogger("tablelock.redis")


def _lost_by(lost: asyncio.Future[None]) -> Callable[[BaseException], None]:
    """A subscriber connection's on_lost: wakes the listener of its generation."""
    def on_lost(_: BaseException) -> None:
        if not lost.done():
            lost.set_result(None)
    return on_lost


class RedisSubscriptions(RedisCore):
    """What this broker hears from Redis, and the listener that keeps hearing it."""

    def channel_idle(self, channel: str) -> None:
        """The last local subscriber left: its events need no longer come here."""
        parsed = parse_channel(channel)
        if parsed is None or self.sink.has_subscribers(channel):
            return
        self._seen.pop(channel, None)
        keys = self.keys(parsed[0])
        orders = self._orders_followed.get(keys.store_id, set())
        if parsed[1] is not None:
            orders.discard(channel)
            if not orders:
                self._orders_followed.pop(keys.store_id, None)
            if keys.events(channel) in self._routes:
                self._forget([keys.events(channel)])
        elif orders:  # its order channels are no longer covered: hear them on their own
            self._spawn(self._uncover(keys))
        else:
            self._forget([keys.store_events])

    async def _follow(self, channel: str, keys: Keys) -> None:
        """Hear a channel's events from now on: nobody reads history or takes a snapshot
        before the subscription is live, or events slip between the two. The store's
        messages carry its orders' events too: while the store channel is heard, its order
        channels need no subscription of their own (they are covered)."""
        if channel == keys.store_channel:
            await self._hear({keys.store_events: ("events", channel)})
            covered = [keys.events(c) for c in self._orders_followed.get(keys.store_id, ())]
            self._forget([name for name in covered if name in self._routes])
            return
        self._orders_followed.setdefault(keys.store_id, set()).add(channel)
        if keys.store_events in self._routes:  # covered (wait until the store's is live)
            await self._hear({keys.store_events: ("events", keys.store_channel)})
        else:
            await self._hear({keys.events(channel): ("events", channel)})

    async def _uncover(self, keys: Keys) -> None:
        """Subscribe to each followed order channel of a store no longer heard as a whole;
        only then leave the store's (so nothing slips), unless it is followed again."""
        while True:  # an order channel followed meanwhile is heard too before the store goes
            routes = {keys.events(c): ("events", c)
                      for c in self._orders_followed.get(keys.store_id, ())}
            if all(name in self._routes and name not in self._confirming for name in routes):
                break
            try:
                await self._hear(routes)
            except Unavailable:
                return  # the store's subscription stays: it covers them still
        if self.sink.has_subscribers(keys.store_channel):
            self._forget(list(routes))
        else:
            self._forget([keys.store_events])

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    async def _listen_to_store(self, store_id: str, delta: int) -> None:
        """While any local connection belongs to a store: hear its direct notices for this
        broker, and news of its config (the cached state dies). Its events are heard per
        channel, as connections subscribe (_follow)."""
        count = self._stores_heard.get(store_id, 0) + delta
        keys = self.keys(store_id)
        names = [keys.notices + self.broker_id, keys.config_news]
        if count > 0:
            self._stores_heard[store_id] = count
            if delta > 0:
                if count == 1:
                    stores_key = f"{self._prefix}broker:{self.broker_id}:stores"
                    await self._call(stores_key, "SADD", stores_key, store_id)
                # Whoever came first may still be subscribing: wait for it too.
                await self._hear({names[0]: ("direct", store_id),
                                  names[1]: ("config", store_id)})
        else:
            self._stores_heard.pop(store_id, None)
            self._forget(names)

    async def _hear(self, routes: dict[str, tuple[str, str]]) -> None:
        """Subscribe to these pub/sub channels and wait until Redis confirmed each one (ours
        or another caller's subscription still on its way). Without a subscription now, the
        listener subscribes to every route once it has one again, and resynchronises."""
        await self._guard(self._hear_now(routes))

    async def _hear_now(self, routes: dict[str, tuple[str, str]]) -> None:
        loop = asyncio.get_running_loop()
        async with self._pubsub_lock:
            new = [name for name in routes if name not in self._routes]
            self._routes.update(routes)
            if new and self._pubsub_lost is not None:
                for name in new:
                    self._confirming.setdefault(name, loop.create_future())
                await self._subscribe(new)
        waits = [self._confirming[name] for name in routes if name in self._confirming]
        if waits:
            await asyncio.gather(*map(asyncio.shield, waits))

    def _forget(self, names: list[str]) -> None:
        """Stop hearing these pub/sub channels (in the background: channel_idle is not a
        coroutine); one heard again meanwhile stays."""
        for name in names:
            self._routes.pop(name, None)
        self._spawn(self._unsubscribe(names))

    async def _unsubscribe(self, names: list[str]) -> None:
        async with self._pubsub_lock:
            gone = [name for name in names if name not in self._routes]
            if gone and self._pubsub_lost is not None:
                with contextlib.suppress(RespError, OSError):
                    for node, group in (await self._by_node(gone)).items():
                        pubsub = self._pubsubs.get(node)
                        if pubsub is None:
                            continue
                        if self._cluster:
                            await pubsub.sunsubscribe(group)
                        else:
                            await pubsub.unsubscribe(group)

    async def _by_node(self, names: list[str]) -> dict[Any, list[str]]:
        """Channels grouped by the node that carries them (one group but on a Cluster)."""
        if not self._cluster:
            return {None: names}
        groups: dict[Any, list[str]] = {}
        for name in names:
            groups.setdefault(await self._link.node_of(name), []).append(name)
        return groups

    async def _subscribe(self, names: list[str]) -> None:
        """Subscribe (on a Cluster, SSUBSCRIBE on each channel's node) and wait until Redis
        confirmed every one."""
        lost = self._pubsub_lost
        assert lost is not None
        for node, group in (await self._by_node(names)).items():
            pubsub = self._pubsubs.get(node)
            if pubsub is None:
                pubsub = self._pubsubs[node] = await self._link.pubsub(node, _lost_by(lost))
            try:
                if self._cluster:
                    await pubsub.ssubscribe(group, self._on_pubsub)
                else:
                    await pubsub.subscribe(group, self._on_pubsub)
            except ReplyError as exc:  # MOVED: the slot map is stale
                self._link.check_stale(None, exc)
                raise
        for name in names:
            self._confirmed(name)

    def _confirmed(self, name: str) -> None:
        confirming = self._confirming.pop(name, None)
        if confirming is not None and not confirming.done():
            confirming.set_result(None)

    def _close_pubsubs(self) -> None:
        for pubsub in self._pubsubs.values():
            pubsub.close()
        self._pubsubs.clear()
        self._pubsub_lost = None

    async def _listen(self) -> None:
        """Keep the subscriptions; after a lost one, resynchronise from history."""
        delay = 0.05
        while True:
            try:
                async with self._pubsub_lock:
                    lost = self._pubsub_lost = asyncio.get_running_loop().create_future()
                    await self._subscribe(list(self._routes))
                if self._offset_ms is not None:  # not the first time: we may have missed some
                    metrics.REDIS_EVENTS.inc("resync")
                    await self._resync()
                self._pubsub_ok.set()
                delay = 0.05
                await lost
                raise ConnectionError("a subscriber connection was lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._pubsub_ok.is_set():
                    log.warning("lost the Redis subscription: %s", exc)
                    metrics.REDIS_EVENTS.inc("subscription_lost")
                self._pubsub_ok.clear()
                self._close_pubsubs()
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
