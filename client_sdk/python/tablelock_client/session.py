"""The session: who this terminal is, the broker's clock, and the connection's life.

The Session listens to the Connection. On every (re)connect it learns the
terminal, store and config from hello, tells the client's parts, and runs
their catch-up (re-subscribe, check the locks held across the drop, send late
releases) before it calls the client fresh again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from .connection import VERSION, Connection, Frame, TokenSource, now_ms
from .errors import Disconnected, TablelockError
from .model import StoreConfig, Terminal, convert

log = logging.getLogger("tablelock_client")


class SessionPart(Protocol):
    """A part of the client that follows the connection (the mirrors, the held locks)."""

    def connection_up(self) -> Callable[[], Awaitable[None]]:
        """Hello succeeded (before any frame of the new connection is handled).

        Returns this connection's catch-up, run before the client is fresh again.
        """

    def connection_down(self) -> None: ...

    def shut(self) -> None:
        """The client is closed, or gave up reconnecting."""


class Session:
    """The Connection's listener and what the broker said about this terminal."""

    def __init__(self, url: str, token: TokenSource, *, locale: str | None,
                 order_authority: bool, backoff_initial: float, backoff_max: float,
                 request_timeout: float, client_name: str) -> None:
        self.connection = Connection(url, token, self, locale=locale,
                                     order_authority=order_authority, client_name=client_name,
                                     client_version=VERSION, backoff_initial=backoff_initial,
                                     backoff_max=backoff_max, request_timeout=request_timeout)
        self.terminal: Terminal = Terminal("", "")
        self.store_id = ""
        self.config = StoreConfig()
        self.session_id: str | None = None
        self.closed = False
        self.error: TablelockError | None = None  # why the client gave up reconnecting
        self.offset_ms = 0  # broker clock minus ours, from hello and ping
        self._closed_event = asyncio.Event()
        self._epoch = 0  # +1 per connection, so a late catch-up cannot mark a newer one fresh
        self._up = asyncio.Event()
        self._fresh = asyncio.Event()
        self._parts: list[SessionPart] = []
        self._on_event: Callable[[Frame], None] = lambda frame: None
        self._on_rpc: Callable[[Frame], Coroutine[Any, Any, None]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def attach(self, parts: list[SessionPart], on_event: Callable[[Frame], None],
               on_rpc: Callable[[Frame], Coroutine[Any, Any, None]]) -> None:
        """Who follows the connection (catch-up runs in this order) and who gets its frames."""
        self._parts = parts
        self._on_event = on_event
        self._on_rpc = on_rpc

    # --- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.connection.up

    @property
    def fresh(self) -> bool:
        return self._fresh.is_set()

    def server_now_ms(self) -> int:
        return now_ms() + self.offset_ms

    async def wait_fresh(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._fresh.wait()

    async def wait_connected(self) -> None:
        await self._up.wait()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def request(self, type_: str, params: dict[str, Any]) -> Frame:
        if self.closed:
            raise Disconnected("the client is closed")
        ws = self.connection.ws
        try:
            return await self.connection.request(type_, params)
        except Disconnected:
            # The socket died before the reader saw it close: not fresh from now on, so
            # that a caller retrying after wait_fresh() waits for the next connection
            # instead of spinning on the dead one (the reader never gets to run).
            if ws is not None and self.connection.ws is ws:
                self._fresh.clear()
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in the background; it is cancelled when the client shuts."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- life ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await self.connection.open()

    async def close(self) -> None:
        self.closed = True
        await self.connection.close()
        self.shut()

    def shut(self) -> None:
        self.closed = True
        self._closed_event.set()
        for part in self._parts:
            part.shut()
        for task in list(self._tasks):
            task.cancel()

    # --- the Connection's listener ------------------------------------------------------------

    def connection_up(self, hello: Frame) -> None:
        self.session_id = hello.get("session_id")
        self.terminal = convert(hello["terminal"], Terminal)
        store = hello.get("store") or {}
        self.store_id = store.get("store_id", self.terminal.store_id)
        if store.get("config"):
            self.config = convert(store["config"], StoreConfig)
        if isinstance(hello.get("server_time"), int):
            self.offset_ms = hello["server_time"] - now_ms()
        self._up.set()
        # The parts mark their state before the reader runs on: replayed events wait.
        catch_ups = [part.connection_up() for part in self._parts]
        self._epoch += 1
        self.spawn(self._catch_up(catch_ups, self._epoch))

    def connection_down(self) -> None:
        self._up.clear()
        self._fresh.clear()
        if self.closed:
            return
        for part in self._parts:
            part.connection_down()

    def connection_failed(self, error: TablelockError) -> None:
        log.error("tablelock: giving up reconnecting: %s", error)
        self.error = error
        self.shut()

    def connection_frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "event":
            self._on_event(frame)
        elif kind == "rpc" and self._on_rpc is not None:
            self.spawn(self._on_rpc(frame))
        else:
            log.debug("unexpected frame: %.200r", frame)

    async def _catch_up(self, catch_ups: list[Callable[[], Awaitable[None]]],
                        epoch: int) -> None:
        for catch_up in catch_ups:
            await catch_up()
        if self.connected and epoch == self._epoch:
            self._fresh.set()
