"""Local mirrors of subscribed channels, kept equal to the broker's state.

A mirror applies the channel's events in seq order. A gap in seq, or a
reconnect after which the broker cannot replay what was missed
(`recovered: false`), is answered with a fresh snapshot. While the connection
is down a mirror is `stale`: a screen should grey out its buttons rather than
show locks that may no longer be true (PROTOCOL.md: screens never guess).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .model import Lock, Order, StoreConfig, Terminal, convert

log = logging.getLogger("tablelock_client")

Frame = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a mirror.

    `event` is the applied event's name (`lock.acquired`, `order.updated`, ...)
    or one of `snapshot` (the state was replaced wholesale), `stale` (the
    connection is down: do not trust the state) and `fresh` (live again).
    """

    channel: str
    event: str
    seq: int | None = None
    frame: Mapping[str, Any] | None = None


class ChangeSink(Protocol):
    """Where a mirror (or the client) puts its changes; None means "no more"."""

    def put(self, change: Change | None) -> None: ...


class ChangeStream:
    """An async iterator of a mirror's changes, from the moment it was created."""

    def __init__(self, sinks: set[ChangeSink]) -> None:
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._sinks = sinks
        sinks.add(self)

    def put(self, change: Change | None) -> None:
        self._queue.put_nowait(change)

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        change = await self._queue.get()
        if change is None:
            self.close()
            raise StopAsyncIteration
        return change

    def close(self) -> None:
        self._sinks.discard(self)


