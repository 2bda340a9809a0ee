"""The Redis backend: many broker processes, one truth.

Each order's record is stepped by `rules.step` in Python and written back by a
compare-and-set script (`redis_lua.COMMIT`) that refuses if the record, the
store's state or the time moved, and then hands back the fresh values. Records
are cached, so a transition costs one round trip when nobody else wrote. The
script numbers the events on their channels, keeps a bounded stream per
channel for `since`, and publishes one message per channel it numbered on, to that
channel's own pub/sub channel: a broker subscribes only to the channels its connections
follow. Direct notices go to a per-broker channel of the store, and only to the brokers
that hold a connection of their terminal (presence says which). All of them carry the
store's hash tag; on a Cluster they are shard channels (SSUBSCRIBE / SPUBLISH), so a
message goes to one shard, not to every node.

Deadlines sit in a sorted set per store, indexed by a global sorted set of
stores, and any live broker sweeps them: the compare-and-set makes each
expiry happen once. Brokers heartbeat; the presence of a dead one's terminals
is taken away by the others, which starts their locks' disconnect grace.

A reply is the truth. The commit is sent exactly once, with an id the script writes into
the order's commit log. Commands go through `resp.py` (auto-pipelined over hiredis) to the
node `redis_link.py` routes them to: one never written is UNAVAILABLE. When a commit's reply
is lost (Redis died or stalled after the command left), the broker asks `RESOLVE`
until Redis answers: applied, or void, which also forbids it to apply later.
Applied is answered as decided; void is stepped afresh; no answer within
`RESOLVE_WITHIN_S` is UNAVAILABLE with outcome unknown. With `wait_replicas`, a
grant or a payment is acknowledged only once `WAIT` saw it on that many replicas.

The parts live beside this module, one job each, as mixins of one core
(`redis_core.RedisCore`: link, keys, clock, scripts): `redis_state` (commits, record
cache, reads, config, audit, the deadline sweep), `redis_streams` (numbering, history,
snapshots, epochs, receiving pub/sub), `redis_subscriptions` (interest by channel),
`redis_presence`, `redis_counts` (connection limits across brokers) and `redis_liveness`
(heartbeat, dead brokers).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from . import redis_sessions
from .base import StoredSession
from .redis_counts import RedisConnectionCounts
from .redis_liveness import RedisLiveness
from .redis_presence import RedisPresence
from .redis_state import RedisOrderState
from .redis_streams import RedisStreams
from .redis_subscriptions import RedisSubscriptions
from .resp import RespError


class RedisBackend(RedisOrderState, RedisStreams, RedisSubscriptions, RedisPresence,
                   RedisConnectionCounts, RedisLiveness):
    """The parts of base.Backend on one Redis, each a mixin of redis_core.RedisCore (their
    modules say what each does); here: their life, sessions and broker-to-broker control."""

    async def start(self, sink: Any) -> None:
        await super().start(sink)
        self._tasks = [asyncio.create_task(self._listen(), name="redis-pubsub"),
                       asyncio.create_task(self._sweep(), name="redis-sweeper"),
                       asyncio.create_task(self._heartbeat(), name="redis-heartbeat")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pubsub_ok.wait(), 5)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self._call(self.brokers, "ZREM", self.brokers, self.broker_id)
        self._link.close()
        self._close_pubsubs()

    async def ready(self) -> bool:
        try:
            async with asyncio.timeout(0.5):
                await self._link.execute("", "PING")
        except (RespError, OSError, TimeoutError):
            return False
        return self._pubsub_ok.is_set()

    # --- sessions (redis_sessions.py) ----------------------------------------------------------

    async def keep_session(self, store_id: str, session_id: str, session: StoredSession,
                           ttl_ms: int | None) -> None:
        key = redis_sessions.session_key(self._prefix, store_id, session_id)
        await self._eval("KEEP_SESSION", [key], [redis_sessions.session_ttl_ms(ttl_ms),
                                                 *redis_sessions.session_fields(session)])

    async def find_session(self, store_id: str, session_id: str) -> StoredSession | None:
        key = redis_sessions.session_key(self._prefix, store_id, session_id)
        return await self._guard(redis_sessions.find_session(self._link.execute, key))

    # --- broker-to-broker control --------------------------------------------------------------

    async def send_to_broker(self, broker_id: str, payload: bytes) -> None:
        channel = f"{self._prefix}rpc:{broker_id}"
        await self._call(channel, self._publish_command, channel, payload)
