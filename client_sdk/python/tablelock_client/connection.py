"""One logical connection to the broker: socket, hello, requests and replies, reconnects.

The socket may come and go; the Connection hides that behind `request()` and
tells its listener (the client's Session) when it goes down, comes back and what it
receives. Reconnects use exponential backoff with full jitter, so that a
store's terminals do not all come back in the same millisecond after a
broker restart (SCENARIOS.md 13). Each hello starts a new session: what was missed
comes back per channel, by re-subscribing with `since` and `epoch` (subscriptions.py),
which works whichever broker the load balancer picks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .constants import CLOSE
from .errors import (
    AuthFailed,
    Disconnected,
    TablelockError,
    Unavailable,
    UnsupportedProtocol,
    error_from,
)

log = logging.getLogger("tablelock_client")

VERSION = "0.1.0"
SUBPROTOCOL = Subprotocol("tablelock.v1")
PROTOCOL_VERSION = 1
HELLO_ID = "hello"
MAX_INBOUND_BYTES = 16 * 1024 * 1024  # a store snapshot can be large; requests stay < 64 KiB

Frame = dict[str, Any]
TokenSource = str | Callable[[], str | Awaitable[str]]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def now_ms() -> int:
    return int(time.time() * 1000)


class Listener(Protocol):
    """What the Connection reports to; all calls are synchronous, on the loop."""

    def connection_up(self, hello: Frame) -> None: ...
    def connection_down(self) -> None: ...
    def connection_failed(self, error: TablelockError) -> None: ...
    def connection_frame(self, frame: Frame) -> None: ...


class Connection:
    def __init__(self, url: str, token: TokenSource, listener: Listener, *,
                 locale: str | None = None, order_authority: bool = False,
                 client_name: str = "tablelock_client-python", client_version: str = "",
                 backoff_initial: float = 0.2, backoff_max: float = 10.0,
                 request_timeout: float = 30.0, open_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.listener = listener
        self.locale = locale
        self.order_authority = order_authority
        self.client_info = {"name": client_name, "version": client_version}
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.ws: ClientConnection | None = None
        self.close_code: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def up(self) -> bool:
        return self.ws is not None

    # --- life -------------------------------------------------------------------------

    async def open(self) -> None:
        """The first connect. Raises (AuthFailed, Disconnected, ...) rather than retrying."""
        ws, hello, early = await self._handshake()
        self._attach(ws, hello, early)
        self._supervisor = asyncio.create_task(self._supervise(), name="tablelock-supervisor")

    async def close(self) -> None:
        self._closing = True
        ws = self.ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.ws is not None:
            self._detach()

    async def fresh_token(self) -> str:
        """The token for the next hello (a token source is asked anew)."""
        if isinstance(self.token, str):
            return self.token
        value = self.token()
        return await value if inspect.isawaitable(value) else value

    async def _handshake(self) -> tuple[ClientConnection, Frame, list[Frame]]:
        """Open a socket and say hello. Returns the socket, the reply and frames that came first."""
        token = await self.fresh_token()
        try:
            ws = await connect(
                routed_url(self.url, token), subprotocols=[SUBPROTOCOL], compression=None,
                max_size=MAX_INBOUND_BYTES, open_timeout=self.open_timeout, close_timeout=2)
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise Disconnected(f"cannot reach {self.url}: {exc}") from exc
        try:
            hello: Frame = {"id": HELLO_ID, "type": "hello", "token": token,
                            "protocol": PROTOCOL_VERSION, "client": self.client_info}
            if self.locale:
                hello["locale"] = self.locale
            if self.order_authority:
                hello["order_authority"] = True
            await ws.send(_encode(hello).decode())
            # Anything before the reply (an rpc, say) is kept and dispatched after it,
            # so that the listener learns of the session before any of its frames.
            early: list[Frame] = []
            async with asyncio.timeout(self.open_timeout):
                while True:
                    frame = _decode(await ws.recv())
                    if frame.get("id") == HELLO_ID and "ok" in frame:
                        break
                    if "ok" in frame and frame.get("id") is None:  # hello itself was unreadable
                        break
                    early.append(frame)
            if not frame.get("ok"):
                raise error_from(frame.get("error"))
            return ws, frame, early
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await ws.close()
            if isinstance(exc, websockets.ConnectionClosed | TimeoutError | msgspec.DecodeError):
                raise Disconnected(f"hello failed: {exc}") from exc
            raise

    def _attach(self, ws: ClientConnection, hello: Frame, early: list[Frame]) -> None:
        self.ws = ws
        self.close_code = None
        self.listener.connection_up(hello)
        self._reader = asyncio.create_task(self._read(ws, early), name="tablelock-reader")

    def _detach(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            self.close_code = ws.close_code
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Disconnected("the connection to the broker dropped"))
        self.listener.connection_down()

    async def _read(self, ws: ClientConnection, early: list[Frame]) -> None:
        for frame in early:
            self._dispatch(frame)
        try:
            async for raw in ws:
                try:
                    frame = _decode(raw)
                except msgspec.DecodeError:
                    log.warning("undecodable frame from the broker: %.200r", raw)
                    continue
                if isinstance(frame, dict):
                    self._dispatch(frame)
        except websockets.ConnectionClosed:
            pass

    def _dispatch(self, frame: Frame) -> None:
        if "ok" in frame and "id" in frame and frame.get("type") is None:
            future = self._pending.pop(frame["id"], None) if frame["id"] is not None else None
            if future is not None and not future.done():
                future.set_result(frame)
            elif not frame.get("ok"):
                log.warning("unmatched error reply: %s", frame.get("error"))
            return
        try:
            self.listener.connection_frame(frame)
        except Exception:  # a listener bug must not stop the reader
            log.exception("handling %s failed", frame.get("type"))

    async def _supervise(self) -> None:
        while True:
            assert self._reader is not None
            await asyncio.wait([self._reader])
            self._detach()
            if self._closing or not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        attempt = 0
        while not self._closing:
            ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 30))
            if self.close_code == CLOSE["POLICY"]:
                ceiling = self.backoff_max  # told to slow down: start from the top
            attempt += 1
            await asyncio.sleep(random.uniform(0, ceiling))
            try:
                ws, hello, early = await self._handshake()
            except (AuthFailed, UnsupportedProtocol) as exc:
                # Retrying cannot help: stop, and let the application know.
                self.listener.connection_failed(exc)
                return False
            except Exception as exc:  # whatever it was (a token callback, say), try again
                log.debug("reconnect attempt %d failed: %s", attempt, exc)
                continue
            self._attach(ws, hello, early)
            return True
        return False

    # --- requests ---------------------------------------------------------------------

    async def request(self, type_: str, params: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Frame:
        """Send a request and return its reply; raise the typed error of a refusal."""
        ws = self.ws
        if ws is None:
            raise Disconnected("not connected to the broker")
        request_id = next(self._ids)
        frame = {"id": request_id, "type": type_}
        if params:
            frame.update((k, v) for k, v in params.items() if v is not None)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await ws.send(_encode(frame).decode())
            async with asyncio.timeout(timeout or self.request_timeout):
                reply = await future
        except websockets.ConnectionClosed as exc:
            raise Disconnected("the connection to the broker dropped") from exc
        except TimeoutError:
            raise Unavailable(f"no reply to {type_} within "
                              f"{timeout or self.request_timeout:g} s") from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.get("ok"):
            raise error_from(reply.get("error"))
        return reply

    async def send(self, frame: Frame) -> None:
        """Send a frame that gets no reply (an rpc.result)."""
        ws = self.ws
        if ws is None:
            raise Disconnected("not connected to the broker")
        try:
            await ws.send(_encode(frame).decode())
        except websockets.ConnectionClosed as exc:
            raise Disconnected("the connection to the broker dropped") from exc


def routed_url(url: str, token: str) -> str:
    """`url` with the token's store as `store=` (unless it names one already), so that a load
    balancer can keep a store's terminals on one broker (docs/deploy); the broker ignores it."""
    store = _store_of(token)
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    if store is None or any(name == "store" for name, _ in query):
        return url
    query.append(("store", store))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path,
                                    urllib.parse.urlencode(query), parts.fragment))


def _store_of(token: str) -> str | None:
    """The `store` claim of a JWT, read without verifying it (the broker verifies)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return None
    store = claims.get("store") if isinstance(claims, dict) else None
    return store if isinstance(store, str) else None
