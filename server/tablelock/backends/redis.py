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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from .. import metrics
from ..model import (
    MAX_SAFE_INT,
    AuditEntry,
    Event,
    Lock,
    Order,
    OrderRecord,
    StoreConfig,
    Terminal,
    holder_key,
)
from ..protocol import (
    OrderSnapshot,
    StoreSnapshot,
    direct_frame,
    encode,
    event_body,
    numbered_frame,
    order_channel,
    parse_channel,
    store_channel,
)
from ..rules import (
    Command,
    ConnectionCounts,
    Context,
    Outcome,
    Tick,
    coalescing_key,
    has_grace,
    is_first_authority,
    presence_lingers,
    step,
)
from . import redis_lua, redis_sessions
from .base import (
    Backend,
    Numbered,
    OutcomeUnknown,
    StoredSession,
    Unavailable,
    best_for_table,
    observe,
    unhandled_for,
    untracked,
)
from .redis_link import RedisLink
from .resp import (
    MaybeApplied,
    NotSent,
    PubSubConnection,
    ReplyError,
    RespConnection,
    RespError,
    Script,
)

log = logging.getLogger("tablelock.redis")

T = TypeVar("T")
MAX_ATTEMPTS = 16
# How long the seq given to a subscriber of an order not seen yet is kept for the order.
UNCLAIMED_SEQ_MS = 600_000
# A call that cannot change anything (a read, or getting a connection for a write) fails
# within this: such a request is answered UNAVAILABLE within 1 s, never left hanging.
CALL_TIMEOUT_S = 0.9
# A write whose reply was lost is resolved within this, else answered with outcome unknown.
RESOLVE_WITHIN_S = 5.0
# How long an order's commit log keeps a commit id: far past any resolve, and past the time
# tolerance after which a commit still in flight is refused anyway.
COMMIT_LOG_MS = 60_000
# What `wait_replicas` makes wait for a replica: grants and payments.
DURABLE_EVENTS = frozenset({"lock.acquired", "lock.forced", "order.paid"})

_record_decoder = msgspec.msgpack.Decoder(OrderRecord)
_record_encoder = msgspec.msgpack.Encoder()
_terminal_decoder = msgspec.json.Decoder(Terminal)
_config_decoder = msgspec.json.Decoder(StoreConfig)
_audit_decoder = msgspec.json.Decoder(AuditEntry)
# kind (0 numbered, 1 direct), channel (or coalescing key), seq, body, table, holder, unless
PubEntry = tuple[int, str, str, str, str, str, str]
_pub_decoder = msgspec.json.Decoder(list[PubEntry])
_HEARD = metrics.REDIS_EVENTS.labels("pubsub_message")  # per broker: what interest saves
# Each part of a stream id is below 2^64: 19 digits always are, and ours are milliseconds.
_STREAM_ID = re.compile(r"^\d{1,19}-\d{1,19}$")


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


def _state_of(fields: list[bytes]) -> StoreState:
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


class _Unanswered(Exception):
    """A write left for Redis and no reply came back: it may have been applied."""


class _Void(Exception):
    """A commit whose reply was lost did not apply, and now never will."""

    def __init__(self, sent_at: float) -> None:
        super().__init__("void")
        self.sent_at = sent_at


