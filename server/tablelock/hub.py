"""Who is connected to this process, what they subscribe to, and fan-out.

The hub is the backend's event sink: a numbered frame arrives once per channel,
is written to every subscribed connection as it came, bytes encoded once. What a
connection is sent during one turn of the event loop goes out in one write at its
end: under load, a socket subscribed to a busy store gets several frames a turn, and
each write costs a system call and a wake-up of the reader. Each connection has a
bounded outbound queue, drained by a writer task that exists only while there is
something to write, for when the socket takes nothing more; a consumer that falls
behind its bound is closed with 4010 rather than allowed to grow memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import metrics
from .backends.base import StoredSession
from .model import Terminal, holder_key
from .protocol import EVENTS_LOST, SLOW_CONSUMER, TOKEN_EXPIRED, Close
from .rules import is_first_authority, table_scope
from .wire import direct_writer, text_frame

AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]


class TimedFrame(bytes):
    """A frame whose write is timed: one fan-out in FANOUT_SAMPLE is measured (metrics)."""

    t0: float


FANOUT_SAMPLE = 64


class Session:
    """A terminal's subscriptions with their positions: what `resume` restores, on any
    broker, from the copy the backend keeps (Hub.stored)."""

    __slots__ = ("conn", "epochs", "session_id", "subs", "terminal")

    def __init__(self, session_id: str, terminal: Terminal) -> None:
        self.session_id = session_id
        self.terminal = terminal
        self.subs: dict[str, int] = {}  # channel -> seq of the last event delivered
        self.epochs: dict[str, str] = {}  # channel -> epoch of its numbering
        self.conn: Connection | None = None


class Connection:
    __slots__ = ("_batch", "_closing", "_flusher", "_framed", "_queue", "_queued_bytes", "_send",
                 "_stamp", "_tokens", "_write_now", "authority", "close_code", "closed",
                 "expires_at", "hub", "locale", "max_bytes", "max_messages", "pending", "session",
                 "table_id", "terminal")

    def __init__(self, hub: Hub, send: AsgiSend, max_messages: int, max_bytes: int) -> None:
        self.hub = hub
        self._send = send
        self._write_now = direct_writer(send)
        # The frames for this turn's write, and the same with their WebSocket headers.
        self._batch: list[bytes] | None = None
        self._framed: list[bytes] | None = None
        self._queue: deque[bytes] | None = None  # made when a frame must wait (760 bytes)
        self._queued_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.closed = False
        self.close_code: int | None = None  # for the log: who closed, and why
        self.terminal: Terminal | None = None
        # The table a table-scoped terminal (h5) is limited to: others' events are not shown.
        self.table_id: str | None = None
        self.session: Session | None = None
        self.locale = "zh-CN"
        self.authority = False
        # channel -> frames that arrived while its subscribe was being answered
        self.pending: dict[str, list[tuple[int, bytes]]] | None = None
        self._tokens = float(hub.rate_burst)  # the request rate's token bucket
        self._stamp = time.monotonic()
        self.expires_at = math.inf  # when its token ends (epoch seconds): see expire_tokens

    def hold(self, channel: str) -> None:
        """Collect the channel's events until its subscribe (or resume) is answered."""
        if self.pending is None:
            self.pending = {}
        self.pending[channel] = []

    def take_token(self) -> bool:
        """Spend one request from the bucket; False when the rate limit is passed."""
        hub = self.hub
        now = time.monotonic()
        self._tokens = min(hub.rate_burst, self._tokens + (now - self._stamp) * hub.rate_per_s)
        self._stamp = now
        self._tokens -= 1  # refused requests count too: a flood digs the bucket deeper
        return self._tokens >= 0

    def over_limit(self) -> bool:
        """Still flooding after a whole burst of refusals: time to close (4008)."""
        return self._tokens < -self.hub.rate_burst

    def send(self, frame: bytes, framed: bytes | None = None) -> None:
        """Write a frame at the end of this turn of the loop if the socket takes it, else
        queue it; never blocks. Past the queue's bound the connection is closed (4010).
        `framed`: the frame with its WebSocket header, when a fan-out made it once for all."""
        if self.closed:
            return
        if self._queue or self._flusher is not None or self._write_now is None:
            self._enqueue(frame)
            return
        batch, framed_batch = self._batch, self._framed
        if batch is None or framed_batch is None:
            batch, framed_batch = self._batch, self._framed = [], []
            self.hub.write_soon(self)
        batch.append(frame)
        framed_batch.append(framed if framed is not None else text_frame(frame))

    def write_batch(self) -> None:
        """This turn's frames in one write; the slow way, in order, if the socket is not
        taking any (paused, or closed under us)."""
        batch, framed = self._batch, self._framed
        self._batch = self._framed = None
        if not batch or not framed:
            return
        assert self._write_now is not None
        if self._write_now(b"", b"".join(framed)):
            for frame in batch:
                if frame.__class__ is TimedFrame:
                    metrics.FANOUT_SECONDS.observe(time.perf_counter() - frame.t0)
            return
        for frame in batch:
            self._enqueue(frame)

    def _enqueue(self, frame: bytes) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(frame)
        self._queued_bytes += len(frame)
        if len(queue) > self.max_messages or self._queued_bytes > self.max_bytes:
            metrics.SLOW_CONSUMERS.inc()
            self.close(*SLOW_CONSUMER)
            return
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                # ASGI takes text frames as str: only this slow path pays the decode
                await self._send({"type": "websocket.send", "text": frame.decode()})
                if frame.__class__ is TimedFrame:
                    metrics.FANOUT_SECONDS.observe(time.perf_counter() - frame.t0)
        except Exception:  # the peer went away: the receive loop will see it
            self.closed = True
            queue.clear()
        finally:
            self._flusher = None
            self._queue = None  # empty: give its memory back

    async def drain(self) -> None:
        """Wait until everything queued so far is written (used before closing)."""
        self.write_batch()
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is queued, or at once for a slow consumer."""
        if self.closed:
            return
        self.close_code = code
        if code == Close.SLOW_CONSUMER:
            self._batch = self._framed = None
        if code == Close.SLOW_CONSUMER and self._queue is not None:
            self._queue.clear()
            self._queued_bytes = 0
            if self._flusher is not None:
                self._flusher.cancel()
        self.closed = True
        self._closing = asyncio.get_running_loop().create_task(self._close(code, reason))

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Let a close we started reach the peer before the endpoint returns."""
        if self._closing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closing), timeout)

    async def _close(self, code: int, reason: str) -> None:
        if code != Close.SLOW_CONSUMER:
            await self.drain()
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


