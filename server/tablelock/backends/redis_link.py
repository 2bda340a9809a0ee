"""Where a Redis key lives, and an auto-pipelined connection (backends/resp.py) to that node.

- `redis://[user:password@]host:port/db`: one master; `rediss://` the same over TLS (the
  server's certificate checked against the system's CAs); `unix:///path/redis.sock?db=N`.
- `redis+sentinel://s1:port,s2:port/service`: the master is asked of the sentinels
  (SENTINEL GET-MASTER-ADDR-BY-NAME) whenever a connection to it is opened, so that a
  failover is followed by the next connection.
- `redis+cluster://host:port[,host:port]`: the slot map is read with CLUSTER SLOTS from a
  known node, and a key goes to the master of its hash slot (every key of a store carries
  `{store:<id>}`, so a store lives on one node). A MOVED or ASK reply makes the map be read
  again.

A reply saying the node is no longer where our writes go (READONLY after a failover, MOVED,
ASK, CLUSTERDOWN, MASTERDOWN, LOADING) drops that connection and, on a Cluster, the map.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from .resp import NotSent, PubSubConnection, Reconnecting, ReplyError, RespConnection

Node = tuple[str, int]
# How long opening a connection may take, and how late a reply may be before the connection
# is taken for stalled (every command on it then fails: MaybeApplied if it was written, and
# the commit path resolves it by its id). A Redis answers in well under a millisecond: 0.4 s
# keeps a stalled one's refusal inside the second the docs promise.
CONNECT_TIMEOUT_S = 0.4
REPLY_TIMEOUT_S = 0.4
_STALE = ("MOVED", "ASK", "READONLY", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "TRYAGAIN")


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: str | bytes) -> int:
    """The Cluster hash slot of a key: CRC16 (XMODEM) of its hash tag, if any, mod 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % 16384


def _nodes(netloc: str, default_port: int) -> list[Node]:
    found = []
    for node in netloc.split("@")[-1].split(","):
        host, _, port = node.partition(":")
        found.append((host or "127.0.0.1", int(port or default_port)))
    return found


