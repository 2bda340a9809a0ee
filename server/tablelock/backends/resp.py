"""A lean asyncio Redis client: RESP2/RESP3 parsed by hiredis, auto-pipelined.

Why it exists: bench/redis_clients.py measured the client-side CPU of one EVALSHA and of one
received pub/sub message; this layer spends a fraction of what the libraries spend (figures in
bench/README.md, "Redis client"), and the Redis-backed broker is client-CPU bound.

- `RespConnection`: one TCP connection for commands. Every command issued in the same event-loop
  iteration goes out in one write (auto-pipelining); replies come back in order and resolve
  the callers' futures. `evalsha` runs a `Script` by its SHA1 and, on NOSCRIPT, loads it with
  SCRIPT LOAD and runs it again (a NOSCRIPT reply means it did not run, so that is safe).
- `Reconnecting`: holds one live `RespConnection`, opening a new one after a loss.
- `PubSubConnection`: one TCP connection in subscriber mode, SUBSCRIBE / UNSUBSCRIBE and the
  sharded SSUBSCRIBE / SUNSUBSCRIBE (Redis 7), each channel with the handler registered for it.

Failures are typed so that a commit path knows whether a write may have reached Redis:
`ReplyError` (Redis answered with an error), `NotSent` (the command was never written to the
socket: it did not run), `MaybeApplied` (it was written and no reply came back: connection
lost, or the reply overdue; it may or may not have run, and the caller must read to find out).

What it does not do (the caller's job, said so the adapter does not assume otherwise):
- No Sentinel discovery: connect to the address the caller resolved (for example with
  `SENTINEL GET-MASTER-ADDR-BY-NAME` on a sentinel over a `RespConnection`), and resolve again
  after a loss. It does not check the ROLE of what it reached.
- No Cluster routing: it follows no MOVED/ASK redirection and computes no hash slots. On a
  cluster, keep one connection per master and route by slot yourself; a MOVED or ASK reply
  surfaces as a `ReplyError`. SSUBSCRIBE must go to the node owning the channel's slot.
- No reconnection inside a connection: a lost connection stays lost (every later call fails
  with `NotSent` at once). `Reconnecting` opens a new command connection on the next call;
  for pub/sub the owner opens a new `PubSubConnection` from its `on_lost`, re-subscribes,
  and treats whatever a subscriber missed meanwhile as a gap.
- TLS (`tls=`) and Unix sockets (`unix_path=`) only as asyncio opens them. No client-side
  caching, no MULTI/EXEC helper, no blocking commands (BLPOP and the like would hold up every
  pipelined caller behind them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis

Arg = bytes | str | int | float
Handler = Callable[[bytes, bytes], None]  # (channel, message data)
LostHandler = Callable[[BaseException], None]

DEFAULT_TIMEOUT = 5.0

log = logging.getLogger("tablelock.resp")


class RespError(Exception):
    """Any failure of this client."""


class ReplyError(RespError):
    """Redis answered the command with an error reply (it ran and failed, or was refused)."""


class ConnectionLostError(RespError):
    """The connection is gone (the message says why)."""


class NotSent(ConnectionLostError):
    """The command was not written to Redis: it did not run, and may be retried."""


class MaybeApplied(ConnectionLostError):
    """The command was written, and its reply never came: it may have run."""


@dataclass(frozen=True)
class Script:
    """A Lua script known by its SHA1, so it is sent once per server, not once per call."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)


