"""What a backend must do: keep state, step it atomically, number and carry events.

A backend serves five narrow parts (as centrifuge splits its engine into broker, presence
manager and node control): order state, event streams, presence, resumable sessions and
broker-to-broker control. It never decides a lock rule: `apply` runs `rules.step` on one
order's record inside the backend's own atomic section, stores the new record, numbers
the outcome's events on their channels (order and store), keeps a bounded history per
channel, hands the frames to the sink, and wakes the record again at its next deadline.
Every time comes from the backend's one clock.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import msgspec

from .. import metrics
from ..model import AuditEntry, Event, OrderRecord, StoreConfig, Terminal
from ..rules import Command, ConnectionCounts, Outcome, ReleaseAll, patch_config


class StoredSession(msgspec.Struct, frozen=True):
    """What a terminal's session leaves for `resume`, kept in the backend so that any
    broker can resume it: whose it is, and where each of its channels stands."""

    holder: str  # model.holder_key of its terminal
    # channel -> (seq of the last event delivered, the channel's epoch at subscribe)
    positions: dict[str, tuple[int, str]] = {}


class Numbered(NamedTuple):
    """An event frame as numbered on a channel, with its order's table (for the h5 filter)."""

    seq: int
    frame: bytes
    table_id: str | None


def first_seq(now_ms: int) -> int:
    """Where a new channel's numbering starts: from the clock, so that a broker (or Redis)
    that lost its state never numbers an event as a seq some client already holds, and a
    stale `since` gets `recovered: false` rather than another history's events. Events
    can come a million a second for centuries before reaching 2^53."""
    return now_ms * 1000


class Unavailable(Exception):
    """The backend cannot be reached and nothing changed: refuse, never guess (code
    UNAVAILABLE)."""


class OutcomeUnknown(Unavailable):
    """A write may have been applied, and the backend could not say so within the bound
    (UNAVAILABLE with `"outcome": "unknown"`: the client reads the order before it acts)."""


class EventSink(Protocol):
    """Where numbered and direct events go: the hub of local connections."""

    def publish(self, channel: str, seq: int, frame: bytes, table_id: str | None) -> None:
        """Fan a numbered frame out; `table_id` hides an order's events from other tables' h5."""
        ...

    def direct(self, store_id: str, holder: str, frame: bytes,
               unless_on: tuple[str, ...], coalesce: str = "") -> None:
        """Send to each connection of the terminal `holder` (model.holder_key) subscribed to
        none of `unless_on`; `coalesce` (rules.coalescing_key) names repeated news the sink
        may drop."""
        ...

    def has_subscribers(self, channel: str) -> bool: ...

    def lost(self, channel: str) -> None:
        """Events of the channel were lost for good: its subscribers must re-snapshot."""
        ...


audit_log = logging.getLogger("tablelock.audit")

# Which lock outcome each event or refusal counts as (metrics.LOCK_EVENTS).
_OUTCOME_OF_EVENT = {"lock.acquired": "grant", "lock.forced": "force", "lock.expired": "expiry",
                     "lock.released": "release", "order.paid": "payment"}
# Every grant and release is in the audit log; only the rest is worth a log line by default.
_ROUTINE = frozenset({"lock.acquired", "lock.released"})
_CONFLICTS = frozenset({"ORDER_LOCKED", "PAYMENT_LOCKED", "PRESETTLE_LOCKED", "ACCEPT_BLOCKED"})


def observe(store_id: str, order_id: str, out: Outcome, now: int, started: float,
            call: str) -> None:
    """Count and log what one transition did; the same for every backend. Cheap: it runs
    for every request."""
    if metrics.BACKEND_SECONDS.due(call):
        metrics.BACKEND_SECONDS.observe(call, time.perf_counter() - started)
    for event in out.events:
        outcome = _OUTCOME_OF_EVENT.get(event.event)
        if outcome is not None:
            metrics.LOCK_EVENTS.inc(outcome)
            if outcome == "expiry" and event.lock is not None:
                metrics.EXPIRY_LAG.observe(max(0, now - event.lock.expires_at) / 1000)
    if out.refusal is not None and out.refusal.code in _CONFLICTS:
        metrics.LOCK_EVENTS.inc("conflict")
    for entry in out.audit:
        _log_audit(store_id, order_id, entry)


