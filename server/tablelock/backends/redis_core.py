"""What every part of the Redis backend shares: the link, the keys of a store, the clock,
the scripts and the bound on each call (the parts: redis_state, redis_streams,
redis_subscriptions, redis_presence, redis_counts, redis_liveness; redis.py wires them)."""

from __future__ import annotations

import abc
import asyncio
import collections
import secrets
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from ..model import OrderRecord, StoreConfig, Terminal
from ..protocol import store_channel
from . import redis_lua
from .base import Backend, Unavailable
from .redis_link import RedisLink
from .resp import PubSubConnection, RespError, Script

T = TypeVar("T")
# A call that cannot change anything (a read, or getting a connection for a write) fails
# within this: such a request is answered UNAVAILABLE within 1 s, never left hanging.
CALL_TIMEOUT_S = 0.9

record_decoder = msgspec.msgpack.Decoder(OrderRecord)
terminal_decoder = msgspec.json.Decoder(Terminal)
_config_decoder = msgspec.json.Decoder(StoreConfig)


class Keys:
    """Every key of one store carries the hash tag {store:<id>}: one Cluster slot."""

    __slots__ = ("audit", "auths", "config_news", "conns", "due", "hist_store", "holders",
                 "notices", "orders", "prefix", "seqs", "state", "store_channel",
                 "store_events", "store_id", "terms", "unclaimed_seqs", "unhandled",
                 "unhandled_count")

    def __init__(self, prefix: str, store_id: str) -> None:
        tag = f"{prefix}{{store:{store_id}}}"
        self.store_id = store_id
        self.prefix = tag
        self.state = f"{tag}:state"
        self.seqs = f"{tag}:seq"
        self.unclaimed_seqs = f"{tag}:seq-unclaimed"
        self.due = f"{tag}:due"
        self.orders = f"{tag}:orders"
        self.hist_store = f"{tag}:h:store"
        self.audit = f"{tag}:audit"
        self.unhandled = f"{tag}:unhandled"
        self.unhandled_count = f"{tag}:unhandled-count"
        self.terms = f"{tag}:terms"
        self.conns = f"{tag}:conns"
        self.auths = f"{tag}:auths"
        self.holders = f"{tag}:at:"  # + holder key: the brokers holding its connections
        self.notices = f"{tag}:b:"  # + broker id: pub/sub of that broker's direct notices
        self.config_news = f"{tag}:cfg"  # pub/sub: the config changed
        self.store_channel = store_channel(store_id)
        self.store_events = self.events(self.store_channel)

    def record(self, order_id: str) -> str:
        return f"{self.prefix}:o:{order_id}"

    def events(self, channel: str) -> str:
        """The pub/sub channel of one client channel's events."""
        return f"{self.prefix}:ev:{channel}"

    def table(self, table_id: str) -> str:
        """The ids of the orders of a table (the index behind order.get by table_id)."""
        return f"{self.prefix}:t:{table_id}"

    def commits(self, order_id: str) -> str:
        """The ids of the order's recent commits (redis_lua.COMMIT, RESOLVE)."""
        return f"{self.prefix}:c:{order_id}"

    def hist_order(self, order_id: str) -> str:
        return f"{self.prefix}:h:o:{order_id}"

    def history(self, order_id: str | None) -> str:
        return self.hist_order(order_id) if order_id is not None else self.hist_store


@dataclass
class StoreState:
    rev: str
    config: StoreConfig
    offline: dict[str, int] = field(default_factory=dict)


def state_of(fields: list[bytes]) -> StoreState:
    """A store's state from HGETALL: revision, config, offline terminals."""
    state = StoreState("0", StoreConfig())
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        key = name.decode()
        if key == "rev":
            state.rev = value.decode()
        elif key == "config":
            state.config = _config_decoder.decode(value)
        elif key.startswith("off:"):
            state.offline[key[4:]] = int(value)
    return state