_INCOMPLETE = object()  # hiredis's "no whole reply yet" (its default, False, is a RESP3 value)


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis's stub types the argument as a 1-tuple; it takes any length.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class _Protocol(asyncio.Protocol):
    """The socket side shared by both connections: buffers writes to one per loop iteration,
    feeds bytes to hiredis and hands each reply on."""

    def __init__(self, on_reply: Callable[[Any], None], on_lost: Callable[[Exception], None]
                 ) -> None:
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._on_reply = on_reply
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed: Exception | None = None
        self._buffer: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._peek: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # A duplicate of the socket, only to look for the server's close before each write
        # (the transport's own socket object may not offer recv, under uvloop).
        raw = transport.get_extra_info("socket")
        if raw is not None:
            self._peek = socket.fromfd(raw.fileno(), raw.family, raw.type)

    def queue(self, data: bytes) -> None:
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(data)

    @property
    def unsent(self) -> int:
        return len(self._buffer)

    def flush(self) -> None:
        if self._buffer and self.transport is not None and self.closed is None:
            if self._peer_closed():  # what we would write now can't run: say NotSent
                self.abort(ConnectionLostError("closed by the server"))
                return
            self.transport.write(b"".join(self._buffer))
        self._buffer.clear()

    def _peer_closed(self) -> bool:
        """Whether the server closed the connection, though the loop has not told us yet
        (its end-of-stream may be waiting behind the callback that writes)."""
        if self._peek is None:
            return False
        try:
            return self._peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _INCOMPLETE:
                self._on_reply(reply)
        except hiredis.ProtocolError as exc:
            self.abort(ConnectionLostError(f"RESP protocol error: {exc}"))

    def abort(self, cause: Exception) -> None:
        """Fail everything pending and close: used for a protocol error or an overdue reply."""
        if self.closed is None:
            self.connection_lost(cause)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is not None:
            return
        self.closed = exc or ConnectionLostError("connection closed")
        self._on_lost(self.closed)
        self._buffer.clear()
        if self._peek is not None:
            self._peek.close()
            self._peek = None


async def _open(host: str, port: int, on_reply: Callable[[Any], None],
                on_lost: Callable[[Exception], None], timeout: float,
                tls: ssl.SSLContext | None = None, unix_path: str | None = None) -> _Protocol:
    loop = asyncio.get_running_loop()
    try:
        if unix_path is not None:
            opening = loop.create_unix_connection(lambda: _Protocol(on_reply, on_lost),
                                                  unix_path)
        else:
            opening = loop.create_connection(lambda: _Protocol(on_reply, on_lost), host, port,
                                             ssl=tls)
        _, protocol = await asyncio.wait_for(opening, timeout)
    except (OSError, TimeoutError) as exc:
        raise NotSent(f"cannot connect to {host}:{port}: {exc!r}") from exc
    return protocol


class RespConnection:
    """One auto-pipelined command connection. Open with `await RespConnection.open(...)`."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        # One entry per command written or queued, in order: (future, deadline).
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._protocol: _Protocol | None = None
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, host: str = "127.0.0.1", port: int = 6379, *, db: int = 0,
                   username: str | None = None, password: str | None = None,
                   protocol: int = 2, timeout: float = DEFAULT_TIMEOUT,
                   tls: ssl.SSLContext | None = None, unix_path: str | None = None
                   ) -> RespConnection:
        """Connect; then HELLO 3 (with the credentials) for RESP3, or AUTH for RESP2; then
        SELECT. `timeout` bounds the connect and how long any reply may be overdue."""
        conn = cls(timeout)
        conn._protocol = await _open(host, port, conn._on_reply, conn._on_lost, timeout, tls,
                                     unix_path)
        conn._arm_watchdog()
        try:
            if protocol == 3:
                auth: list[Arg] = ["AUTH", username or "default", password] if password else []
                await conn.execute("HELLO", 3, *auth)
            elif password is not None:
                await conn.execute("AUTH", *([username] if username else []), password)
            if db:
                await conn.execute("SELECT", db)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def is_connected(self) -> bool:
        return self._protocol is not None and self._protocol.closed is None

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue one command; it goes out with every other command of this loop iteration.
        The future resolves to the reply, or fails with ReplyError / NotSent / MaybeApplied."""
        future: asyncio.Future[Any] = self._loop.create_future()
        protocol = self._protocol
        if protocol is None or protocol.closed is not None:
            cause = protocol.closed if protocol is not None else None
            future.set_exception(NotSent(f"not connected: {cause!r}"))
            return future
        protocol.queue(_pack(args))
        self._pending.append((future, self._loop.time() + self._timeout))
        return future

    async def evalsha(self, script: Script, keys: Iterable[Arg] = (),
                      args: Iterable[Arg] = ()) -> Any:
        """EVALSHA; on NOSCRIPT (after a restart or SCRIPT FLUSH), SCRIPT LOAD and again."""
        keys = list(keys)
        call: tuple[Arg, ...] = (len(keys), *keys, *args)
        try:
            return await self.execute("EVALSHA", script.sha, *call)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self.execute("EVALSHA", script.sha, *call)

    def close(self) -> None:
        """Close now: calls still in the write buffer fail with NotSent (they never go out),
        written ones with MaybeApplied."""
        if self._protocol is not None:
            self._protocol.abort(ConnectionLostError("closed by the client"))

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.PushNotification) or not self._pending:
            return  # a RESP3 push nobody asked for here (say, client tracking)
        future, _ = self._pending.popleft()
        if future.done():  # the caller was cancelled meanwhile
            return
        if isinstance(reply, hiredis.ReplyError):
            future.set_exception(ReplyError(str(reply)))
        else:
            future.set_result(reply)

    def _on_lost(self, cause: Exception) -> None:
        """Written commands may have run; the ones still in the write buffer did not."""
        unsent = self._protocol.unsent if self._protocol is not None else 0
        written = len(self._pending) - unsent
        for index, (future, _) in enumerate(self._pending):
            if future.done():
                continue
            kind = MaybeApplied if index < written else NotSent
            future.set_exception(kind(f"connection lost: {cause!r}"))
        self._pending.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _arm_watchdog(self) -> None:
        # One timer per connection, not one per call: a reply overdue means Redis stalled
        # (or the network did), and every command behind it is stuck too.
        self._watchdog = self._loop.call_later(min(self._timeout / 4, 0.25), self._check)

    def _check(self) -> None:
        if self._pending and self._pending[0][1] < self._loop.time():
            assert self._protocol is not None
            self._protocol.abort(TimeoutError(f"no reply within {self._timeout} s"))
            return
        self._arm_watchdog()