def _log_audit(store_id: str, order_id: str, entry: AuditEntry) -> None:
    detail = entry.detail
    routine = entry.kind in _ROUTINE and detail.get("reason") != "holder_disconnected"
    level = logging.DEBUG if routine else logging.INFO
    if not audit_log.isEnabledFor(level):
        return
    audit_log.log(level, entry.kind, extra={
        "store": store_id, "order": order_id,
        "terminal": entry.terminal.terminal_id if entry.terminal else None,
        "kind": detail.get("kind"), "token": detail.get("token"),
        "code": detail.get("code"), "reason": detail.get("reason"),
        "operator": detail.get("operator"), "payment_ref": detail.get("payment_ref")})


BrokerHandler = Callable[[bytes], Awaitable[None]]


class OrderState(abc.ABC):
    """Order state: one clock, the atomic step, reads, the table index, store config, and
    the audit log the steps write."""

    @abc.abstractmethod
    async def now(self) -> int:
        """Milliseconds since the epoch on the backend's one clock."""

    @abc.abstractmethod
    async def apply(self, store_id: str, order_id: str, command: Command,
                    actor: Terminal | None) -> Outcome:
        """Step one order atomically and publish what it produced."""

    @abc.abstractmethod
    async def read(self, store_id: str, order_id: str) -> OrderRecord | None:
        """The record as stored (expiry not applied: use apply(Tick) for that)."""

    @abc.abstractmethod
    async def find_order(self, store_id: str, table_id: str) -> str | None:
        """The open order of a table, or the latest one if none is open."""

    @abc.abstractmethod
    async def order_ids(self, store_id: str) -> list[str]:
        """Every order the store's state still holds."""

    @abc.abstractmethod
    async def get_config(self, store_id: str) -> StoreConfig: ...

    @abc.abstractmethod
    async def put_config(self, store_id: str, config: StoreConfig) -> None:
        """Store a config as is and recompute the store's deadlines (no event: see
        Backend.update_config)."""

    @abc.abstractmethod
    async def audit(self, store_id: str, kind: str | None, limit: int) -> list[AuditEntry]: ...

    @abc.abstractmethod
    async def mark_handled(self, store_id: str, entry_id: str) -> bool: ...


class EventStreams(abc.ABC):
    """Event streams: numbering per channel, bounded history, delivery to the sink. Events
    travel as opaque bodies (protocol.event_body) with their table; the frame a client
    reads is built in one place, protocol.numbered_frame."""

    @abc.abstractmethod
    async def publish_store_event(self, store_id: str, event: Event) -> None:
        """Number and publish an event of the store channel alone."""

    @abc.abstractmethod
    async def snapshot(self, channel: str) -> tuple[int, str, Any]:
        """(seq, epoch, snapshot) of a channel, consistent with each other; from here on the
        channel's events reach the sink."""

    @abc.abstractmethod
    async def history(self, channel: str, since: int) -> list[Numbered] | None:
        """The events after `since`, or None when the history no longer reaches back; from
        here on the channel's events reach the sink."""

    @abc.abstractmethod
    async def stream_epoch(self, channel: str) -> str:
        """The epoch of the channel's numbering: it changes whenever the numbering starts
        over (a new stream, or a backend that lost it), so that a position (seq, epoch)
        taken from the old one is never read against the new one."""

    def channel_idle(self, channel: str) -> None:  # noqa: B027 - optional hook
        """The last local subscriber of `channel` left: what only it kept may go, and its
        events need no longer come here."""