class Mirror:
    """What is shared by the order and the store mirrors: seq, staleness, listeners."""

    def __init__(self, channel: str, resync: Callable[[Mirror], None]) -> None:
        self.channel = channel
        self.seq = 0
        self.stale = True
        self.synced = False  # a snapshot was loaded at least once: `since` is meaningful
        self.epoch: str | None = None  # of the channel's numbering that `seq` belongs to
        self._resync = resync
        self._gen = 0
        self._syncing = False
        self._buffer: list[Frame] = []
        self._fresh = asyncio.Event()
        self._callbacks: list[Callable[[Change], None]] = []
        self.sinks: set[ChangeSink] = set()

    # --- for applications ---------------------------------------------------------------

    def on_change(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call `callback(change)` on every change; returns a function that stops it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def changes(self) -> ChangeStream:
        """`async for change in mirror.changes():` every change from now on."""
        return ChangeStream(self.sinks)

    async def wait_fresh(self, timeout: float | None = None) -> None:
        """Wait until the mirror is live (not stale)."""
        async with asyncio.timeout(timeout):
            await self._fresh.wait()

    # --- driven by the client's subscriptions (subscriptions.py), not by applications ---------

    def _emit(self, event: str, seq: int | None = None, frame: Frame | None = None) -> None:
        change = Change(self.channel, event, seq, frame)
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:  # one screen's bug must not stop the mirror
                log.exception("change callback failed")
        for stream in list(self.sinks):
            stream.put(change)

    def mark_stale(self) -> None:
        if not self.stale:
            self.stale = True
            self._fresh.clear()
            self._emit("stale")

    def begin_sync(self) -> int:
        """A subscribe is about to be sent: hold events until its reply is applied.

        Everything that arrives before the reply is covered by its snapshot (the
        broker numbers events before it reads the snapshot), so what was held
        from an earlier attempt can be dropped.
        """
        self._gen += 1
        self._syncing = True
        self._buffer.clear()
        return self._gen

    def feed(self, frame: Frame) -> Frame | None:
        """A live event of this channel. Returns it if it was applied."""
        if self._syncing:
            self._buffer.append(frame)
            return None
        seq = frame.get("seq")
        if not isinstance(seq, int) or seq <= self.seq:
            return None  # a repeat (a replay of what came meanwhile, say)
        if seq != self.seq + 1:
            log.info("%s: seq gap %d -> %d, taking a new snapshot", self.channel, self.seq, seq)
            self.mark_stale()
            self._resync(self)
            return None
        self._apply(frame)
        self.seq = seq
        self._emit(frame.get("event", ""), seq, frame)
        return frame

    def apply_subscribe(self, gen: int, reply: Frame, since: int | None) -> list[Frame] | None:
        """Load a subscribe reply; returns the missed events applied, None if superseded."""
        if gen != self._gen:
            return None  # a newer subscribe is in flight: its reply wins
        self._syncing = False
        seq = int(reply.get("seq", 0))
        snapshot = reply.get("snapshot") or {}
        applied: list[Frame] = []
        consistent = False
        if since is not None and since == self.seq and reply.get("recovered"):
            for frame in reply.get("missed") or ():
                event_seq = frame.get("seq")
                if not isinstance(event_seq, int) or event_seq <= self.seq:
                    continue
                if event_seq != self.seq + 1:
                    break
                self._apply(frame)
                self.seq = event_seq
                applied.append(frame)
                self._emit(frame.get("event", ""), event_seq, frame)
            # Trust, but check: the replayed events must lead to the very state the
            # snapshot shows (a broker that lost its state numbers from its clock, never
            # reusing a seq, but the snapshot is the truth).
            consistent = self.seq == seq and self._state_key() == self._load(snapshot, dry=True)
        self._load(snapshot)
        self.seq = seq
        self.epoch = reply.get("epoch")
        self.synced = True
        if not consistent:
            self._emit("snapshot", seq)
        self.stale = False
        self._fresh.set()
        self._emit("fresh", seq)
        held, self._buffer = self._buffer, []
        for frame in held:
            self.feed(frame)
        return applied

    def shut(self) -> None:
        self.mark_stale()
        for stream in list(self.sinks):
            stream.put(None)

    # --- per channel kind -------------------------------------------------------------------

    def _apply(self, frame: Frame) -> None:
        raise NotImplementedError

    def _load(self, snapshot: Mapping[str, Any], dry: bool = False) -> Any:
        """Replace the state with `snapshot`, or with dry=True return its comparison key."""
        raise NotImplementedError

    def _state_key(self) -> Any:
        raise NotImplementedError


def _lock_key(locks: list[Lock]) -> list[tuple[Any, ...]]:
    # expires_at is left out: renewals move it without an event (PROTOCOL.md 9.6).
    return sorted((lk.order_id, lk.kind, lk.token, lk.holder.terminal_id, lk.holder.role,
                   lk.acquired_at, lk.order_version) for lk in locks)


def _lock_of(frame: Frame) -> Lock | None:
    raw = frame.get("lock")
    return convert(raw, Lock) if raw else None


class OrderMirror(Mirror):
    """`order:<store>:<order>`: the order (None until the ERP publishes it) and its locks."""

    def __init__(self, channel: str, resync: Callable[[Mirror], None]) -> None:
        super().__init__(channel, resync)
        self.order: Order | None = None
        self.locks: dict[str, Lock] = {}  # kind -> lock

    def _apply(self, frame: Frame) -> None:
        name = frame.get("event")
        if name in ("order.updated", "order.paid") and frame.get("order"):
            self.order = convert(frame["order"], Order)
            return
        lock = _lock_of(frame)
        if lock is None:
            return
        if name == "lock.acquired":
            self.locks[lock.kind] = lock
        elif name in ("lock.released", "lock.expired", "lock.forced"):
            current = self.locks.get(lock.kind)
            if current is not None and current.token == lock.token:
                del self.locks[lock.kind]

    def _load(self, snapshot: Mapping[str, Any], dry: bool = False) -> Any:
        order = convert(snapshot["order"], Order) if snapshot.get("order") else None
        locks = [convert(raw, Lock) for raw in snapshot.get("locks") or ()]
        if dry:
            return order, _lock_key(locks)
        self.order = order
        self.locks = {lock.kind: lock for lock in locks}
        return None

    def _state_key(self) -> Any:
        return self.order, _lock_key(list(self.locks.values()))


class StoreMirror(Mirror):
    """`store:<store>`: every open order, their locks, the online terminals and the config."""

    def __init__(self, channel: str, resync: Callable[[Mirror], None]) -> None:
        super().__init__(channel, resync)
        self.orders: dict[str, Order] = {}
        self.locks: dict[tuple[str, str], Lock] = {}  # (order_id, kind) -> lock
        self.terminals: dict[str, Terminal] = {}
        self.config: StoreConfig | None = None

    def locks_of(self, order_id: str) -> dict[str, Lock]:
        """The locks of one order, by kind."""
        return {kind: lock for (oid, kind), lock in self.locks.items() if oid == order_id}

    def _apply(self, frame: Frame) -> None:
        name = frame.get("event")
        if name in ("order.updated", "order.paid") and frame.get("order"):
            order = convert(frame["order"], Order)
            if order.status == "open":
                self.orders[order.order_id] = order
            else:  # the snapshot lists open orders only
                self.orders.pop(order.order_id, None)
        elif name in ("terminal.online", "terminal.offline") and frame.get("terminal"):
            terminal = convert(frame["terminal"], Terminal)
            if name == "terminal.online":
                self.terminals[terminal.terminal_id] = terminal
            else:
                self.terminals.pop(terminal.terminal_id, None)
        elif name == "config.updated" and frame.get("config"):
            self.config = convert(frame["config"], StoreConfig)
        else:
            lock = _lock_of(frame)
            if lock is None:
                return
            key = (lock.order_id, lock.kind)
            if name == "lock.acquired":
                self.locks[key] = lock
            elif name in ("lock.released", "lock.expired", "lock.forced"):
                current = self.locks.get(key)
                if current is not None and current.token == lock.token:
                    del self.locks[key]

    def _load(self, snapshot: Mapping[str, Any], dry: bool = False) -> Any:
        orders = {o.order_id: o for o in (convert(raw, Order)
                                          for raw in snapshot.get("orders") or ())}
        locks = [convert(raw, Lock) for raw in snapshot.get("locks") or ()]
        terminals = {t.terminal_id: t for t in (convert(raw, Terminal)
                                                for raw in snapshot.get("terminals") or ())}
        if dry:
            return orders, _lock_key(locks), terminals
        self.orders = orders
        self.locks = {(lock.order_id, lock.kind): lock for lock in locks}
        self.terminals = terminals
        return None

    def _state_key(self) -> Any:
        return self.orders, _lock_key(list(self.locks.values())), self.terminals