class Reconnecting:
    """One live `RespConnection` at a time: when the last one is lost, the next caller opens
    a new one, and every caller meanwhile shares that attempt. `opener` decides where to
    connect (for Sentinel, it asks the sentinels for the master first)."""

    def __init__(self, opener: Callable[[], Awaitable[RespConnection]]) -> None:
        self._opener = opener
        self._conn: RespConnection | None = None
        self._opening: asyncio.Future[RespConnection] | None = None

    async def connection(self) -> RespConnection:
        """The live connection, or a new one; NotSent if none can be opened now."""
        conn = self._conn
        if conn is not None and conn.is_connected:
            return conn
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> RespConnection:
        try:
            self._conn = await self._opener()
            return self._conn
        finally:
            self._opening = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


_MESSAGE_KINDS = {b"message", b"smessage"}
_CONFIRM_KINDS = {b"subscribe", b"unsubscribe", b"ssubscribe", b"sunsubscribe"}


class PubSubConnection:
    """One subscriber connection. Each channel has one handler, the one given when it was
    last subscribed; it gets (channel, data) for every message, in order, and must not block
    (it runs inside the socket's read callback)."""

    def __init__(self, on_lost: LostHandler | None) -> None:
        self._handlers: dict[bytes, Handler] = {}
        self._confirming: dict[tuple[bytes, bytes], deque[asyncio.Future[None]]] = {}
        self._pings: deque[asyncio.Future[None]] = deque()
        # (S)(UN)SUBSCRIBE commands in the order sent, so that an error reply (a MOVED on a
        # cluster node that does not own the slot, say) fails the one it answers.
        self._requests: deque[tuple[list[bytes], list[asyncio.Future[None]]]] = deque()
        self._protocol: _Protocol | None = None
        self._lost_handler = on_lost

    @classmethod
    async def open(cls, host: str = "127.0.0.1", port: int = 6379, *,
                   username: str | None = None, password: str | None = None,
                   on_lost: LostHandler | None = None, timeout: float = DEFAULT_TIMEOUT,
                   tls: ssl.SSLContext | None = None, unix_path: str | None = None
                   ) -> PubSubConnection:
        """Connect and AUTH if asked (RESP2: messages are plain arrays). `on_lost` is called
        once if the connection drops; subscriptions do not survive it."""
        conn = cls(on_lost)
        auth: asyncio.Future[None] | None = None
        conn._protocol = await _open(host, port, conn._on_reply, conn._on_lost, timeout, tls,
                                     unix_path)
        if password is not None:
            auth = asyncio.get_running_loop().create_future()
            conn._pings.append(auth)
            conn._protocol.queue(_pack(
                ("AUTH", *([username] if username else []), password)))
            await conn._wait(auth, timeout)
        return conn

    @property
    def is_connected(self) -> bool:
        return self._protocol is not None and self._protocol.closed is None

    @property
    def channels(self) -> set[bytes]:
        return set(self._handlers)

    async def subscribe(self, channels: Iterable[str | bytes], handler: Handler,
                        timeout: float = DEFAULT_TIMEOUT) -> None:
        """SUBSCRIBE; returns once Redis confirmed every channel (messages published after
        that reach `handler`)."""
        await self._send(b"subscribe", channels, handler, timeout)

    async def ssubscribe(self, channels: Iterable[str | bytes], handler: Handler,
                         timeout: float = DEFAULT_TIMEOUT) -> None:
        """SSUBSCRIBE (sharded, Redis 7). On a cluster every channel must hash to the slot
        of the node this connection reaches."""
        await self._send(b"ssubscribe", channels, handler, timeout)

    async def unsubscribe(self, channels: Iterable[str | bytes],
                          timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._send(b"unsubscribe", channels, None, timeout)

    async def sunsubscribe(self, channels: Iterable[str | bytes],
                           timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._send(b"sunsubscribe", channels, None, timeout)

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """A round trip on this connection (its health check: a silent connection may be a
        dead one)."""
        protocol = self._live()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings.append(future)
        protocol.queue(b"*1\r\n$4\r\nPING\r\n")
        await self._wait(future, timeout)

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.abort(ConnectionLostError("closed by the client"))

    async def _send(self, kind: bytes, channels: Iterable[str | bytes], handler: Handler | None,
                    timeout: float) -> None:
        protocol = self._live()
        names = [c.encode() if isinstance(c, str) else c for c in channels]
        if not names:
            return
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for name in names:
            if handler is not None:
                self._handlers[name] = handler
            future: asyncio.Future[None] = loop.create_future()
            self._confirming.setdefault((kind, name), deque()).append(future)
            futures.append(future)
        self._drop_answered()
        self._requests.append((names if handler is not None else [], futures))
        protocol.queue(_pack((kind.decode(), *names)))
        await self._wait(asyncio.gather(*futures), timeout)

    def _drop_answered(self) -> None:
        while self._requests and all(f.done() for f in self._requests[0][1]):
            self._requests.popleft()

    def _live(self) -> _Protocol:
        protocol = self._protocol
        if protocol is None or protocol.closed is not None:
            raise NotSent(f"pub/sub not connected: {protocol.closed if protocol else None!r}")
        return protocol

    async def _wait(self, awaitable: asyncio.Future[Any], timeout: float) -> None:
        try:
            await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            # The stream of confirmations is now out of step with what we wait for: drop it.
            assert self._protocol is not None
            self._protocol.abort(TimeoutError(f"no pub/sub reply within {timeout} s"))
            raise MaybeApplied(f"no pub/sub reply within {timeout} s") from None

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind in _MESSAGE_KINDS:
                handler = self._handlers.get(reply[1])
                if handler is not None:
                    try:
                        handler(reply[1], reply[2])
                    except Exception:  # one bad message must not drop the connection
                        log.exception("pub/sub handler failed on %r", reply[1])
                return
            if kind in _CONFIRM_KINDS:
                self._confirmed(kind, reply[1])
                return
        if isinstance(reply, hiredis.ReplyError):
            self._drop_answered()
            if self._requests:
                names, futures = self._requests.popleft()
                for name in names:  # never subscribed: no handler
                    self._handlers.pop(name, None)
                for future in futures:
                    if not future.done():
                        future.set_exception(ReplyError(str(reply)))
                return
        if self._pings:  # PONG (["pong", ""] in subscriber mode), or the reply to AUTH
            future = self._pings.popleft()
            if future.done():
                return
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(None)

    def _confirmed(self, kind: bytes, channel: bytes) -> None:
        if kind in (b"unsubscribe", b"sunsubscribe"):
            self._handlers.pop(channel, None)
        waiting = self._confirming.get((kind, channel))
        while waiting:
            future = waiting.popleft()
            if not future.done():  # done: failed by an error reply, so never confirmed
                future.set_result(None)
                break
        if waiting is not None and not waiting:
            del self._confirming[(kind, channel)]

    def _on_lost(self, cause: Exception) -> None:
        error = MaybeApplied(f"pub/sub connection lost: {cause!r}")
        for waiting in self._confirming.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(error)
        for future in self._pings:
            if not future.done():
                future.set_exception(error)
        self._confirming.clear()
        self._pings.clear()
        self._requests.clear()
        if self._lost_handler is not None:
            with contextlib.suppress(Exception):
                self._lost_handler(cause)
