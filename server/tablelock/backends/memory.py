"""The embedded default backend: dicts, one event loop, timers for deadlines.

Atomicity comes from the event loop: `apply` never awaits between reading a
record and publishing its events. Deadlines are loop timers (`call_at`), one
per order that has one, so nothing polls; a timer only wakes the record and
`rules.step` decides what lapsed.

With a data file (`--data`, durable.py), every change is also queued to the file, and what
depends on it (the reply, a read, an event) waits until it is on disk.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import msgspec

from ..model import AuditEntry, Event, Lock, Order, OrderRecord, StoreConfig, Terminal, holder_key
from ..protocol import (
    OrderSnapshot,
    StoreSnapshot,
    direct_frame,
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
    presence_lingers,
    step,
)
from .base import (
    Backend,
    EventSink,
    Numbered,
    StoredSession,
    best_for_table,
    first_seq,
    observe,
    unhandled_for,
    untracked,
)
from .durable import AfterSync, Journal, Saved

OrderKey = tuple[str, str]  # (store_id, order_id)
_NONE: frozenset[str] = frozenset()
K = TypeVar("K")


class Clock(Protocol):
    """The backend's one clock (a test passes one it moves by hand)."""

    def now(self) -> int:
        """Epoch milliseconds."""
        ...

    def loop_time_of(self, ms: int) -> float:
        """The event-loop time at which the clock reads `ms`."""
        ...


class MonotonicClock:
    """Epoch milliseconds that never go back: wall time at start plus monotonic time since.

    `after_ms`: a time the clock must start past (the latest one a data file records), so
    that tokens keep increasing across a restart even if the wall clock went back."""

    def __init__(self, after_ms: int = 0) -> None:
        self._wall0 = max(time.time(), (after_ms + 1) / 1000)
        self._mono0 = time.monotonic()

    def now(self) -> int:
        return int((self._wall0 + time.monotonic() - self._mono0) * 1000)

    def loop_time_of(self, ms: int) -> float:
        """The event-loop time (time.monotonic) at which this clock reads `ms`."""
        return self._mono0 + ms / 1000 - self._wall0


