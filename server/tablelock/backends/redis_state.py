"""Order state on Redis: the commit with its id (and RESOLVE when its reply was lost), the
record cache, reads, the table index, config, the audit log, and the deadline sweep."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import time
from typing import Any

import msgspec

from .. import metrics
from ..model import AuditEntry, OrderRecord, StoreConfig, Terminal
from ..protocol import direct_frame, encode, event_body, order_channel
from ..rules import Command, Context, Outcome, Tick, coalescing_key, step
from .base import (
    OutcomeUnknown,
    Unavailable,
    best_for_table,
    observe,
    unhandled_for,
    untracked,
)
from .redis_core import (
    CALL_TIMEOUT_S,
    Keys,
    RedisCore,
    StoreState,
    as_text,
    hash_fields,
    record_decoder,
    state_of,
)
from .resp import MaybeApplied, NotSent, ReplyError, RespConnection, RespError

log = logging.getLogger("tablelock.redis")

MAX_ATTEMPTS = 16
# A write whose reply was lost is resolved within this, else answered with outcome unknown.
RESOLVE_WITHIN_S = 5.0
# How long an order's commit log keeps a commit id: far past any resolve, and past the time
# tolerance after which a commit still in flight is refused anyway.
COMMIT_LOG_MS = 60_000
# What `wait_replicas` makes wait for a replica: grants and payments.
DURABLE_EVENTS = frozenset({"lock.acquired", "lock.forced", "order.paid"})

_record_encoder = msgspec.msgpack.Encoder()
_audit_decoder = msgspec.json.Decoder(AuditEntry)
# Each part of a stream id is below 2^64: 19 digits always are, and ours are milliseconds.
_STREAM_ID = re.compile(r"^\d{1,19}-\d{1,19}$")


class _Unanswered(Exception):
    """A write left for Redis and no reply came back: it may have been applied."""


class _Void(Exception):
    """A commit whose reply was lost did not apply, and now never will."""

    def __init__(self, sent_at: float) -> None:
        super().__init__("void")
        self.sent_at = sent_at


class RedisOrderState(RedisCore):
    """OrderState on Redis (the clock is the core's)."""

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
            metrics.REDIS_EVENTS.inc("commit_applied" if applied else "commit_void")
            if not applied:  # nothing changed: decide afresh, as a first attempt would
                raise _Void(sent_at) from None
            reply = [1, now]
        if reply[0] == 2:  # already known to the log: never when sent once (see COMMIT)
            raise OutcomeUnknown(f"commit {commit_id} was already decided")
        if reply[0] == 0:
            _, real, new_rev, raw, fields = reply
            self._learn_time(int(real), reset=True)
            self._records[key] = (as_text(new_rev), record_decoder.decode(raw) if raw else None)
            self._states[store_id] = state_of(fields)
            return None
        self._learn_time(int(reply[1]))
        if out.changed and len(reply) > 2:
            self._records[key] = (as_text(reply[2]), out.record)
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
        self._records[key] = (as_text(rec_rev), record_decoder.decode(raw) if raw else None)
        self._states[key[0]] = state_of(fields)
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
                return as_text(verdict) == "applied", replicated
            except (Unavailable, _Unanswered) as exc:
                log.debug("commit %s not resolved yet: %s", commit_id, exc)
            left = sent_at + RESOLVE_WITHIN_S - time.monotonic()
            if left <= 0:
                raise OutcomeUnknown(f"commit {commit_id} unresolved after "
                                     f"{RESOLVE_WITHIN_S:g} s")
            await asyncio.sleep(min(delay * (1 + random.random()), left))
            delay = min(delay * 2, 0.5)

    async def _run_once(self, route_key: str, name: str, key_list: list[str], args: list[Any],
                        wait: bool, fresh: bool = False) -> tuple[Any, bool]:
        """Run a script exactly once, auto-pipelined with the other commits of this loop turn:
        a failure before it was written is Unavailable (nothing changed); after it was
        written, or any error reply (a script failing half-way keeps what it wrote), it is
        _Unanswered. With `wait`, on a connection kept for such commits, then WAIT there,
        which covers every write it made: whether `wait_replicas` replicas have them too.
        A connection found closed as the script went out (Redis restarted since) is replaced
        once (`fresh`): the script was not sent."""
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
            if fresh:
                raise Unavailable(str(exc)) from None
            return await self._run_once(route_key, name, key_list, args, wait, fresh=True)
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
            metrics.REDIS_EVENTS.inc("wait_timeout")
            return False
        return True

    async def read(self, store_id: str, order_id: str) -> OrderRecord | None:
        key = self.keys(store_id).record(order_id)
        raw = await self._call(key, "HGET", key, "rec")
        return record_decoder.decode(raw) if raw else None

    async def find_order(self, store_id: str, table_id: str) -> str | None:
        keys = self.keys(store_id)
        raws = await self._guard(self._evalsha("TABLE_RECORDS",
            keys=[keys.table(table_id)], args=[keys.prefix + ":o:"]))
        best = best_for_table(map(record_decoder.decode, raws), table_id)
        return best.order_id if best else None

    async def order_ids(self, store_id: str) -> list[str]:
        key = self.keys(store_id).orders
        members = await self._call(key, "SMEMBERS", key)
        return sorted(as_text(m) for m in members)

    async def get_config(self, store_id: str) -> StoreConfig:
        return (await self._state(store_id)).config

    async def _state(self, store_id: str) -> StoreState:
        state = self._states.get(store_id)
        if state is None:
            key = self.keys(store_id).state
            state = self._states[store_id] = state_of(await self._call(key, "HGETALL", key))
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
        unhandled = hash_fields(flat)
        found: dict[str, AuditEntry] = {}
        for entry_id, fields in entries:
            found[as_text(entry_id)] = _audit_decoder.decode(hash_fields(fields)[b"e"])
        for entry_id, raw in unhandled.items():
            found.setdefault(as_text(entry_id), _audit_decoder.decode(raw))
        open_ids = {as_text(i) for i in unhandled}
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

    async def _retick_store(self, store_id: str) -> None:
        """Recompute every pending deadline of a store (its grace or presence changed)."""
        key = self.keys(store_id).due
        order_ids = await self._call(key, "ZRANGE", key, 0, -1)
        for order_id in order_ids:
            await self.apply(store_id, as_text(order_id), Tick(), None)

    # --- background work: deadlines ----------------------------------------------------------

    async def _sweep(self) -> None:
        """Expire what is due, whoever granted it; each broker polls the store index."""
        while True:
            # N live brokers each poll N times less often: the index is polled at the same
            # rate in all (an idle poll costs a broker ~0.3 ms of CPU: 20 a second each was
            # the fixed cost that grew with N).
            await asyncio.sleep(self._sweep_interval_s * self._live_brokers
                                * (0.5 + random.random()))
            try:
                now = await self.now()
                stores = await self._call(self.due_stores, "ZRANGEBYSCORE", self.due_stores,
                                          "-inf", now)
                for store in stores:
                    await self._sweep_store(as_text(store), now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: try again next round
                log.debug("sweep failed: %s", exc)

    async def _sweep_store(self, store_id: str, now: int) -> None:
        keys = self.keys(store_id)
        due = await self._call(keys.due, "ZRANGEBYSCORE", keys.due, "-inf", now, "LIMIT", 0, 500)
        await asyncio.gather(*(self.apply(store_id, as_text(o), Tick(), None) for o in due),
                             return_exceptions=True)
        # Move the store's index entry to its next deadline without losing one that a
        # concurrent commit lowered meanwhile: raise it (GT), then lower it (LT) if needed.
        first = await self._call(keys.due, "ZRANGE", keys.due, 0, 0, "WITHSCORES")
        nxt = float(first[1]) if first else float("inf")
        await self._call(self.due_stores, "ZADD", self.due_stores, "GT", nxt, store_id)
        again = await self._call(keys.due, "ZRANGE", keys.due, 0, 0, "WITHSCORES")
        if again and float(again[1]) < nxt:
            await self._call(self.due_stores, "ZADD", self.due_stores, "LT", again[1], store_id)