def hash_fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's or a hash's fields from their flat RESP list."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def as_text(value: str | bytes | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCore(Backend):
    """The state every part reads and the calls every part makes; each part is a mixin of
    this core, and the few calls one part makes into another are declared at the end."""

    def __init__(self, url: str, history_size: int = 512, audit_size: int = 10_000,
                 prefix: str = "tl:", tolerance_ms: int = 250, sweep_interval_s: float = 0.05,
                 heartbeat_s: float = 1.0, dead_after_s: float = 3.0,
                 max_unclaimed_seqs: int = 10_000, h5_presence_linger_ms: int = 3_000,
                 max_unhandled_per_terminal: int = 100, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1_000) -> None:
        super().__init__()
        self.url = url
        self.broker_id = secrets.token_hex(6)
        self._prefix = prefix
        self._history_size = history_size
        self._link = RedisLink(url)
        self._cluster = self._link.cluster
        # Cluster: shard channels, each message handled by its slot's shard alone.
        self._publish_command = "SPUBLISH" if self._cluster else "PUBLISH"
        self._scripts = {name: Script(getattr(redis_lua, name))
                         for name in ("COMMIT", "LOAD", "PUBLISH_STORE", "PUT_CONFIG",
                                      "PRESENCE", "DEAD_FIELDS", "SNAPSHOT_STORE",
                                      "SNAPSHOT_ORDER", "MARK_HANDLED", "TABLE_RECORDS",
                                      "RESOLVE", "COUNT_CONNECTIONS", "RECOUNT_CONNECTIONS",
                                      "KEEP_SESSION", "EPOCH")}
        self._keys: dict[str, Keys] = {}
        self._offset_ms: float | None = None  # Redis clock minus our monotonic clock
        self._tasks: list[asyncio.Task[None]] = []
        self.due_stores = f"{prefix}due-stores"
        self.brokers = f"{prefix}brokers"
        # redis_state
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._max_unhandled = max_unhandled_per_terminal
        self._audit_size = audit_size
        self._tolerance_ms = tolerance_ms
        self._sweep_interval_s = sweep_interval_s
        self._live_brokers = 1  # brokers heart-beating, as of our last heartbeat
        self._records: dict[tuple[str, str], tuple[str, OrderRecord | None]] = {}
        self._states: dict[str, StoreState] = {}
        # redis_streams and redis_subscriptions
        self._max_unclaimed_seqs = max_unclaimed_seqs
        self._stores_heard: dict[str, int] = {}  # store -> local connections (pub/sub interest)
        # What this broker hears: pub/sub channel -> (kind, client channel or store id).
        self._routes: dict[str, tuple[str, str]] = {
            f"{prefix}rpc:{self.broker_id}": ("rpc", "")}
        self._confirming: dict[str, asyncio.Future[None]] = {}  # subscribed, not confirmed yet
        self._pubsub_lock = asyncio.Lock()
        self._unsubscribing: set[asyncio.Task[None]] = set()  # interest changes under way
        self._orders_followed: dict[str, set[str]] = {}  # store -> order channels followed
        # Pub/sub messages received, by route kind: what interest by channel saves.
        self.received: collections.Counter[str] = collections.Counter()
        self._seen: dict[str, int] = {}  # channel -> last seq delivered here
        # The subscriber connections: one to the master; on a Cluster, one per node.
        self._pubsubs: dict[Any, PubSubConnection] = {}
        self._pubsub_lost: asyncio.Future[None] | None = None
        self._backlog: collections.deque[tuple[bytes, bytes]] | None = None  # see _on_pubsub
        self._pubsub_ok = asyncio.Event()
        # redis_presence
        self._linger_s = h5_presence_linger_ms / 1000
        self._lingering: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._linger_tasks: set[asyncio.Task[None]] = set()
        # Presence by (store, holder_key): role and sub (model.holder_key says why).
        self._local: dict[tuple[str, str], tuple[Terminal, int, bool]] = {}
        self._presence_unsent: dict[tuple[str, str], Terminal] = {}  # presence Redis missed
        self._presence_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # redis_counts: connections counted here for the limits, store -> holder -> count (a
        # holder at 0 waits for a recount to clear its field); stores whose counts may be off.
        self._counted: dict[str, dict[str, int]] = {}
        self._recount: set[str] = set()
        self._count_locks: dict[str, asyncio.Lock] = {}
        # redis_liveness
        self._heartbeat_s = heartbeat_s
        self._dead_after_ms = int(dead_after_s * 1000)
        self._healthy_since: float | None = None  # since when our heartbeats get through

    def keys(self, store_id: str) -> Keys:
        keys = self._keys.get(store_id)
        if keys is None:
            keys = self._keys[store_id] = Keys(self._prefix, store_id)
        return keys

    async def _guard(self, call: Awaitable[T]) -> T:
        """Run a Redis call within the answer bound; any failure is UNAVAILABLE."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await call
        except (RespError, OSError, TimeoutError) as exc:
            raise Unavailable(str(exc) or type(exc).__name__) from None

    async def _call(self, key: str, *args: Any) -> Any:
        """One command, on the master of `key` (only routed by it), within the answer bound."""
        return await self._guard(self._link.execute(key, *args))

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """A script of redis_lua, on the master of its first key, within the answer bound."""
        return await self._guard(self._evalsha(name, keys, args))

    async def _evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await self._link.once_more_if_not_sent(
            keys[0], lambda conn: conn.evalsha(script, keys, args))

    # --- the one clock ----------------------------------------------------------------------

    async def now(self) -> int:
        if self._offset_ms is None:
            seconds, micros = await self._call("", "TIME")
            self._learn_time(int(seconds) * 1000 + int(micros) // 1000)
        return self._now()

    def _learn_time(self, real_ms: int, reset: bool = False) -> None:
        sample = real_ms - time.monotonic() * 1000
        if reset or self._offset_ms is None or sample > self._offset_ms:
            self._offset_ms = sample

    def _now(self) -> int:
        if self._offset_ms is None:
            return 0  # unknown yet: the commit refuses it and teaches us the time
        return int(time.monotonic() * 1000 + self._offset_ms)

    # --- what one part asks of another -------------------------------------------------------

    @abc.abstractmethod
    async def _retick_store(self, store_id: str) -> None:
        """redis_state: recompute every pending deadline of a store."""

    @abc.abstractmethod
    async def _follow(self, channel: str, keys: Keys) -> None:
        """redis_subscriptions: hear a channel's events from now on."""

    @abc.abstractmethod
    async def _listen_to_store(self, store_id: str, delta: int) -> None:
        """redis_subscriptions: count a local connection of a store in or out."""

    @abc.abstractmethod
    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """redis_subscriptions: run an interest change in the background."""

    @abc.abstractmethod
    async def _resync(self) -> None:
        """redis_streams: after a lost subscription, fill every local channel's gap."""

    @abc.abstractmethod
    def _on_pubsub(self, channel: bytes, data: bytes) -> None:
        """redis_streams: every pub/sub message, as it arrives."""

    @abc.abstractmethod
    async def _announce(self, terminal: Terminal, count: int, authority: bool,
                        broker_id: str | None = None, since: int | None = None) -> None:
        """redis_presence: say how many connections a broker has for a terminal."""

    @abc.abstractmethod
    async def _reannounce(self) -> None:
        """redis_presence: say every local connection again."""

    @abc.abstractmethod
    async def _refresh_counts(self, now: int) -> None:
        """redis_counts: keep this broker's connection counts alive."""
