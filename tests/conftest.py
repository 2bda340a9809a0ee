"""Shared fixtures: one real broker process per test worker, and a store per test."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .redis_support import RedisServer
from .support import BrokerProcess, WsClient, ahttp, mint, order, unique


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server of the tests' own, on a free port (never the machine's 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill, pause or restart it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # a test may leave it paused
    server.stop()


@pytest.fixture(scope="session", params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Every protocol test runs against both backends, so that they stay equal."""
    if request.param == "memory":
        return "memory"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture(scope="session")
def broker(backend_url: str) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(backend=backend_url).start()
    yield proc
    proc.stop()


@dataclass
class Store:
    """One store on a broker, fresh for each test, with helpers to open its terminals."""

    broker: BrokerProcess
    store_id: str = field(default_factory=unique)
    clients: list[WsClient] = field(default_factory=list)

    def token(self, role: str, sub: str | None = None, table: str | None = None,
              **kw: Any) -> str:
        return mint(self.store_id, role, sub or unique(role), table, **kw)

    async def connect(self, role: str, sub: str | None = None, table: str | None = None,
                      **hello: Any) -> WsClient:
        client = await WsClient.connect(self.broker.url, self.token(role, sub, table), **hello)
        self.clients.append(client)
        return client

    async def erp(self, sub: str | None = None, role: str = "erp_main",
                  answer_fetch: bool = True, **hello: Any) -> WsClient:
        """An ERP terminal that answers order.fetch from the orders it published."""
        client = await self.connect(role, sub, **hello)
        client.orders = {}  # type: ignore[attr-defined]
        if answer_fetch:
            async def answer(frame: dict[str, Any]) -> dict[str, Any]:
                params = frame["params"]
                known = client.orders  # type: ignore[attr-defined]
                found = known.get(params.get("order_id")) or next(
                    (o for o in known.values() if o["table_id"] == params.get("table_id")), None)
                if found is None:
                    return {"ok": False, "error": {"code": "NOT_FOUND", "message": "no order"}}
                return {"ok": True, "result": {"order": found}}
            client.rpc_handler = answer
        return client

    async def publish(self, client: WsClient, change: str = "modify", **order_fields: Any,
                      ) -> dict[str, Any]:
        extra = {k: order_fields.pop(k) for k in ("token", "force", "operator", "reason")
                 if k in order_fields}
        body = order(**order_fields)
        reply = await client.request("order.publish", order=body, change=change, **extra)
        if reply.get("ok") and hasattr(client, "orders"):
            client.orders[body["order_id"]] = body  # type: ignore[attr-defined]
        return reply

    async def config(self, **patch: Any) -> dict[str, Any]:
        status, body = await ahttp("PUT", f"{self.broker.http}/v1/stores/{self.store_id}/config",
                                   self.token("manager"), patch)
        assert status == 200, body
        return body

    def channel(self, order_id: str | None = None) -> str:
        """`store:<store>` or `order:<store>:<order>`."""
        if order_id is None:
            return f"store:{self.store_id}"
        return f"order:{self.store_id}:{order_id}"

    async def http(self, method: str, path: str, role: str | None = "manager",
                   body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """An HTTP call under /v1/stores/<store>; a fresh token of `role` unless one is given."""
        if token is None and role is not None:
            token = self.token(role)
        return await ahttp(method, f"{self.broker.http}/v1/stores/{self.store_id}{path}",
                           token, body)

    async def service_pay(self, order_id: str, **body: Any) -> dict[str, Any]:
        """The platform's payment service records a phone's payment (a phone never does):
        `POST .../payment` with a `service` token, answered like a WebSocket reply (`ok`, then
        `order` or `error`) plus the HTTP `status`."""
        status, answer = await self.http("POST", f"/orders/{order_id}/payment", role="service",
                                         body=body)
        return {"ok": status == 200, "status": status, **answer}

    async def audit(self, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The store's audit log, newest first, read with a manager token."""
        query = f"?limit={limit}" + (f"&kind={kind}" if kind else "")
        status, body = await self.http("GET", f"/audit{query}")
        assert status == 200, body
        return body["entries"]

    async def disconnect(self, client: WsClient) -> None:
        """Close the last connection of `client`'s terminal and wait until the broker has seen
        it go (its `terminal.offline` on the store channel), so that what follows is ordered."""
        watcher = await self.connect("manager", unique("watch"))
        await watcher.request("subscribe", channel=self.channel())
        terminal_id = client.hello["terminal"]["terminal_id"]
        await client.close()
        await watcher.event("terminal.offline",
                            where=lambda e: e["terminal"]["terminal_id"] == terminal_id)
        await watcher.close()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


@pytest.fixture
async def store(broker: BrokerProcess) -> AsyncIterator[Store]:
    created = Store(broker)
    yield created
    await created.close()


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """Dedicated brokers for tests that stop or restart them."""
    started: list[BrokerProcess] = []

    def make(**kw: Any) -> BrokerProcess:
        proc = BrokerProcess(**kw)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