class Presence(abc.ABC):
    """Presence: which terminals are connected, through which broker, and who answers
    order.fetch."""

    @abc.abstractmethod
    async def terminal_up(self, terminal: Terminal, authority: bool = False) -> None:
        """One more connection of `terminal`; `authority`: it answers order.fetch."""

    @abc.abstractmethod
    async def terminal_down(self, terminal: Terminal) -> None: ...

    @abc.abstractmethod
    async def online_terminals(self, store_id: str) -> list[Terminal]: ...

    async def authority(self, store_id: str) -> str | None:
        """The broker connected to the store's order authority; None: look in the local hub."""
        return None

    @abc.abstractmethod
    async def count_connection(self, terminal: Terminal) -> ConnectionCounts:
        """Count one more connection of `terminal` where the connection limits are kept,
        atomically, and say how many its store and it have now, this one included, over
        every broker (rules.connection_limit judges them)."""

    @abc.abstractmethod
    async def uncount_connection(self, terminal: Terminal) -> None:
        """A counted connection closed, or was refused after counting."""


class Sessions(abc.ABC):
    """Resumable sessions, kept where every broker of the backend finds them."""

    @abc.abstractmethod
    async def keep_session(self, store_id: str, session_id: str, session: StoredSession,
                           ttl_ms: int | None) -> None:
        """Store the whole session, replacing what was kept; it goes after `ttl_ms` (the
        disconnect grace, once detached), or None: while a connection holds it."""

    @abc.abstractmethod
    async def find_session(self, store_id: str, session_id: str) -> StoredSession | None:
        """The session as last kept, or None once it went."""


class BrokerControl:
    """Broker-to-broker control: opaque messages addressed to one broker, handed to the
    handlers registered with `on_broker_message`."""

    broker_id = "local"

    def __init__(self) -> None:
        self._broker_handlers: list[BrokerHandler] = []

    def on_broker_message(self, handler: BrokerHandler) -> None:
        """Register `handler` for every message another broker sends to this one."""
        self._broker_handlers.append(handler)

    async def send_to_broker(self, broker_id: str, payload: bytes) -> None:
        raise Unavailable("a single broker has no peers")

    async def _broker_message(self, payload: bytes) -> None:
        for handler in self._broker_handlers:
            await handler(payload)


class Backend(OrderState, EventStreams, Presence, Sessions, BrokerControl):
    """The five parts one backend serves, and their life: `start` names the sink."""

    sink: EventSink

    async def start(self, sink: EventSink) -> None:
        self.sink = sink

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def update_config(self, store_id: str, patch: Mapping[str, Any]) -> StoreConfig:
        """Validate and store a config patch; turning strong link off frees every lock."""
        old = await self.get_config(store_id)
        new = patch_config(old, patch)
        if new == old:
            return new
        await self.put_config(store_id, new)
        await self.publish_store_event(store_id, Event("config.updated", await self.now(),
                                                       config=new))
        if old.strong_link and not new.strong_link:
            for order_id in await self.order_ids(store_id):
                await self.apply(store_id, order_id, ReleaseAll(), None)
        return new


def unhandled_for(entry: AuditEntry) -> str:
    """The terminal ('role|terminal_id') an entry stays unhandled for, or '' for an entry
    that is never marked handled. Each terminal keeps a bounded number unhandled."""
    if entry.handled is not False:
        return ""
    who = entry.terminal
    return f"{who.role}|{who.terminal_id}" if who is not None else "|"


def untracked(entry: AuditEntry) -> AuditEntry:
    """What is logged instead of an unhandled entry past its terminal's bound: an ordinary
    entry (the audit log's own bound evicts it), saying it was not kept to be handled."""
    return msgspec.structs.replace(entry, handled=None,
                                   detail={**entry.detail, "untracked": True})


def best_for_table(records: Iterable[OrderRecord], table_id: str) -> OrderRecord | None:
    """A table's open order, else its most recent one."""
    ranked = [(rec.order.status == "open", rec.fence, rec.order_id, rec)
              for rec in records if rec.order.table_id == table_id]
    return max(ranked)[-1] if ranked else None
