"""The embedded default backend: dicts, one event loop, timers for deadlines.

Atomicity comes from the event loop: `apply` never awaits between reading a
record and publishing its events. Deadlines are loop timers (`call_at`), one
per order that has one, so nothing polls; a timer only wakes the record and
`rules.step` decides what lapsed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from ..model import AuditEntry, Event, OrderRecord, StoreConfig, Terminal
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
from ..rules import Command, Context, Outcome, Tick, step
from .base import Backend, Numbered, best_for_table, first_seq, observe

OrderKey = tuple[str, str]  # (store_id, order_id)


class MonotonicClock:
    """Epoch milliseconds that never go back: wall time at start plus monotonic time since."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> int:
        return int((self._wall0 + time.monotonic() - self._mono0) * 1000)

    def loop_time_of(self, ms: int) -> float:
        """The event-loop time (time.monotonic) at which this clock reads `ms`."""
        return self._mono0 + ms / 1000 - self._wall0


class Channel:
    __slots__ = ("history", "seq")

    def __init__(self, size: int, first_seq: int) -> None:
        self.seq = first_seq
        self.history: deque[Numbered] = deque(maxlen=size)


class StoreAudit:
    """A bounded audit log whose unhandled `payment.rejected` entries are never evicted."""

    __slots__ = ("entries", "unhandled")

    def __init__(self, size: int) -> None:
        self.entries: deque[AuditEntry] = deque(maxlen=size)
        self.unhandled: dict[str, AuditEntry] = {}