def _lost_by(lost: asyncio.Future[None]) -> Callable[[BaseException], None]:
    """A subscriber connection's on_lost: wakes the listener of its generation."""
    def on_lost(_: BaseException) -> None:
        if not lost.done():
            lost.set_result(None)
    return on_lost


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's or a hash's fields from their flat RESP list."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _text(value: str | bytes | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBackend(Backend):

    def __init__(self, url: str, history_size: int = 512, audit_size: int = 10_000,
                 prefix: str = "tl:", tolerance_ms: int = 250, sweep_interval_s: float = 0.05,
                 heartbeat_s: float = 1.0, dead_after_s: float = 3.0,
                 max_unclaimed_seqs: int = 10_000, h5_presence_linger_ms: int = 3_000,
                 max_unhandled_per_terminal: int = 100, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1_000) -> None:
        super().__init__()
        self.url = url
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._linger_s = h5_presence_linger_ms / 1000
        self._lingering: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._linger_tasks: set[asyncio.Task[None]] = set()
        self._max_unhandled = max_unhandled_per_terminal
        self._max_unclaimed_seqs = max_unclaimed_seqs
        self.broker_id = secrets.token_hex(6)
        self._prefix = prefix
        self._history_size = history_size
        self._audit_size = audit_size
        self._tolerance_ms = tolerance_ms
        self._sweep_interval_s = sweep_interval_s
        self._live_brokers = 1  # brokers heart-beating, as of our last heartbeat
        self._heartbeat_s = heartbeat_s
        self._dead_after_ms = int(dead_after_s * 1000)
        self._link = RedisLink(url)
        self._cluster = self._link.cluster
        # Cluster: shard channels, each message handled by its slot's shard alone.
        self._publish_command = "SPUBLISH" if self._cluster else "PUBLISH"
        self._scripts = {name: Script(getattr(redis_lua, name))
                         for name in ("COMMIT", "LOAD", "PUBLISH_STORE", "PUT_CONFIG",
                                      "PRESENCE", "DEAD_FIELDS", "SNAPSHOT_STORE",
                                      "SNAPSHOT_ORDER", "MARK_HANDLED", "TABLE_RECORDS",
                                      "RESOLVE", "COUNT_CONNECTIONS", "RECOUNT_CONNECTIONS",
                                      "KEEP_SESSION")}
        self._keys: dict[str, Keys] = {}
        self._records: dict[tuple[str, str], tuple[str, OrderRecord | None]] = {}
        self._states: dict[str, StoreState] = {}
        self._offset_ms: float | None = None  # Redis clock minus our monotonic clock
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
        # Presence by (store, holder_key): role and sub (model.holder_key says why).
        self._local: dict[tuple[str, str], tuple[Terminal, int, bool]] = {}
        self._seen: dict[str, int] = {}  # channel -> last seq delivered here
        self._presence_unsent: dict[tuple[str, str], Terminal] = {}  # presence Redis missed
        self._presence_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._healthy_since: float | None = None  # since when our heartbeats get through
        # Connections counted here for the limits, store -> holder -> count (a holder at 0
        # waits for a recount to clear its field); stores whose counts in Redis may be off.
        self._counted: dict[str, dict[str, int]] = {}
        self._recount: set[str] = set()
        self._count_locks: dict[str, asyncio.Lock] = {}
        # The subscriber connections: one to the master; on a Cluster, one per node.
        self._pubsubs: dict[Any, PubSubConnection] = {}
        self._pubsub_lost: asyncio.Future[None] | None = None
        self._backlog: collections.deque[tuple[bytes, bytes]] | None = None  # see _on_pubsub
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub_ok = asyncio.Event()
        self.due_stores = f"{prefix}due-stores"
        self.brokers = f"{prefix}brokers"

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
        conn = await self._link.connection(keys[0])
        try:
            return await conn.evalsha(self._scripts[name], keys, args)
        except ReplyError as exc:
            self._link.check_stale(conn, exc)
            raise

    # --- order state ---------------------------------------------------------------------------

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

    async def apply(self, store_id: str, order_id: str, command: Command,
                    actor: Terminal | None) -> Outcome:
        try:
            return await self._apply(store_id, order_id, command, actor)
        except (RespError, OSError, TimeoutError) as exc:  # reads only: commits raise ours
            raise Unavailable(str(exc) or type(exc).__name__) from None

    async def _apply(self, store_id: str, order_id: str, command: Command,
                     actor: Terminal | None) -> Outcome:
        started = time.perf_counter()
        key = (store_id, order_id)
        if self._offset_ms is None:
            await self.now()
        # Once a commit was found void, Redis has just answered: a failure that follows is
        # likely passing, so decide afresh until the resolve bound rather than give up.
        retry_until: float | None = None
        delay = 0.05
        attempts = 0
        while attempts < MAX_ATTEMPTS:
            try:
                out = await self._attempt(key, command, actor, started)
            except _Void as void:
                if retry_until is None:
                    retry_until = void.sent_at + RESOLVE_WITHIN_S
                if time.monotonic() >= retry_until:
                    raise Unavailable("the commit was void; Redis is unsteady") from None
                continue
            except OutcomeUnknown:
                raise
            except Unavailable:
                if retry_until is None or time.monotonic() >= retry_until:
                    raise
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
                continue
            if out is not None:
                return out
            attempts += 1
        raise Unavailable("too much contention on one order")

    async def _attempt(self, key: tuple[str, str], command: Command, actor: Terminal | None,
                       started: float) -> Outcome | None:
        """Step the order and commit it: the outcome, or None when the compare-and-set
        refused (the fresh values are cached: step again)."""
        store_id, order_id = key
        keys = self.keys(store_id)
        cached = self._records.get(key)
        state = self._states.get(store_id)
        if cached is None or state is None:
            await self._guard(self._load(keys, key))
            return None
        rec_rev, record = cached
        now = self._now()
        out = step(record, command, Context(now, state.config, actor, state.offline))
        # A commit that changes nothing (a read's Tick) needs no id: if its reply is lost,
        # deciding it again is the same as a first attempt.
        writes = out.changed or bool(out.events or out.direct or out.audit)
        commit_id = secrets.token_hex(8) if writes else ""
        wait = self._wait_replicas > 0 and any(e.event in DURABLE_EVENTS for e in out.events)
        sent_at = time.monotonic()
        try:
            reply, replicated = await self._commit(keys, order_id, commit_id, rec_rev,
                                                   state.rev, now, record, out, wait)
        except _Unanswered as lost:
            if not writes:
                raise _Void(sent_at) from None
            log.warning("commit %s of %s unanswered (%s): resolving", commit_id, order_id, lost)
            self._records.pop(key, None)  # whatever happened, the cache can't know it
            applied, replicated = await self._resolve(keys, order_id, commit_id, sent_at, wait)
            metrics.REDIS_EVENTS.labels("commit_applied" if applied else "commit_void").inc()
            if not applied:  # nothing changed: decide afresh, as a first attempt would
                raise _Void(sent_at) from None
            reply = [1, now]
        if reply[0] == 2:  # already known to the log: never when sent once (see COMMIT)
            raise OutcomeUnknown(f"commit {commit_id} was already decided")
        if reply[0] == 0:
            _, real, new_rev, raw, fields = reply
            self._learn_time(int(real), reset=True)
            self._records[key] = (_text(new_rev), _record_decoder.decode(raw) if raw else None)
            self._states[store_id] = _state_of(fields)
            return None
        self._learn_time(int(reply[1]))
        if out.changed and len(reply) > 2:
            self._records[key] = (_text(reply[2]), out.record)
        if self._cluster and out.deadline is not None:
            await self._index_deadline(store_id, out.deadline)
        observe(store_id, order_id, out, int(reply[1]), started, type(command).__name__)
        if not replicated:
            raise OutcomeUnknown(f"no replica confirmed commit {commit_id} within "
                                 f"{self._wait_timeout_ms} ms")
        return out

    async def _index_deadline(self, store_id: str, deadline: int) -> None:
        """Lower the store's entry in the global deadline index (Cluster: not in the script).
        The commit applied already: a failure here must not turn its reply into a refusal."""
        try:
            await self._call(self.due_stores, "ZADD", self.due_stores, "LT", deadline, store_id)
        except Unavailable as exc:
            log.warning("deadline of store %s not indexed: %s", store_id, exc)

    async def _load(self, keys: Keys, key: tuple[str, str]) -> None:
        real, rec_rev, raw, fields = await self._evalsha(
            "LOAD", [keys.record(key[1]), keys.state], [])
        self._learn_time(int(real))
        self._records[key] = (_text(rec_rev), _record_decoder.decode(raw) if raw else None)
        self._states[key[0]] = _state_of(fields)
        if len(self._records) > 20_000:  # a bounded cache: a miss only costs a round trip
            self._records.clear()

    async def _commit(self, keys: Keys, order_id: str, commit_id: str, rec_rev: str,
                      state_rev: str, now: int, before: OrderRecord | None, out: Outcome,
                      wait: bool) -> tuple[list[Any], bool]:
        op = ("set" if out.record is not None else "del") if out.changed else "keep"
        channel = order_channel(keys.store_id, order_id)
        old_table = before.order.table_id if before is not None else ""
        new_table = out.record.order.table_id if out.record is not None else ""
        args: list[Any] = [
            rec_rev, state_rev, now, self._tolerance_ms, op,
            _record_encoder.encode(out.record) if op == "set" else b"",
            "" if out.deadline is None else out.deadline, order_id,
            keys.store_id, channel, keys.events(channel), keys.store_channel,
            keys.store_events, keys.holders, self._history_size, self._audit_size,
            len(out.events), len(out.direct), len(out.audit), self._max_unhandled,
            old_table, new_table, commit_id, COMMIT_LOG_MS, self._publish_command,
            keys.notices,
        ]
        for event in out.events:
            args += [event_body(event), event.table_id or "", event.notify or "",
                     direct_frame(event) if event.notify else b""]
        for holder, event in out.direct:
            args += [holder, direct_frame(event), coalescing_key(event)]
        for entry in out.audit:
            pin = unhandled_for(entry)
            args += [encode(entry), pin, encode(untracked(entry)) if pin else b""]
        key_list = [keys.record(order_id), keys.state, keys.seqs, keys.due, keys.orders,
                    keys.hist_order(order_id), keys.hist_store, keys.audit, keys.unhandled,
                    keys.unhandled_count, keys.table(old_table or new_table),
                    keys.table(new_table or old_table), keys.commits(order_id)]
        if not self._cluster:
            key_list.append(self.due_stores)
        reply, replicated = await self._run_once(key_list[0], "COMMIT", key_list, args, wait)
        return list(reply), replicated

    async def _resolve(self, keys: Keys, order_id: str, commit_id: str, sent_at: float,
                       wait: bool) -> tuple[bool, bool]:
        """Whether an unanswered commit applied (and, with `wait`, reached a replica): ask
        until Redis answers, with backoff, for up to RESOLVE_WITHIN_S after it was sent."""
        delay = 0.05
        while True:
            try:
                verdict, replicated = await self._run_once(
                    keys.record(order_id), "RESOLVE", [keys.commits(order_id)],
                    [commit_id, COMMIT_LOG_MS], wait)
                return _text(verdict) == "applied", replicated
            except (Unavailable, _Unanswered) as exc:
                log.debug("commit %s not resolved yet: %s", commit_id, exc)
            left = sent_at + RESOLVE_WITHIN_S - time.monotonic()
            if left <= 0:
                raise OutcomeUnknown(f"commit {commit_id} unresolved after "
                                     f"{RESOLVE_WITHIN_S:g} s")
            await asyncio.sleep(min(delay * (1 + random.random()), left))
            delay = min(delay * 2, 0.5)

    async def _run_once(self, route_key: str, name: str, key_list: list[str], args: list[Any],
                        wait: bool) -> tuple[Any, bool]:
        """Run a script exactly once, auto-pipelined with the other commits of this loop turn:
        a failure before it was written is Unavailable (nothing changed); after it was
        written, or any error reply (a script failing half-way keeps what it wrote), it is
        _Unanswered. With `wait`, on a connection kept for such commits, then WAIT there,
        which covers every write it made: whether `wait_replicas` replicas have them too."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                conn = (await self._link.waiting_connection(
                    route_key, self._wait_timeout_ms / 1000 + 1.0) if wait
                    else await self._link.connection(route_key))
        except (RespError, OSError, TimeoutError) as exc:
            raise Unavailable(str(exc) or type(exc).__name__) from None
        try:
            reply = await conn.evalsha(self._scripts[name], key_list, args)
        except NotSent as exc:
            raise Unavailable(str(exc)) from None
        except ReplyError as exc:
            self._link.check_stale(conn, exc)
            raise _Unanswered(str(exc)) from None
        except MaybeApplied as exc:
            raise _Unanswered(str(exc)) from None
        return reply, (await self._replicated(conn) if wait else True)

    async def _replicated(self, conn: RespConnection) -> bool:
        """WAIT on the connection that wrote: did enough replicas get its writes in time?"""
        try:
            acked = await conn.execute("WAIT", self._wait_replicas, self._wait_timeout_ms)
        except RespError as exc:
            log.warning("WAIT failed: %s", exc)
            return False
        if int(acked) < self._wait_replicas:
            metrics.REDIS_EVENTS.labels("wait_timeout").inc()
            return False
        return True

    async def read(self, store_id: str, order_id: str) -> OrderRecord | None:
        key = self.keys(store_id).record(order_id)
        raw = await self._call(key, "HGET", key, "rec")
        return _record_decoder.decode(raw) if raw else None

    async def find_order(self, store_id: str, table_id: str) -> str | None:
        keys = self.keys(store_id)
        raws = await self._guard(self._evalsha("TABLE_RECORDS",
            keys=[keys.table(table_id)], args=[keys.prefix + ":o:"]))
        best = best_for_table(map(_record_decoder.decode, raws), table_id)
        return best.order_id if best else None

    async def order_ids(self, store_id: str) -> list[str]:
        key = self.keys(store_id).orders
        members = await self._call(key, "SMEMBERS", key)
        return sorted(_text(m) for m in members)

    async def get_config(self, store_id: str) -> StoreConfig:
        return (await self._state(store_id)).config

    async def _state(self, store_id: str) -> StoreState:
        state = self._states.get(store_id)
        if state is None:
            key = self.keys(store_id).state
            state = self._states[store_id] = _state_of(await self._call(key, "HGETALL", key))
        return state

    async def put_config(self, store_id: str, config: StoreConfig) -> None:
        keys = self.keys(store_id)
        await self._guard(self._evalsha("PUT_CONFIG",
            keys=[keys.state], args=[encode(config), keys.config_news, self._publish_command]))
        self._states.pop(store_id, None)
        await self._retick_store(store_id)

    async def audit(self, store_id: str, kind: str | None, limit: int) -> list[AuditEntry]:
        keys = self.keys(store_id)
        entries, flat = await self._guard(asyncio.gather(
            self._link.execute(keys.audit, "XREVRANGE", keys.audit, "+", "-", "COUNT",
                               limit if not kind else self._audit_size),
            self._link.execute(keys.unhandled, "HGETALL", keys.unhandled)))
        unhandled = _fields(flat)
        found: dict[str, AuditEntry] = {}
        for entry_id, fields in entries:
            found[_text(entry_id)] = _audit_decoder.decode(_fields(fields)[b"e"])
        for entry_id, raw in unhandled.items():
            found.setdefault(_text(entry_id), _audit_decoder.decode(raw))
        open_ids = {_text(i) for i in unhandled}
        result = []
        for entry_id, entry in found.items():
            entry.id = entry_id
            if entry.handled is not None:  # one kept to be handled (see untracked)
                entry.handled = entry_id not in open_ids
            if not kind or entry.kind == kind:
                result.append(entry)
        result.sort(key=lambda e: tuple(int(p) for p in e.id.split("-")), reverse=True)
        return result[:limit]

    async def mark_handled(self, store_id: str, entry_id: str) -> bool:
        keys = self.keys(store_id)
        if await self._guard(self._evalsha("MARK_HANDLED",
                keys=[keys.unhandled, keys.unhandled_count], args=[entry_id])):
            return True
        if not _STREAM_ID.match(entry_id):
            return False
        return bool(await self._call(keys.audit, "XRANGE", keys.audit, entry_id, entry_id))

    # --- event streams -------------------------------------------------------------------------

    async def publish_store_event(self, store_id: str, event: Event) -> None:
        keys = self.keys(store_id)
        await self._guard(self._evalsha("PUBLISH_STORE",
            keys=[keys.seqs, keys.hist_store],
            args=[keys.store_channel, event_body(event), keys.store_events,
                  self._history_size, self._publish_command]))

    async def snapshot(self, channel: str) -> tuple[int, Any]:
        parsed = parse_channel(channel)
        assert parsed is not None
        store_id, order_id = parsed
        keys = self.keys(store_id)
        await self._follow(channel, keys)
        if order_id is not None:
            await self.apply(store_id, order_id, Tick(), None)  # expiry first
            seq, raw = await self._guard(self._evalsha("SNAPSHOT_ORDER",
                keys=[keys.record(order_id), keys.seqs, keys.unclaimed_seqs],
                args=[channel, order_id, order_channel(store_id, ""), keys.prefix + ":o:",
                      UNCLAIMED_SEQ_MS, self._max_unclaimed_seqs]))
            rec = _record_decoder.decode(raw) if raw else None
            snap: Any = OrderSnapshot(rec.order if rec else None,
                                      list(rec.locks.values()) if rec else [])
        else:
            seq, raws, terms = await self._guard(self._evalsha("SNAPSHOT_STORE",
                keys=[keys.orders, keys.terms, keys.seqs],
                args=[channel, keys.prefix + ":o:"]))
            orders: list[Order] = []
            locks: list[Lock] = []
            for raw in raws:
                rec = _record_decoder.decode(raw)
                if rec.order.status == "open":
                    orders.append(rec.order)
                    locks.extend(rec.locks.values())
            snap = StoreSnapshot(orders, locks, [_terminal_decoder.decode(t) for t in terms])
        # From here a later event that skips a seq is a gap to fill from the history, even
        # if this broker's subscription missed the events in between (say it was re-made).
        self._seen[channel] = max(self._seen.get(channel, 0), int(seq))
        return int(seq), snap

    async def history(self, channel: str, since: int) -> list[Numbered] | None:
        parsed = parse_channel(channel)
        assert parsed is not None
        await self._follow(channel, self.keys(parsed[0]))
        return await self._read_history(channel, since)

    async def _read_history(self, channel: str, since: int) -> list[Numbered] | None:
        if since >= MAX_SAFE_INT:
            return None  # no seq of ours gets there (and Redis could not read it as a stream id)
        parsed = parse_channel(channel)
        assert parsed is not None
        keys = self.keys(parsed[0])
        history = keys.history(parsed[1])
        seq_raw, entries = await self._guard(asyncio.gather(
            self._link.execute(keys.seqs, "HGET", keys.seqs, channel),
            self._link.execute(history, "XRANGE", history, f"{since + 1}-0", "+")))
        if seq_raw is None:
            return None  # a channel this Redis never numbered: the client's seq is another's
        seq = int(seq_raw)
        if since > seq:
            return None
        if since == seq:
            self._seen[channel] = max(self._seen.get(channel, 0), seq)
            return []
        frames = []
        for entry_id, flat in entries:
            fields = _fields(flat)
            body = fields.get(b"b")
            if body is None:  # kept whole by a broker before bodies (no frames in Redis)
                return None  # the subscriber takes a fresh snapshot instead
            seq = int(_text(entry_id).split("-")[0])
            frames.append(Numbered(seq, numbered_frame(channel, seq, body),
                                   _text(fields.get(b"t", b"")) or None))
        if not frames or frames[0].seq != since + 1:
            return None
        # As after a snapshot: a later event that skips a seq is a gap to fill.
        self._seen[channel] = max(self._seen.get(channel, 0), seq)
        return [entry for entry in frames if entry.seq <= seq]

    async def stream_epoch(self, channel: str) -> str:
        parsed = parse_channel(channel)
        assert parsed is not None
        return await self._guard(redis_sessions.stream_epoch(self._link.execute,
                                                             self.keys(parsed[0]).seqs))

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
                    metrics.REDIS_EVENTS.labels("resync").inc()
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
                    metrics.REDIS_EVENTS.labels("subscription_lost").inc()
                self._pubsub_ok.clear()
                self._close_pubsubs()
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)

    def _on_pubsub(self, channel: bytes, data: bytes) -> None:
        """Every message, inside the socket's read callback: handed on at once, decoded once,
        unless it must wait (a gap to fill first, a broker message to await), or a message
        before it still waits: then it is handled after those, in order (_drain)."""
        _HEARD.inc()
        if self._backlog is not None:
            self._backlog.append((channel, data))
        elif not self._deliver(channel.decode(), data):
            self._backlog = collections.deque([(channel, data)])
            self._spawn(self._drain())

    def _deliver(self, name: str, data: bytes) -> bool:
        """Hand a message on now; False if it needs _on_message (which may await)."""
        route = self._routes.get(name)
        if route is None:
            return True  # a channel left meanwhile
        kind, target = route
        if kind == "events":
            entries = _pub_decoder.decode(data)
            seen = self._seen
            for entry in entries:
                last = seen.get(entry[1])
                if last is not None and int(entry[2]) > last + 1:
                    return False  # a gap: filled from the history first
            self.received[kind] += 1
            for _, channel, seq_text, body, table_id, _, _ in entries:
                seq = int(seq_text)
                if seq > seen.get(channel, 0):
                    seen[channel] = seq
                self.sink.publish(channel, seq, numbered_frame(channel, seq, body.encode()),
                                  table_id or None)
            return True
        if kind == "rpc":
            return False
        self.received[kind] += 1
        if kind == "config":
            self._states.pop(target, None)
        else:
            for _, coalesce, _, body, _, holder, unless in _pub_decoder.decode(data):
                self.sink.direct(target, holder, body.encode(),
                                 tuple(unless.split("\n")) if unless else (), coalesce)
        return True

    async def _drain(self) -> None:
        backlog = self._backlog
        try:
            while backlog:
                channel, data = backlog[0]
                try:
                    await self._on_message(channel.decode(), data)
                except Exception:  # one bad message must not stop the others
                    log.exception("pub/sub message on %r failed", channel)
                backlog.popleft()
        finally:
            self._backlog = None

    async def _on_message(self, name: str, data: bytes) -> None:
        route = self._routes.get(name)
        if route is None:
            return  # a channel left meanwhile
        kind, target = route
        self.received[kind] += 1
        if kind == "rpc":
            await self._broker_message(data)
        elif kind == "config":
            self._states.pop(target, None)
        elif kind == "events":
            for _, channel, seq_text, body, table_id, _, _ in _pub_decoder.decode(data):
                seq = int(seq_text)
                # Only gaps are this broker's business: each connection drops what it has
                # already had (Hub.publish), so nothing is skipped here.
                seen = self._seen.get(channel)
                if seen is not None and seq > seen + 1:
                    metrics.REDIS_EVENTS.labels("gap_recovery").inc()
                    await self._recover(channel, seen)  # a gap: fill it from the history first
                if seq > self._seen.get(channel, 0):
                    self._seen[channel] = seq
                self.sink.publish(channel, seq, numbered_frame(channel, seq, body.encode()),
                                  table_id or None)
        else:  # direct notices for terminals of `target` connected here
            for _, coalesce, _, body, _, holder, unless in _pub_decoder.decode(data):
                self.sink.direct(target, holder, body.encode(),
                                 tuple(unless.split("\n")) if unless else (), coalesce)

    async def _recover(self, channel: str, since: int) -> None:
        """Deliver what a lost message or subscription skipped, or make subscribers re-snapshot."""
        try:
            missed = await self._read_history(channel, since)
        except Unavailable:
            return  # not now: the next event's gap brings us back here
        if missed is None:
            log.warning("history of %s no longer reaches seq %d", channel, since)
            self.sink.lost(channel)
            return
        for seq, frame, table_id in missed:  # connections drop what they already had
            self.sink.publish(channel, seq, frame, table_id)
        if missed:
            self._seen[channel] = max(self._seen.get(channel, 0), missed[-1].seq)

    async def _resync(self) -> None:
        """After a lost subscription: fill every local channel's gap, re-announce presence."""
        for channel, seen in list(self._seen.items()):
            if self.sink.has_subscribers(channel):
                await self._recover(channel, seen)
            else:
                del self._seen[channel]
        await self._reannounce()

    # --- sessions (redis_sessions.py) ----------------------------------------------------------

    async def keep_session(self, store_id: str, session_id: str, session: StoredSession,
                           ttl_ms: int | None) -> None:
        key = redis_sessions.session_key(self._prefix, store_id, session_id)
        await self._eval("KEEP_SESSION", [key], [redis_sessions.session_ttl_ms(ttl_ms),
                                                 *redis_sessions.session_fields(session)])

    async def find_session(self, store_id: str, session_id: str) -> StoredSession | None:
        key = redis_sessions.session_key(self._prefix, store_id, session_id)
        return await self._guard(redis_sessions.find_session(self._link.execute, key))

    # --- presence ------------------------------------------------------------------------------

    async def terminal_up(self, terminal: Terminal, authority: bool = False) -> None:
        key = (terminal.store_id, holder_key(terminal))
        lingering = self._lingering.pop(key, None)
        if lingering is not None:  # a phone back within its linger: Redis never saw it go
            lingering.cancel()
        _, count, was_authority = self._local.get(key, (terminal, 0, False))
        self._local[key] = (terminal, count + 1, authority or was_authority)
        await self._listen_to_store(terminal.store_id, +1)
        await self._sync_presence(key, terminal)

    async def terminal_down(self, terminal: Terminal) -> None:
        key = (terminal.store_id, holder_key(terminal))
        entry = self._local.get(key)
        if entry is None:
            return
        if entry[1] > 1:
            self._local[key] = (entry[0], entry[1] - 1, entry[2])
        elif presence_lingers(terminal.role) and self._linger_s > 0:
            # As in the memory backend: a phone is said gone only after the linger, so that
            # one reconnecting in a loop cannot flush the store channel's history.
            self._local[key] = (entry[0], 0, entry[2])
            self._lingering[key] = asyncio.get_running_loop().call_later(
                self._linger_s, self._linger_ended, key, terminal)
            await self._listen_to_store(terminal.store_id, -1)
            return
        else:
            del self._local[key]
        try:
            await self._sync_presence(key, terminal)
        finally:
            await self._listen_to_store(terminal.store_id, -1)

    async def online_terminals(self, store_id: str) -> list[Terminal]:
        key = self.keys(store_id).terms
        values = await self._call(key, "HVALS", key)
        return [_terminal_decoder.decode(v) for v in values]

    async def authority(self, store_id: str) -> str | None:
        """The broker holding the store's order authority: an erp_main first, ours first."""
        key = self.keys(store_id).auths
        fields = _fields(await self._call(key, "HGETALL", key))
        best: tuple[bool, bool, str] | None = None
        for name, role in fields.items():
            broker = _text(name).rsplit("|", 1)[-1]
            rank = (is_first_authority(_text(role)), broker == self.broker_id, broker)
            if best is None or rank > best:
                best = rank
        return best[2] if best else None

    def _linger_ended(self, key: tuple[str, str], terminal: Terminal) -> None:
        self._lingering.pop(key, None)
        entry = self._local.get(key)
        if entry is None or entry[1] > 0:
            return
        del self._local[key]
        task = asyncio.get_running_loop().create_task(self._say_gone(key, terminal))
        self._linger_tasks.add(task)
        task.add_done_callback(self._linger_tasks.discard)

    async def _say_gone(self, key: tuple[str, str], terminal: Terminal) -> None:
        with contextlib.suppress(Unavailable):  # said again once Redis is back (_presence_unsent)
            await self._sync_presence(key, terminal)

    async def _sync_presence(self, key: tuple[str, str], terminal: Terminal) -> None:
        """Tell Redis how many connections this broker has for the terminal *now*. One at a
        time per terminal, so that a goodbye's count can't land after the next hello's; one
        that fails is said again after Redis returns (see _resync)."""
        lock = self._presence_locks.get(key)
        if lock is None:
            lock = self._presence_locks[key] = asyncio.Lock()
        async with lock:
            entry = self._local.get(key)
            count, authority = (entry[1], entry[2]) if entry else (0, False)
            try:
                await self._announce(terminal, count, authority)
            except Unavailable:
                self._presence_unsent[key] = terminal
                raise
            self._presence_unsent.pop(key, None)
        if key not in self._local and not lock.locked():
            self._presence_locks.pop(key, None)

    async def _announce(self, terminal: Terminal, count: int, authority: bool,
                        broker_id: str | None = None, since: int | None = None) -> None:
        keys = self.keys(terminal.store_id)
        holder = holder_key(terminal)
        now = await self.now()
        online = event_body(Event("terminal.online", now, terminal=terminal))
        offline = event_body(Event("terminal.offline", now, terminal=terminal))
        before, after = await self._guard(self._evalsha("PRESENCE",
            keys=[keys.state, keys.terms, keys.conns, keys.auths, keys.seqs, keys.hist_store,
                  keys.holders + holder],
            args=[holder, broker_id or self.broker_id, count, encode(terminal),
                  terminal.role, "1" if authority else "0", keys.store_channel, online,
                  keys.store_events, self._history_size, "" if since is None else since,
                  "1" if has_grace(terminal.role) else "0", offline, self._publish_command]))
        if has_grace(terminal.role) and (before == 0) != (after == 0):
            self._states.pop(terminal.store_id, None)
            await self._retick_store(terminal.store_id)

    async def _reannounce(self) -> None:
        """Say every local connection again, and what Redis missed (idempotent)."""
        terminals = {key: entry[0] for key, entry in self._local.items()}
        terminals.update(self._presence_unsent)
        for key, terminal in terminals.items():
            with contextlib.suppress(Unavailable):
                await self._sync_presence(key, terminal)

    async def _retick_store(self, store_id: str) -> None:
        """Recompute every pending deadline of a store (its grace or presence changed)."""
        key = self.keys(store_id).due
        order_ids = await self._call(key, "ZRANGE", key, 0, -1)
        for order_id in order_ids:
            await self.apply(store_id, _text(order_id), Tick(), None)

    # --- connection counts: the limits across brokers ------------------------------------------

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

    # --- broker-to-broker control --------------------------------------------------------------

    async def send_to_broker(self, broker_id: str, payload: bytes) -> None:
        channel = f"{self._prefix}rpc:{broker_id}"
        await self._call(channel, self._publish_command, channel, payload)

    # --- background work: deadlines and broker liveness ----------------------------------------

    async def _sweep(self) -> None:
        """Expire what is due, whoever granted it; each broker polls the store index.
        N live brokers each poll N times less often: the index is polled at the same rate
        in all (an idle poll costs a broker ~0.3 ms of CPU: 20 a second each was the fixed
        cost that grew with N)."""
        while True:
            await asyncio.sleep(self._sweep_interval_s * self._live_brokers
                                * (0.5 + random.random()))
            try:
                now = await self.now()
                stores = await self._call(self.due_stores, "ZRANGEBYSCORE", self.due_stores,
                                          "-inf", now)
                for store in stores:
                    await self._sweep_store(_text(store), now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: try again next round
                log.debug("sweep failed: %s", exc)

    async def _sweep_store(self, store_id: str, now: int) -> None:
        keys = self.keys(store_id)
        due = await self._call(keys.due, "ZRANGEBYSCORE", keys.due, "-inf", now, "LIMIT", 0, 500)
        await asyncio.gather(*(self.apply(store_id, _text(o), Tick(), None) for o in due),
                             return_exceptions=True)
        # Move the store's index entry to its next deadline without losing one that a
        # concurrent commit lowered meanwhile: raise it (GT), then lower it (LT) if needed.
        first = await self._call(keys.due, "ZRANGE", keys.due, 0, 0, "WITHSCORES")
        nxt = float(first[1]) if first else float("inf")
        await self._call(self.due_stores, "ZADD", self.due_stores, "GT", nxt, store_id)
        again = await self._call(keys.due, "ZRANGE", keys.due, 0, 0, "WITHSCORES")
        if again and float(again[1]) < nxt:
            await self._call(self.due_stores, "ZADD", self.due_stores, "LT", again[1], store_id)

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
                        await self._retire_dead_broker(_text(broker), int(float(last_seen)))
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
            store_id = _text(store)
            keys = self.keys(store_id)
            holders = await self._guard(self._evalsha("DEAD_FIELDS",
                keys=[keys.conns], args=[broker_id]))
            for holder in holders:
                raw = await self._call(keys.terms, "HGET", keys.terms, holder)
                role, _, sub = _text(holder).partition(":")
                terminal = (_terminal_decoder.decode(raw) if raw else
                            Terminal(sub, role, sub, store_id))  # type: ignore[arg-type]
                await self._announce(terminal, 0, False, broker_id=broker_id, since=last_seen)
        await self._call(stores_key, "DEL", stores_key)
        await self._call(self.brokers, "ZREM", self.brokers, broker_id)
