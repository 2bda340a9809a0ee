"""Real parts for integration tests: a broker process on a free port, a raw WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import websockets

from tablelock.auth import Tokens

SECRET = "integration-test-secret-0123456789abcdef"
TOKENS = Tokens([SECRET])
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique(prefix: str = "s") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def mint(store: str, role: str, sub: str, table: str | None = None, ttl_s: int = 3600,
         name: str | None = None) -> str:
    return TOKENS.mint(store=store, role=role, sub=sub, table=table, ttl_s=ttl_s, name=name)


class BrokerProcess:
    """`tablelock serve` (or another subcommand) in a child process, as an operator runs it."""

    command: tuple[str, ...] = ("serve",)

    def __init__(self, backend: str = "memory", port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.backend = backend
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> Self:
        return self.spawn().wait(timeout)

    def spawn(self) -> Self:
        """Start the process without waiting for it to serve (see wait)."""
        # No drain window unless a test asks for one: stopping a test broker stays quick.
        # Warnings only in the log, unless a test reads the log.
        env = {**os.environ, "TABLELOCK_SECRET": SECRET, "TABLELOCK_DRAIN_WINDOW_S": "0",
               "TABLELOCK_LOG_LEVEL": "WARNING", **self.env}
        cmd = [sys.executable, "-m", "tablelock", *self.command, "--port", str(self.port),
               "--backend", self.backend]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=None)
        return self

    def wait(self, timeout: float = 15.0) -> Self:
        """Until /healthz answers."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.http}/healthz", timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("broker did not come up")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def http_json(method: str, url: str, token: str | None = None, body: Any = None,
              ) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode()


async def ahttp(method: str, url: str, token: str | None = None, body: Any = None,
                ) -> tuple[int, Any]:
    return await asyncio.to_thread(http_json, method, url, token, body)


class WsClient:
    """A protocol-level client: every frame is visible, nothing is hidden by an SDK."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._replies: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: list[dict[str, Any]] = []  # every frame, in arrival order
        self.rpc_handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]] | None = None
        self.hello: dict[str, Any] = {}
        self.close_code: int | None = None
        self._rpc_tasks: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, token: str | None = None, *, locale: str | None = "en",
                      hello: bool = True, **hello_extra: Any) -> WsClient:
        ws = await websockets.connect(url, subprotocols=["tablelock.v1"],  # type: ignore[list-item]
                                      compression=None, max_size=2**22)
        client = cls(ws)
        if hello:
            params: dict[str, Any] = {"token": token, "protocol": 1, **hello_extra}
            if locale:
                params["locale"] = locale
            reply = await client.request("hello", **params)
            if not reply["ok"]:
                raise RuntimeError(f"hello refused: {reply}")
            client.hello = reply
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                if frame.get("type") == "event":
                    self.events.put_nowait(frame)
                elif frame.get("type") == "rpc":
                    task = asyncio.create_task(self._answer_rpc(frame))
                    self._rpc_tasks.add(task)
                    task.add_done_callback(self._rpc_tasks.discard)
                else:
                    future = self._replies.pop(frame.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(ConnectionError("closed"))

    async def _answer_rpc(self, frame: dict[str, Any]) -> None:
        if self.rpc_handler is None:
            return  # a silent ERP
        result = await self.rpc_handler(frame)
        if result is None:
            return
        await self.ws.send(json.dumps({"type": "rpc.result", "rid": frame["rid"], **result}))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def request(self, type_: str, timeout: float = 5.0, **params: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        await self.ws.send(json.dumps({"id": request_id, "type": type_, **params}))
        return await asyncio.wait_for(future, timeout)

    async def raw_request(self, data: str | bytes, reply_id: Any = None,
                          timeout: float = 5.0) -> dict[str, Any]:
        """Send a frame as is and await the reply carrying `reply_id` (None: an id-less one)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[reply_id] = future
        await self.ws.send(data)
        return await asyncio.wait_for(future, timeout)

    async def next_reply(self, request_id: Any, timeout: float = 5.0) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        return await asyncio.wait_for(future, timeout)

    async def event(self, name: str | None = None, timeout: float = 5.0,
                    where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The next event (skipping others) with this name that satisfies `where`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no {name} event within {timeout}s")
            frame = await asyncio.wait_for(self.events.get(), remaining)
            if (name is None or frame["event"] == name) and (where is None or where(frame)):
                return frame

    async def no_event(self, name: str | None, within: float = 0.3,
                       where: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Prove that no such event (any event for `name=None`) arrives within `within` s."""
        with contextlib.suppress(TimeoutError):
            frame = await self.event(name, timeout=within, where=where)
            raise AssertionError(f"unexpected {name or 'event'}: {frame}")

    async def collect(self, count: int, name: str | None = None, timeout: float = 5.0,
                      where: Callable[[dict[str, Any]], bool] | None = None,
                      ) -> list[dict[str, Any]]:
        """The next `count` events with this name (others are skipped), in arrival order."""
        deadline = asyncio.get_running_loop().time() + timeout
        found = []
        while len(found) < count:
            remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
            found.append(await self.event(name, timeout=remaining, where=where))
        return found

    async def clock_offset(self, samples: int = 5) -> tuple[float, float]:
        """(broker clock - local clock, round trip), in ms, from the tightest of a few pings."""
        best: tuple[float, float] | None = None
        for _ in range(samples):
            sent = time.time() * 1000
            reply = await self.request("ping")
            back = time.time() * 1000
            rtt = back - sent
            offset = reply["server_time"] - (sent + back) / 2
            if best is None or rtt < best[1]:
                best = (offset, rtt)
        assert best is not None
        return best

    def drain_events(self) -> list[dict[str, Any]]:
        drained = []
        while not self.events.empty():
            drained.append(self.events.get_nowait())
        return drained

    async def closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)


def order(order_id: str, table_id: str = "t1", version: int = 1, amount_cents: int = 1000,
          status: str = "open", items: list[Any] | None = None) -> dict[str, Any]:
    return {"order_id": order_id, "table_id": table_id, "version": version,
            "amount_cents": amount_cents, "status": status,
            "items": items if items is not None else [{"sku": "rice", "qty": 1}]}


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
