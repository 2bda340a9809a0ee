"""Event streams on Redis: numbering and history per channel, snapshots, epochs, and what
arrives by pub/sub: handed to the sink in order, gaps filled from the history first."""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from typing import Any

import msgspec

from .. import metrics
from ..model import MAX_SAFE_INT, Event, Lock, Order
from ..protocol import (
    OrderSnapshot,
    StoreSnapshot,
    event_body,
    numbered_frame,
    order_channel,
    parse_channel,
)
from ..rules import Tick
from .base import Numbered, Unavailable
from .redis_core import RedisCore, as_text, hash_fields, record_decoder, terminal_decoder

log = logging.getLogger("tablelock.redis")

# How long the seq given to a subscriber of an order not seen yet is kept for the order.
UNCLAIMED_SEQ_MS = 600_000
# A pub/sub message is a JSON header, a newline, and the bodies (redis_lua's `send`). Per
# entry: kind (0 numbered, 1 direct), channel (or coalescing key), seq, table, holder,
# unless, and where its body starts and stops in the bodies.
PubEntry = tuple[int, str, str, str, str, str, int, int]
_pub_decoder = msgspec.json.Decoder(list[PubEntry])


def _fresh_epoch() -> str:
    """An epoch for a numbering that has none yet: the scripts keep whichever came first."""
    return secrets.token_hex(4)


def _entries(data: bytes) -> tuple[list[PubEntry], memoryview]:
    """A message's entries, and the bodies they point into (sliced, never decoded)."""
    split = data.index(b"\n")
    view = memoryview(data)
    return _pub_decoder.decode(view[:split]), view[split + 1:]