class MemoryBackend(Backend):
    def __init__(self, history_size: int = 512, audit_size: int = 10_000) -> None:
        self.clock = MonotonicClock()
        self._history_size = history_size
        self._audit_size = audit_size
        self._records: dict[OrderKey, OrderRecord] = {}
        self._orders_of_store: dict[str, set[str]] = {}
        self._timers: dict[OrderKey, tuple[int, asyncio.TimerHandle]] = {}
        self._channels: dict[str, Channel] = {}
        self._configs: dict[str, StoreConfig] = {}
        self._online: dict[str, dict[str, tuple[Terminal, int]]] = {}
        self._offline: dict[str, dict[str, int]] = {}
        self._holdings: dict[tuple[str, str], set[str]] = {}  # (store, terminal) -> orders
        self._audit: dict[str, StoreAudit] = {}
        self._audit_seq = 0
        self._default_config = StoreConfig()

    async def now(self) -> int:
        return self.clock.now()

    async def close(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    # --- transitions -----------------------------------------------------------

    async def apply(self, store_id: str, order_id: str, command: Command,
                    actor: Terminal | None) -> Outcome:
        return self.apply_now(store_id, order_id, command, actor)

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
        self._publish(store_id, order_id, out)
        self._schedule(key, out.deadline)
        observe(store_id, order_id, out, ctx.now, time.perf_counter() - started,
                type(command).__name__)
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
        old = {lock.holder.terminal_id for lock in before.locks.values()} if before else set()
        new = {lock.holder.terminal_id for lock in after.locks.values()} if after else set()
        for terminal_id in old - new:
            held = self._holdings.get((store_id, terminal_id))
            if held is not None:
                held.discard(order_id)
                if not held:
                    del self._holdings[(store_id, terminal_id)]
        for terminal_id in new - old:
            self._holdings.setdefault((store_id, terminal_id), set()).add(order_id)

    def _publish(self, store_id: str, order_id: str, out: Outcome) -> None:
        if out.events:
            channels = (order_channel(store_id, order_id), store_channel(store_id))
            for event in out.events:
                body = event_body(event)
                for name in channels:
                    self._number(name, body, event.table_id)
                if event.notify is not None:
                    self.sink.direct(store_id, event.notify, direct_frame(event).decode(),
                                     channels)
        for terminal_id, event in out.direct:
            self.sink.direct(store_id, terminal_id, direct_frame(event).decode(), ())
        if out.audit:
            self._append_audit(store_id, out.audit)

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
        channel.history.append(Numbered(channel.seq, frame, table_id))
        self.sink.publish(name, channel.seq, frame.decode(), table_id)

    def _schedule(self, key: OrderKey, deadline: int | None) -> None:
        current = self._timers.get(key)
        if current is not None:
            if current[0] == deadline:
                return
            current[1].cancel()
            del self._timers[key]
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        # +1 ms: a timer may fire a hair early, and the step must see the deadline passed.
        handle = loop.call_at(self.clock.loop_time_of(deadline + 1), self._wake, key)
        self._timers[key] = (deadline, handle)

    def _wake(self, key: OrderKey) -> None:
        self._timers.pop(key, None)
        self.apply_now(key[0], key[1], Tick(), None)

    def _retick(self, store_id: str, order_ids: Iterable[str]) -> None:
        for order_id in list(order_ids):
            self.apply_now(store_id, order_id, Tick(), None)

    # --- store state --------------------------------------------------------------

    async def get_config(self, store_id: str) -> StoreConfig:
        return self._configs.get(store_id, self._default_config)

    async def _put_config(self, store_id: str, config: StoreConfig) -> None:
        self._configs[store_id] = config
        # The grace may have changed: every deadline of the store is recomputed.
        self._retick(store_id, self._orders_of_store.get(store_id, ()))

    async def publish_store_event(self, store_id: str, event: Event) -> None:
        self._number(store_channel(store_id), event_body(event))

    async def order_ids(self, store_id: str) -> list[str]:
        return list(self._orders_of_store.get(store_id, ()))

    async def read(self, store_id: str, order_id: str) -> OrderRecord | None:
        return self._records.get((store_id, order_id))

    async def find_order(self, store_id: str, table_id: str) -> str | None:
        order_ids = self._orders_of_store.get(store_id, ())
        best = best_for_table((self._records[(store_id, oid)] for oid in order_ids), table_id)
        return best.order_id if best else None

    async def snapshot(self, channel: str) -> tuple[int, Any]:
        parsed = parse_channel(channel)
        assert parsed is not None
        store_id, order_id = parsed
        if order_id is not None:
            rec = self.apply_now(store_id, order_id, Tick(), None).record
            snap: Any = OrderSnapshot(rec.order if rec else None,
                                      list(rec.locks.values()) if rec else [])
        else:
            orders, locks = [], []
            for oid in self._orders_of_store.get(store_id, ()):
                rec = self._records[(store_id, oid)]
                if rec.order.status == "open":
                    orders.append(rec.order)
                    locks.extend(rec.locks.values())
            terminals = [t for t, _ in self._online.get(store_id, {}).values()]
            snap = StoreSnapshot(orders, locks, terminals)
        return self._channel(channel).seq, snap

    async def history(self, channel: str, since: int) -> list[Numbered] | None:
        found = self._channels.get(channel)
        if found is None:
            return None
        seq = found.seq
        if since > seq:
            return None
        if since == seq:
            return []
        oldest = found.history[0][0] if found.history else seq + 1
        if since + 1 < oldest:
            return None
        return [entry for entry in found.history if entry.seq > since]

    # --- presence -------------------------------------------------------------------

    async def terminal_up(self, terminal: Terminal, authority: bool = False) -> None:
        online = self._online.setdefault(terminal.store_id, {})
        entry = online.get(terminal.terminal_id)
        if entry is not None:
            online[terminal.terminal_id] = (entry[0], entry[1] + 1)
            return
        online[terminal.terminal_id] = (terminal, 1)
        was_offline = self._offline.get(terminal.store_id, {}).pop(terminal.terminal_id, None)
        self._number(store_channel(terminal.store_id),
                     event_body(Event("terminal.online", self.clock.now(), terminal=terminal)))
        if was_offline is not None:
            self._retick(terminal.store_id, self._held_by(terminal))

    async def terminal_down(self, terminal: Terminal) -> None:
        online = self._online.get(terminal.store_id, {})
        entry = online.get(terminal.terminal_id)
        if entry is None:
            return
        if entry[1] > 1:
            online[terminal.terminal_id] = (entry[0], entry[1] - 1)
            return
        del online[terminal.terminal_id]
        now = self.clock.now()
        if terminal.role != "h5":  # an h5 lock ends only at its TTL
            self._offline.setdefault(terminal.store_id, {})[terminal.terminal_id] = now
        self._number(store_channel(terminal.store_id),
                     event_body(Event("terminal.offline", now, terminal=entry[0])))
        self._retick(terminal.store_id, self._held_by(terminal))

    def _held_by(self, terminal: Terminal) -> set[str]:
        return set(self._holdings.get((terminal.store_id, terminal.terminal_id), ()))

    async def online_terminals(self, store_id: str) -> list[Terminal]:
        return [t for t, _ in self._online.get(store_id, {}).values()]

    # --- audit ------------------------------------------------------------------------

    def _append_audit(self, store_id: str, entries: list[AuditEntry]) -> None:
        log = self._audit.get(store_id)
        if log is None:
            log = self._audit[store_id] = StoreAudit(self._audit_size)
        for entry in entries:
            self._audit_seq += 1
            entry.id = str(self._audit_seq)
            log.entries.append(entry)
            if entry.handled is False:
                log.unhandled[entry.id] = entry

    async def audit(self, store_id: str, kind: str | None, limit: int) -> list[AuditEntry]:
        log = self._audit.get(store_id)
        if log is None:
            return []
        kept = {entry.id: entry for entry in log.entries}
        kept.update(log.unhandled)  # evicted but unhandled entries stay listed
        entries = sorted(kept.values(), key=lambda e: int(e.id), reverse=True)
        if kind:
            entries = [e for e in entries if e.kind == kind]
        return entries[:limit]

    async def mark_handled(self, store_id: str, entry_id: str) -> bool:
        log = self._audit.get(store_id)
        if log is None:
            return False
        entry = log.unhandled.pop(entry_id, None)
        if entry is None:
            entry = next((e for e in log.entries if e.id == entry_id), None)
        if entry is None:
            return False
        if entry.handled is not None:
            entry.handled = True
        return True