class Coalescer:
    """At most one notice per key in each window, with a bounded memory of what was sent.

    Why state here rather than in the order's record: the notice repeats because a request
    was refused, and a refusal must not write the record (a phone's refusals would contend
    with the ERP's writes); and who was told what, when, is delivery, which the hub owns
    like the rate limit. Keys are kept in the order they were last sent: the oldest are at
    the front, and go once their window has passed or when the bound is reached (at worst,
    a notice is then repeated once early)."""

    __slots__ = ("_sent", "max_keys", "window_s")

    def __init__(self, window_s: float, max_keys: int) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._sent: dict[tuple[str, str, str], float] = {}

    def admit(self, key: tuple[str, str, str], now: float) -> bool:
        sent = self._sent
        last = sent.get(key)
        if last is not None and now - last < self.window_s:
            return False
        sent.pop(key, None)
        sent[key] = now
        for oldest, at in list(itertools.islice(sent.items(), 2)):  # amortised: two per call
            if now - at >= self.window_s or len(sent) > self.max_keys:
                del sent[oldest]
        return True

    def __len__(self) -> int:
        return len(self._sent)


def _ignore(channel: str) -> None:
    pass


class Hub:
    def __init__(self, max_queue_messages: int = 2_000, max_queue_bytes: int = 4 * 1024 * 1024,
                 rate_per_s: float = 300.0, rate_burst: float = 600.0,
                 contended_window_ms: int = 2_000, max_coalesced: int = 100_000) -> None:
        self.max_queue_messages = max_queue_messages
        self.max_queue_bytes = max_queue_bytes
        self.rate_per_s = rate_per_s
        self.rate_burst = rate_burst
        self.connections: set[Connection] = set()
        self._subscribers: dict[str, set[Connection]] = {}
        # (store, holder_key) -> connections. A list, not a set: a terminal has one connection
        # or two (64 bytes against 216).
        self._terminals: dict[tuple[str, str], list[Connection]] = {}
        self._authorities: dict[str, list[Connection]] = {}
        self._sessions: dict[str, Session] = {}
        self._fanouts = 0
        self._notices = Coalescer(contended_window_ms / 1000, max_coalesced)
        self._unwritten: list[Connection] = []  # connections with frames for this turn's end
        # Told when the last local subscriber of a channel leaves (Backend.channel_idle).
        self.on_channel_idle: Callable[[str], None] = _ignore

    def connection(self, send: AsgiSend) -> Connection:
        conn = Connection(self, send, self.max_queue_messages, self.max_queue_bytes)
        self.connections.add(conn)
        return conn

    def write_soon(self, conn: Connection) -> None:
        """Have `conn`'s frames of this turn written once it ends."""
        if not self._unwritten:
            asyncio.get_running_loop().call_soon(self._write_batches)
        self._unwritten.append(conn)

    def _write_batches(self) -> None:
        unwritten, self._unwritten = self._unwritten, []
        for conn in unwritten:
            conn.write_batch()

    # --- sessions ---------------------------------------------------------------------

    def attach(self, conn: Connection, terminal: Terminal, authority: bool) -> Session:
        """Bind an authenticated connection to a new session (see restore for resume)."""
        session = Session(secrets.token_urlsafe(12), terminal)
        self._sessions[session.session_id] = session
        session.conn = conn
        conn.session = session
        conn.terminal = terminal
        conn.table_id = table_scope(terminal)
        self._terminals.setdefault((terminal.store_id, holder_key(terminal)), []).append(conn)
        if authority or is_first_authority(terminal.role):
            conn.authority = True
            self._authorities.setdefault(terminal.store_id, []).append(conn)
        return session

    def attached(self, session_id: str) -> bool:
        """A connection of this broker holds the session: it is not resumed twice."""
        return session_id in self._sessions

    def restore(self, conn: Connection, session_id: str, stored: StoredSession) -> None:
        """Take over a resumed session: its id, and its subscriptions at their positions;
        live events are held back until the missed ones are replayed (end_subscribe)."""
        session = conn.session
        assert session is not None and not session.subs
        del self._sessions[session.session_id]
        session.session_id = session_id
        self._sessions[session_id] = session
        for channel, (seq, epoch) in stored.positions.items():
            session.subs[channel] = seq
            session.epochs[channel] = epoch
            self._subscribers.setdefault(channel, set()).add(conn)
            conn.hold(channel)

    @staticmethod
    def stored(session: Session) -> StoredSession:
        """What the backend keeps of a session for `resume`."""
        return StoredSession(holder_key(session.terminal),
                             {channel: (seq, session.epochs.get(channel, ""))
                              for channel, seq in session.subs.items()})

    def detach(self, conn: Connection) -> None:
        """Forget a closed connection (the backend keeps its session for the grace)."""
        self.connections.discard(conn)
        conn.closed = True
        session, terminal = conn.session, conn.terminal
        if session is None or terminal is None:
            return
        for channel in session.subs:
            subs = self._subscribers.get(channel)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self._subscribers[channel]
                    self.on_channel_idle(channel)
        key = (terminal.store_id, holder_key(terminal))
        conns = self._terminals.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._terminals[key]
        if conn.authority:
            authorities = self._authorities.get(terminal.store_id, [])
            if conn in authorities:
                authorities.remove(conn)
        session.conn = None
        self._sessions.pop(session.session_id, None)

    def queue_depths(self) -> list[int]:
        return [len(conn._queue) for conn in self.connections if conn._queue]

    def authority(self, store_id: str) -> Connection | None:
        """The connection that answers `order.fetch`: the first authority's role first (an
        erp_main), newest first."""
        candidates = [c for c in self._authorities.get(store_id, ()) if not c.closed]
        for conn in reversed(candidates):
            if conn.terminal is not None and is_first_authority(conn.terminal.role):
                return conn
        return candidates[-1] if candidates else None

    # --- subscriptions -------------------------------------------------------------------

    def begin_subscribe(self, conn: Connection, channel: str) -> None:
        """Start collecting the channel's events until the subscribe reply is sent."""
        assert conn.session is not None
        conn.hold(channel)
        conn.session.subs[channel] = 0
        self._subscribers.setdefault(channel, set()).add(conn)

    def end_subscribe(self, conn: Connection, channel: str, seq: int | None = None,
                      epoch: str = "") -> None:
        """The snapshot at `seq` of the numbering `epoch` (or the replay) is queued: release
        what came after it."""
        assert conn.session is not None
        buffered = conn.pending.pop(channel, []) if conn.pending else []
        if seq is not None:
            conn.session.subs[channel] = seq
            conn.session.epochs[channel] = epoch
        for event_seq, text in buffered:
            if event_seq > conn.session.subs[channel]:
                conn.session.subs[channel] = event_seq
                conn.send(text)

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        assert conn.session is not None
        conn.session.subs.pop(channel, None)
        conn.session.epochs.pop(channel, None)
        if conn.pending:
            conn.pending.pop(channel, None)
        subs = self._subscribers.get(channel)
        if subs is not None:
            subs.discard(conn)
            if not subs:
                del self._subscribers[channel]
                self.on_channel_idle(channel)

    async def expire_tokens(self, every_s: float = 1.0) -> None:
        """Close connections whose token ended (4003), within a second: one pass over the
        connections a second costs less than a timer held by each of them."""
        while True:
            await asyncio.sleep(every_s)
            now = time.time()
            for conn in [c for c in self.connections if c.expires_at <= now]:
                conn.close(*TOKEN_EXPIRED)

    def has_subscribers(self, channel: str) -> bool:
        return channel in self._subscribers

    def lost(self, channel: str) -> None:
        """Events were lost for good: subscribers reconnect (1012) and recover by snapshot."""
        for conn in list(self._subscribers.get(channel, ())):
            conn.close(*EVENTS_LOST)

    def replay(self, conn: Connection, channel: str, seq: int, text: bytes,
               table_id: str | None) -> None:
        """Deliver a missed event to one connection, as publish would have."""
        session = conn.session
        if session is None or seq <= session.subs.get(channel, seq):
            return
        session.subs[channel] = seq
        if conn.table_id is None or table_id is None or table_id == conn.table_id:
            conn.send(text)

    def subscription_count(self, conn: Connection) -> int:
        return len(conn.session.subs) if conn.session else 0

    # --- the backend's event sink ------------------------------------------------------------

    def publish(self, channel: str, seq: int, text: bytes, table_id: str | None) -> None:
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        self._fanouts += 1
        if self._fanouts % FANOUT_SAMPLE == 0:
            timed = TimedFrame(text)
            timed.t0 = time.perf_counter()
            text = timed  # every subscriber's write of this one is observed
        framed = text_frame(text) if len(subscribers) > 1 else None
        for conn in subscribers:
            session = conn.session
            if session is None:
                continue
            pending = conn.pending.get(channel) if conn.pending else None
            if pending is not None:
                pending.append((seq, text))
                continue
            if seq <= session.subs.get(channel, seq):
                continue  # already delivered (a resume replay, say)
            session.subs[channel] = seq
            # an h5 sees only its own table's orders
            if conn.table_id is None or table_id is None or table_id == conn.table_id:
                conn.send(text, framed)

    def direct(self, store_id: str, holder: str, text: bytes,
               unless_on: tuple[str, ...], coalesce: str = "") -> None:
        """To each connection of the terminal `holder` (its holder_key) on none of `unless_on`."""
        conns = self._terminals.get((store_id, holder))
        if not conns:
            return
        # A requester repeating a refused request tells the holder nothing new: one
        # `lock.contended` per holder, lock and requester in each window.
        if coalesce and not self._notices.admit((store_id, holder, coalesce),
                                                time.monotonic()):
            return
        for conn in conns:
            session = conn.session
            if session is not None and any(ch in session.subs for ch in unless_on):
                continue
            conn.send(text)