class RedisStreams(RedisCore):
    """EventStreams on Redis, and the receiving end of its pub/sub."""

    async def publish_store_event(self, store_id: str, event: Event) -> None:
        keys = self.keys(store_id)
        await self._guard(self._evalsha("PUBLISH_STORE",
            keys=[keys.seqs, keys.hist_store],
            args=[keys.store_channel, event_body(event), keys.store_events,
                  self._history_size, self._publish_command]))

    async def snapshot(self, channel: str) -> tuple[int, str, Any]:
        parsed = parse_channel(channel)
        assert parsed is not None
        store_id, order_id = parsed
        keys = self.keys(store_id)
        await self._follow(channel, keys)
        if order_id is not None:
            await self.apply(store_id, order_id, Tick(), None)  # expiry first
            seq, raw, epoch = await self._guard(self._evalsha("SNAPSHOT_ORDER",
                keys=[keys.record(order_id), keys.seqs, keys.unclaimed_seqs],
                args=[channel, order_id, order_channel(store_id, ""), keys.prefix + ":o:",
                      UNCLAIMED_SEQ_MS, self._max_unclaimed_seqs, _fresh_epoch()]))
            rec = record_decoder.decode(raw) if raw else None
            snap: Any = OrderSnapshot(rec.order if rec else None,
                                      list(rec.locks.values()) if rec else [])
        else:
            seq, raws, terms, epoch = await self._guard(self._evalsha("SNAPSHOT_STORE",
                keys=[keys.orders, keys.terms, keys.seqs],
                args=[channel, keys.prefix + ":o:", _fresh_epoch()]))
            orders: list[Order] = []
            locks: list[Lock] = []
            for raw in raws:
                rec = record_decoder.decode(raw)
                if rec.order.status == "open":
                    orders.append(rec.order)
                    locks.extend(rec.locks.values())
            snap = StoreSnapshot(orders, locks, [terminal_decoder.decode(t) for t in terms])
        self._delivering_from(channel, int(seq))
        return int(seq), as_text(epoch), snap

    def _delivering_from(self, channel: str, seq: int) -> None:
        """A read of the channel at `seq`: if this broker delivers nothing of it yet, a later
        event that skips a seq after this one is a gap to fill. If it already does, what its
        subscribers had stays the mark: a read that went further (this broker's subscription
        missed events, say Redis restarted) must not hide that gap from them."""
        self._seen.setdefault(channel, seq)

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
            self._delivering_from(channel, seq)
            return []
        frames = []
        for entry_id, flat in entries:
            fields = hash_fields(flat)
            body = fields.get(b"b")
            if body is None:  # kept whole by a broker before bodies (no frames in Redis)
                return None  # the subscriber takes a fresh snapshot instead
            seq = int(as_text(entry_id).split("-")[0])
            frames.append(Numbered(seq, numbered_frame(channel, seq, body),
                                   as_text(fields.get(b"t", b"")) or None))
        if not frames or frames[0].seq != since + 1:
            return None
        self._delivering_from(channel, seq)
        return [entry for entry in frames if entry.seq <= seq]

    async def stream_epoch(self, channel: str) -> str:
        parsed = parse_channel(channel)
        assert parsed is not None
        return as_text(await self._guard(self._evalsha(
            "EPOCH", keys=[self.keys(parsed[0]).seqs], args=[_fresh_epoch()])))

    # --- what pub/sub brings ----------------------------------------------------------------

    def _on_pubsub(self, channel: bytes, data: bytes) -> None:
        """Every message, inside the socket's read callback: handed on at once, decoded once,
        unless it must wait (a gap to fill first, a broker message to await), or a message
        before it still waits: then it is handled after those, in order (_drain)."""
        metrics.REDIS_EVENTS.inc("pubsub_message")  # per broker: what interest saves
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
            entries, bodies = _entries(data)
            seen = self._seen
            for entry in entries:
                last = seen.get(entry[1])
                if last is not None and int(entry[2]) > last + 1:
                    return False  # a gap: filled from the history first
            self.received[kind] += 1
            for _, channel, seq_text, table_id, _, _, start, stop in entries:
                self._hand_on(channel, int(seq_text), table_id, bodies[start:stop])
            return True
        if kind == "rpc":
            return False
        self.received[kind] += 1
        if kind == "config":
            self._states.pop(target, None)
        else:
            self._notify(target, data)
        return True

    def _hand_on(self, channel: str, seq: int, table_id: str, body: memoryview) -> None:
        """One numbered event to this broker's subscribers of its channel (a store's message
        numbers its order's channel too, followed here or not)."""
        if seq > self._seen.get(channel, 0):
            self._seen[channel] = seq
        if self.sink.has_subscribers(channel):
            self.sink.publish(channel, seq, numbered_frame(channel, seq, body), table_id or None)

    def _notify(self, store_id: str, data: bytes) -> None:
        """Direct notices to terminals of `store_id` connected here."""
        entries, bodies = _entries(data)
        for _, coalesce, _, _, holder, unless, start, stop in entries:
            self.sink.direct(store_id, holder, bytes(bodies[start:stop]),
                             tuple(unless.split("\n")) if unless else (), coalesce)

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
            entries, bodies = _entries(data)
            for _, channel, seq_text, table_id, _, _, start, stop in entries:
                seq = int(seq_text)
                # Only gaps are this broker's business: each connection drops what it has
                # already had (Hub.publish), so nothing is skipped here.
                seen = self._seen.get(channel)
                if seen is not None and seq > seen + 1:
                    metrics.REDIS_EVENTS.inc("gap_recovery")
                    # A gap: fill it from the history first; if Redis can't say now, never
                    # pass it on: subscribers reconnect and recover by `since` themselves.
                    if not await self._recover(channel, seen):
                        self.sink.lost(channel)
                self._hand_on(channel, seq, table_id, bodies[start:stop])
        else:
            self._notify(target, data)

    async def _recover(self, channel: str, since: int) -> bool:
        """Deliver what a lost message or subscription skipped, or make subscribers re-snapshot;
        False if Redis could not be read now (nothing was delivered)."""
        try:
            missed = await self._read_history(channel, since)
        except Unavailable:
            return False
        if missed is None:
            log.warning("history of %s no longer reaches seq %d", channel, since)
            self.sink.lost(channel)
            return True
        for seq, frame, table_id in missed:  # connections drop what they already had
            self.sink.publish(channel, seq, frame, table_id)
        if missed:
            self._seen[channel] = max(self._seen.get(channel, 0), missed[-1].seq)
        return True

    async def _resync(self) -> None:
        """After a lost subscription: fill every local channel's gap, re-announce presence."""
        for channel, seen in list(self._seen.items()):
            if self.sink.has_subscribers(channel):
                await self._recover(channel, seen)
            else:
                del self._seen[channel]
        await self._reannounce()