class Deadlines:
    """When each record must be stepped next, behind one loop timer.

    A heap of (deadline, key) with the latest deadline per key in `_due`; entries
    that no longer match are skipped when they come up. Setting a deadline costs a
    heap push, not a loop timer created and cancelled for every lock.
    """

    def __init__(self, clock: Clock, wake: Callable[[OrderKey], None]) -> None:
        self._clock = clock
        self._wake = wake
        self._due: dict[OrderKey, int] = {}
        self._heap: list[tuple[int, OrderKey]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None

    def set(self, key: OrderKey, deadline: int | None) -> None:
        if deadline is None:
            self._due.pop(key, None)
            return
        if self._due.get(key) == deadline:
            return
        self._due[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        if len(self._heap) > 2 * len(self._due) + 1024:  # drop what was overtaken
            self._heap = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._heap)
        if self._timer_at is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, deadline: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        # +1 ms: a timer may fire a hair early, and the step must see the deadline passed.
        self._timer = loop.call_at(self._clock.loop_time_of(deadline + 1), self.fire)
        self._timer_at = deadline

    def fire(self) -> None:
        """Wake every record whose deadline the clock passed (the timer's job; a test that
        moves its clock by hand calls it too)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        now = self._clock.now()
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            if self._due.get(key) == deadline:
                del self._due[key]
                self._wake(key)  # may set new deadlines, and arm the timer
        if heap and (self._timer_at is None or heap[0][0] < self._timer_at):
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Channel:
    """A channel's seq, epoch and bounded history; the history (760 bytes even empty) is only
    made when the first event comes, so that quiet channels with subscribers cost little.
    The epoch is new with each Channel: a channel made again (or by a restarted broker)
    numbers another stream."""

    __slots__ = ("epoch", "history", "seq", "size")

    def __init__(self, size: int, first_seq: int) -> None:
        self.seq = first_seq
        self.epoch = secrets.token_hex(4)
        self.size = size
        self.history: deque[Numbered] | None = None

    def append(self, entry: Numbered) -> None:
        if self.history is None:
            self.history = deque(maxlen=self.size)
        self.history.append(entry)


class StoreAudit:
    """A bounded audit log whose unhandled `payment.rejected` entries are never evicted.

    Entries are kept encoded: bytes cost the garbage collector nothing, and the log is
    read far less often than it is written."""

    __slots__ = ("entries", "unhandled", "unhandled_by")

    def __init__(self, size: int) -> None:
        self.entries: deque[bytes] = deque(maxlen=size)
        self.unhandled: dict[str, bytes] = {}
        self.unhandled_by: dict[str, int] = {}  # terminal (base.unhandled_for) -> how many


_audit_encoder = msgspec.json.Encoder()
_audit_decoder = msgspec.json.Decoder(AuditEntry)


class MemoryBackend(Backend):

    def __init__(self, history_size: int = 512, audit_size: int = 10_000,
                 h5_presence_linger_ms: int = 3_000, max_unhandled_per_terminal: int = 100,
                 journal: Journal | None = None, clock: Clock | None = None) -> None:
        super().__init__()
        self._journal = journal
        saved = journal.load(audit_size) if journal is not None else None
        self.clock = clock or MonotonicClock(saved.latest_ms if saved is not None else 0)
        self._linger_s = h5_presence_linger_ms / 1000
        self._lingering: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._max_unhandled = max_unhandled_per_terminal
        self._history_size = history_size
        self._audit_size = audit_size
        self._records: dict[OrderKey, OrderRecord] = {}
        self._orders_of_store: dict[str, set[str]] = {}
        # (store, table) -> its orders: order.get by table_id reads a table's, not a store's
        self._orders_of_table: dict[tuple[str, str], set[str]] = {}
        self.deadlines = Deadlines(self.clock, self._wake)
        self._channels: dict[str, Channel] = {}
        self._configs: dict[str, StoreConfig] = {}
        # Terminals by store and holder_key (role and sub: model.holder_key says why).
        self._online: dict[str, dict[str, tuple[Terminal, int]]] = {}
        self._offline: dict[str, dict[str, int]] = {}
        self._holdings: dict[tuple[str, str], set[str]] = {}  # (store, holder) -> orders
        # Connections counted for the limits, by store and by (store, holder_key).
        self._store_connections: dict[str, int] = {}
        self._terminal_connections: dict[tuple[str, str], int] = {}
        self._audit: dict[str, StoreAudit] = {}
        self._audit_seq = 0
        self._default_config = StoreConfig()
        # (store, session id) -> the session, and the timer of its end once detached
        self._sessions: dict[tuple[str, str], StoredSession] = {}
        self._session_ends: dict[tuple[str, str], asyncio.TimerHandle] = {}
        if saved is not None:
            self._restore(saved)

    def _restore(self, saved: Saved) -> None:
        for key, rec in saved.records.items():
            self._store(key, None, rec)
        self._configs.update(saved.configs)
        for store_id, rows in saved.audit.items():
            log = self._audit[store_id] = StoreAudit(self._audit_size)
            for entry_id, raw, unhandled in rows:
                log.entries.append(raw)
                if unhandled:
                    pin = unhandled_for(_audit_decoder.decode(raw))
                    log.unhandled[str(entry_id)] = raw
                    log.unhandled_by[pin] = log.unhandled_by.get(pin, 0) + 1
        self._audit_seq = saved.last_audit_id

    async def start(self, sink: EventSink) -> None:
        if self._journal is None:
            await super().start(sink)
            return
        await super().start(AfterSync(sink, self._journal))
        # Nobody is connected after a restart: the holders of restored locks went offline
        # now, so that a paying terminal gets its whole grace to come back (an h5 lock ends
        # at its TTL, as ever); then the rules decide what lapsed while the broker was down.
        now = self.clock.now()
        for (store_id, _), rec in self._records.items():
            for lock in rec.locks.values():
                if has_grace(lock.holder.role):
                    self._offline.setdefault(store_id, {})[holder_key(lock.holder)] = now
        for store_id, order_id in list(self._records):
            self.apply_now(store_id, order_id, Tick(), None)
        await self._synced()

    async def close(self) -> None:
        self.deadlines.close()
        for ending in self._session_ends.values():
            ending.cancel()
        if self._journal is not None:
            await self._journal.close()

    async def ready(self) -> bool:
        return self._journal is None or self._journal.failed is None

    async def _synced(self) -> None:
        """With a data file: until what was done so far is on disk, so that nothing is
        answered or shown before it would survive a crash."""
        if self._journal is not None:
            await self._journal.synced()

    # --- order state ---------------------------------------------------------------------------

    async def now(self) -> int:
        return self.clock.now()

    async def apply(self, store_id: str, order_id: str, command: Command,
                    actor: Terminal | None) -> Outcome:
        if self._journal is None:
            return self.apply_now(store_id, order_id, command, actor)
        self._journal.check()
        out = self.apply_now(store_id, order_id, command, actor)
        await self._journal.synced()
        return out

    def apply_now(self, store_id: str, order_id: str, command: Command,
                  actor: Terminal | None) -> Outcome:
        started = time.perf_counter()
        key = (store_id, order_id)
        before = self._records.get(key)
        ctx = Context(self.clock.now(), self._configs.get(store_id, self._default_config), actor,
                      self._offline.get(store_id, {}))
        out = step(before, command, ctx)
        if out.changed:
            self._store(key, before, out.record)
            if self._journal is not None:
                self._journal.put_record(store_id, order_id, out.record)
        self._publish(store_id, order_id, out)
        self.deadlines.set(key, out.deadline)
        observe(store_id, order_id, out, ctx.now, started, type(command).__name__)
        return out

    def _store(self, key: OrderKey, before: OrderRecord | None, after: OrderRecord | None) -> None:
        store_id, order_id = key
        if after is None:
            self._records.pop(key, None)
            self._orders_of_store.get(store_id, set()).discard(order_id)
            self._channels.pop(order_channel(store_id, order_id), None)
        else:
            self._records[key] = after
            self._orders_of_store.setdefault(store_id, set()).add(order_id)
        old_table = before.order.table_id if before is not None else None
        new_table = after.order.table_id if after is not None else None
        if old_table != new_table:  # the table index follows the record
            if old_table is not None:
                orders = self._orders_of_table.get((store_id, old_table))
                if orders is not None:
                    orders.discard(order_id)
                    if not orders:
                        del self._orders_of_table[(store_id, old_table)]
            if new_table is not None:
                self._orders_of_table.setdefault((store_id, new_table), set()).add(order_id)
        old = {holder_key(lock.holder) for lock in before.locks.values()} if before else _NONE
        new = {holder_key(lock.holder) for lock in after.locks.values()} if after else _NONE
        if old == new:
            return
        for holder in old - new:
            held = self._holdings.get((store_id, holder))
            if held is not None:
                held.discard(order_id)
                if not held:
                    del self._holdings[(store_id, holder)]
        for holder in new - old:
            self._holdings.setdefault((store_id, holder), set()).add(order_id)

    def _wake(self, key: OrderKey) -> None:
        self.apply_now(key[0], key[1], Tick(), None)

    def _retick(self, store_id: str, order_ids: Iterable[str]) -> None:
        for order_id in list(order_ids):
            self.apply_now(store_id, order_id, Tick(), None)

    async def read(self, store_id: str, order_id: str) -> OrderRecord | None:
        rec = self._records.get((store_id, order_id))
        await self._synced()
        return rec

    async def find_order(self, store_id: str, table_id: str) -> str | None:
        order_ids = self._orders_of_table.get((store_id, table_id), ())
        best = best_for_table((self._records[(store_id, oid)] for oid in order_ids), table_id)
        await self._synced()
        return best.order_id if best else None

    async def order_ids(self, store_id: str) -> list[str]:
        return list(self._orders_of_store.get(store_id, ()))

    async def get_config(self, store_id: str) -> StoreConfig:
        config = self._configs.get(store_id, self._default_config)
        await self._synced()
        return config

    async def put_config(self, store_id: str, config: StoreConfig) -> None:
        if self._journal is not None:
            self._journal.check()
            self._journal.put_config(store_id, config)
        self._configs[store_id] = config
        # The grace may have changed: every deadline of the store is recomputed.
        self._retick(store_id, self._orders_of_store.get(store_id, ()))
        await self._synced()

    async def audit(self, store_id: str, kind: str | None, limit: int) -> list[AuditEntry]:
        log = self._audit.get(store_id)
        entries = self._entries(log) if log is not None else []
        if kind:
            entries = [e for e in entries if e.kind == kind]
        await self._synced()
        return entries[:limit]

    def _append_audit(self, store_id: str, entries: list[AuditEntry]) -> None:
        log = self._audit.get(store_id)
        if log is None:
            log = self._audit[store_id] = StoreAudit(self._audit_size)
        for entry in entries:
            self._audit_seq += 1
            pin = unhandled_for(entry)
            if pin and log.unhandled_by.get(pin, 0) >= self._max_unhandled:
                entry, pin = untracked(entry), ""
            entry.id = str(self._audit_seq)
            raw = _audit_encoder.encode(entry)
            if self._journal is not None:
                if len(log.entries) == log.entries.maxlen:
                    evicted = _audit_decoder.decode(log.entries[0]).id
                    self._journal.evict_audit(store_id, int(evicted))
                self._journal.add_audit(store_id, self._audit_seq, raw, bool(pin))
            log.entries.append(raw)
            if pin:
                log.unhandled[entry.id] = raw
                log.unhandled_by[pin] = log.unhandled_by.get(pin, 0) + 1

    def _entries(self, log: StoreAudit) -> list[AuditEntry]:
        """Every kept entry, newest first; evicted but unhandled ones stay listed."""
        found = {entry.id: entry for entry in map(_audit_decoder.decode, log.entries)}
        for entry_id, raw in log.unhandled.items():
            found.setdefault(entry_id, _audit_decoder.decode(raw))
        for entry in found.values():
            if entry.handled is not None:
                entry.handled = entry.id not in log.unhandled
        return sorted(found.values(), key=lambda e: int(e.id), reverse=True)

    async def mark_handled(self, store_id: str, entry_id: str) -> bool:
        log = self._audit.get(store_id)
        if log is None:
            return False
        raw = log.unhandled.pop(entry_id, None)
        if raw is not None:
            pin = unhandled_for(_audit_decoder.decode(raw))
            left = log.unhandled_by.get(pin, 1) - 1
            if left > 0:
                log.unhandled_by[pin] = left
            else:
                log.unhandled_by.pop(pin, None)
            if self._journal is not None:
                self._journal.mark_handled(store_id, int(entry_id))
                await self._journal.synced()
            return True
        return any(entry.id == entry_id for entry in self._entries(log))

    # --- event streams -------------------------------------------------------------------------

    async def publish_store_event(self, store_id: str, event: Event) -> None:
        self._number(store_channel(store_id), event_body(event))

    def _publish(self, store_id: str, order_id: str, out: Outcome) -> None:
        if out.audit:  # first: with a data file, what is sent below waits for its entries too
            self._append_audit(store_id, out.audit)
        if out.events:
            channels = (order_channel(store_id, order_id), store_channel(store_id))
            for event in out.events:
                body = event_body(event)
                for name in channels:
                    self._number(name, body, event.table_id)
                if event.notify is not None:
                    self.sink.direct(store_id, event.notify, direct_frame(event),
                                     channels)
        for holder, event in out.direct:
            self.sink.direct(store_id, holder, direct_frame(event), (),
                             coalescing_key(event))

    def _channel(self, name: str) -> Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(self._history_size,
                                                     first_seq(self.clock.now()))
        return channel

    def _number(self, name: str, body: bytes, table_id: str | None = None) -> None:
        channel = self._channel(name)
        channel.seq += 1
        frame = numbered_frame(name, channel.seq, body)
        channel.append(Numbered(channel.seq, frame, table_id))
        self.sink.publish(name, channel.seq, frame, table_id)

    async def snapshot(self, channel: str) -> tuple[int, str, Any]:
        parsed = parse_channel(channel)
        assert parsed is not None
        store_id, order_id = parsed
        if order_id is not None:
            rec = self.apply_now(store_id, order_id, Tick(), None).record
            snap: Any = OrderSnapshot(rec.order if rec else None,
                                      list(rec.locks.values()) if rec else [])
        else:
            orders: list[Order] = []
            locks: list[Lock] = []
            for oid in self._orders_of_store.get(store_id, ()):
                rec = self._records[(store_id, oid)]
                if rec.order.status == "open":
                    orders.append(rec.order)
                    locks.extend(rec.locks.values())
            terminals = [t for t, _ in self._online.get(store_id, {}).values()]
            snap = StoreSnapshot(orders, locks, terminals)
        numbering = self._channel(channel)
        seq, epoch = numbering.seq, numbering.epoch
        await self._synced()
        return seq, epoch, snap

    async def history(self, channel: str, since: int) -> list[Numbered] | None:
        found = self._channels.get(channel)
        if found is None:
            return None
        seq = found.seq
        if since > seq:
            return None
        if since == seq:
            return []
        history = found.history or ()
        oldest = history[0].seq if history else seq + 1
        if since + 1 < oldest:
            return None
        missed = [entry for entry in history if entry.seq > since]
        await self._synced()
        return missed

    async def stream_epoch(self, channel: str) -> str:
        return self._channel(channel).epoch

    def channel_idle(self, channel: str) -> None:
        """An order channel numbers nothing until its order exists: one subscribed to for an
        order never seen goes with its last subscriber (a new one starts from the clock)."""
        parsed = parse_channel(channel)
        if parsed is not None and parsed[1] is not None and (parsed not in self._records):
            self._channels.pop(channel, None)

    # --- presence ------------------------------------------------------------------------------

    async def terminal_up(self, terminal: Terminal, authority: bool = False) -> None:
        online = self._online.setdefault(terminal.store_id, {})
        key = holder_key(terminal)
        entry = online.get(key)
        if entry is not None:  # another connection, or a phone back within its linger
            online[key] = (entry[0], entry[1] + 1)
            lingering = self._lingering.pop((terminal.store_id, key), None)
            if lingering is not None:
                lingering.cancel()
            return
        online[key] = (terminal, 1)
        was_offline = self._offline.get(terminal.store_id, {}).pop(key, None)
        self._number(store_channel(terminal.store_id),
                     event_body(Event("terminal.online", self.clock.now(), terminal=terminal)))
        if was_offline is not None:
            self._retick(terminal.store_id, self._held_by(terminal))

    async def terminal_down(self, terminal: Terminal) -> None:
        online = self._online.get(terminal.store_id, {})
        key = holder_key(terminal)
        entry = online.get(key)
        if entry is None:
            return
        if entry[1] > 1:
            online[key] = (entry[0], entry[1] - 1)
            return
        if presence_lingers(terminal.role) and self._linger_s > 0:
            # A phone's page reloads and its network comes and goes: it is said offline
            # only once it stayed away for the linger, so that a phone reconnecting in a
            # loop cannot flush the store channel's history with presence.
            online[key] = (entry[0], 0)
            self._lingering[(terminal.store_id, key)] = asyncio.get_running_loop().call_later(
                self._linger_s, self._linger_ended, terminal)
            return
        self._went_offline(terminal)

    async def online_terminals(self, store_id: str) -> list[Terminal]:
        return [t for t, _ in self._online.get(store_id, {}).values()]

    async def count_connection(self, terminal: Terminal) -> ConnectionCounts:
        store, key = terminal.store_id, (terminal.store_id, holder_key(terminal))
        self._store_connections[store] = self._store_connections.get(store, 0) + 1
        self._terminal_connections[key] = self._terminal_connections.get(key, 0) + 1
        return ConnectionCounts(self._store_connections[store], self._terminal_connections[key])

    async def uncount_connection(self, terminal: Terminal) -> None:
        _decrement(self._store_connections, terminal.store_id)
        _decrement(self._terminal_connections, (terminal.store_id, holder_key(terminal)))

    def _linger_ended(self, terminal: Terminal) -> None:
        key = holder_key(terminal)
        self._lingering.pop((terminal.store_id, key), None)
        entry = self._online.get(terminal.store_id, {}).get(key)
        if entry is not None and entry[1] == 0:
            self._went_offline(terminal)

    def _went_offline(self, terminal: Terminal) -> None:
        online = self._online.get(terminal.store_id, {})
        key = holder_key(terminal)
        entry = online.pop(key)
        now = self.clock.now()
        if has_grace(terminal.role):  # other locks end only at their TTL
            self._offline.setdefault(terminal.store_id, {})[key] = now
        self._number(store_channel(terminal.store_id),
                     event_body(Event("terminal.offline", now, terminal=entry[0])))
        self._retick(terminal.store_id, self._held_by(terminal))

    def _held_by(self, terminal: Terminal) -> set[str]:
        return set(self._holdings.get((terminal.store_id, holder_key(terminal)), ()))

    # --- sessions ------------------------------------------------------------------------------

    async def keep_session(self, store_id: str, session_id: str, session: StoredSession,
                           ttl_ms: int | None) -> None:
        key = (store_id, session_id)
        self._sessions[key] = session
        ending = self._session_ends.pop(key, None)
        if ending is not None:
            ending.cancel()
        if ttl_ms is not None:
            self._session_ends[key] = asyncio.get_running_loop().call_later(
                ttl_ms / 1000, self._session_ended, key)

    def _session_ended(self, key: tuple[str, str]) -> None:
        self._sessions.pop(key, None)
        self._session_ends.pop(key, None)

    async def find_session(self, store_id: str, session_id: str) -> StoredSession | None:
        return self._sessions.get((store_id, session_id))


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