class RedisLink:
    """Connections to the node each key lives on, for commands and for pub/sub."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.cluster = parsed.scheme == "redis+cluster"
        self._password = unquote(parsed.password) if parsed.password else None
        self._username = unquote(parsed.username) if parsed.username else None
        self._sentinels: list[Node] = []
        self._service = ""
        self._db = 0
        self._seeds: list[Node] = []
        self._tls = ssl.create_default_context() if parsed.scheme == "rediss" else None
        self._unix_path: str | None = None
        if parsed.scheme == "unix":
            self._unix_path = parsed.path
            self._db = int(parse_qs(parsed.query).get("db", ["0"])[0])
            self._seeds = [("", 0)]
        elif parsed.scheme == "redis+sentinel":
            self._sentinels = _nodes(parsed.netloc, 26379)
            self._service = parsed.path.strip("/") or "mymaster"
        elif self.cluster:
            self._seeds = _nodes(parsed.netloc, 6379)
        else:
            self._seeds = [(parsed.hostname or "127.0.0.1", parsed.port or 6379)]
            path = parsed.path.strip("/")
            self._db = int(path) if path else 0
        self._slots: list[Node] | None = None  # Cluster: slot -> master
        self._mapping: asyncio.Future[list[Node]] | None = None
        self._commands: dict[Node | None, Reconnecting] = {}
        self._waiting: dict[Node | None, Reconnecting] = {}

    # --- where ---------------------------------------------------------------------------------

    async def node_of(self, key: str | bytes) -> Node | None:
        """The master of a key on a Cluster; None (the one master) otherwise."""
        if not self.cluster:
            return None
        slots = self._slots
        if slots is None:
            if self._mapping is None:
                self._mapping = asyncio.ensure_future(self._read_slots())
            try:
                slots = await asyncio.shield(self._mapping)
            finally:
                if self._mapping is not None and self._mapping.done():
                    self._mapping = None
        return slots[key_slot(key)]

    async def _read_slots(self) -> list[Node]:
        last: Exception = NotSent("no cluster node given")
        known = {node for node in self._seeds}
        for node in [*self._seeds, *(n for n in self._commands if n is not None)]:
            try:
                conn = await self._open(node, 0)
            except NotSent as exc:
                last = exc
                continue
            try:
                ranges = await conn.execute("CLUSTER", "SLOTS")
            except (ReplyError, NotSent) as exc:
                last = exc
                continue
            finally:
                conn.close()
            slots: list[Node] = [node] * 16384
            for first, end, master, *_ in ranges:
                owner = (master[0].decode() or node[0], int(master[1]))
                known.add(owner)
                slots[first:end + 1] = [owner] * (end - first + 1)
            self._seeds = sorted(known)
            self._slots = slots
            return slots
        raise last

    async def _master(self) -> Node:
        """The master's address: the URL's, or the first sentinel's answer."""
        if not self._sentinels:
            return self._seeds[0]
        last: Exception = NotSent("no sentinel answered")
        for sentinel in self._sentinels:
            try:
                conn = await RespConnection.open(*sentinel, timeout=CONNECT_TIMEOUT_S)
            except NotSent as exc:
                last = exc
                continue
            try:
                answer = await conn.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._service)
            except (ReplyError, NotSent) as exc:
                last = exc
                continue
            finally:
                conn.close()
            if answer:
                return answer[0].decode(), int(answer[1])
        raise NotSent(f"no master for {self._service!r}: {last}")

    async def _open(self, node: Node | None, db: int, timeout: float = REPLY_TIMEOUT_S
                    ) -> RespConnection:
        host, port = node if node is not None else await self._master()
        conn = await RespConnection.open(host, port, db=db, username=self._username,
                                         password=self._password, timeout=timeout,
                                         tls=self._tls, unix_path=self._unix_path)
        return conn

    # --- commands ------------------------------------------------------------------------------

    async def connection(self, key: str | bytes) -> RespConnection:
        """The live command connection to the master of `key` (NotSent if none now)."""
        node = await self.node_of(key)
        link = self._commands.get(node)
        if link is None:
            link = self._commands[node] = Reconnecting(self._opener(node))
        return await link.connection()

    async def waiting_connection(self, key: str | bytes, timeout: float) -> RespConnection:
        """A connection of its own for commits that WAIT for replicas (WAIT blocks the
        connection it runs on: it would hold up every pipelined caller behind it)."""
        node = await self.node_of(key)
        link = self._waiting.get(node)
        if link is None:
            link = self._waiting[node] = Reconnecting(self._opener(node, timeout))
        return await link.connection()

    def _opener(self, node: Node | None, timeout: float = REPLY_TIMEOUT_S) -> Callable[
            [], Any]:
        async def opener() -> RespConnection:
            return await self._open(node, self._db, timeout)
        return opener

    async def execute(self, key: str | bytes, *args: Any) -> Any:
        """One command on the master of `key` (the key routes it; it is not sent)."""
        return await self.once_more_if_not_sent(key, lambda conn: conn.execute(*args))

    async def once_more_if_not_sent(self, key: str | bytes,
                                    call: Callable[[RespConnection], Awaitable[Any]]) -> Any:
        """`call` on the connection of `key`; if that connection was found closed as the
        command went out (Redis restarted since: it was not sent), once more on a new one."""
        try:
            return await self._checked(key, call)
        except NotSent:
            return await self._checked(key, call)

    async def _checked(self, key: str | bytes,
                       call: Callable[[RespConnection], Awaitable[Any]]) -> Any:
        conn = await self.connection(key)
        try:
            return await call(conn)
        except ReplyError as exc:
            self.check_stale(conn, exc)
            raise

    def check_stale(self, conn: RespConnection | None, error: ReplyError) -> None:
        """After an error reply: if it says our map or master is out of date, drop them."""
        if str(error).startswith(_STALE):
            self._slots = None
            if conn is not None:
                conn.close()

    async def pubsub(self, node: Node | None, on_lost: Callable[[BaseException], None]
                     ) -> PubSubConnection:
        host, port = node if node is not None else await self._master()
        return await PubSubConnection.open(host, port, username=self._username,
                                           password=self._password, on_lost=on_lost,
                                           timeout=REPLY_TIMEOUT_S, tls=self._tls,
                                           unix_path=self._unix_path)

    def close(self) -> None:
        for link in [*self._commands.values(), *self._waiting.values()]:
            with contextlib.suppress(Exception):
                link.close()
