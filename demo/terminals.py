"""The simulated store's parts: the menu, the ERP's order book and the terminals.

Every terminal is a real client of the broker, through the Python SDK
(`tablelock_client`); the order book is the ERP main's database, from which
every ERP terminal publishes and the main answers the broker's `order.fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tablelock.auth import Tokens
from tablelock_client import (
    Client,
    Disconnected,
    LockHandle,
    Order,
    StaleVersion,
    TablelockError,
    Unavailable,
    connect,
)
from tablelock_client.connection import Frame

from . import STATIC

log = logging.getLogger("tablelock.demo")

TOKEN_TTL_S = 24 * 3600  # minted again at every (re)connect, so a long demo never runs out
LOCALE = "en"  # the prompts the simulated screens log


# --- small things ----------------------------------------------------------------------

def money(cents: int) -> str:
    return f"¥{cents / 100:.2f}"


def said(exc: TablelockError) -> str:
    """A refusal as a screen shows it: the code and the prompt."""
    if exc.message and exc.message != exc.code:
        return f"{exc.code} “{exc.message}”"
    return exc.code


def token_of(handle: LockHandle) -> str:
    """A lock's fencing token for the log (none when strong link is off)."""
    return str(handle.token) if handle.lock is not None else "none: strong link is off"


class Stats:
    """Counters of what happened, for tests and curious callers (`simulate(stats=...)`)."""

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.counters = counters if counters is not None else {}

    def bump(self, key: str, by: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + by

    def refused(self, exc: TablelockError | str) -> None:
        self.bump(f"code.{exc if isinstance(exc, str) else exc.code}")


class Pace:
    """Every wait of the simulation, in store seconds, divided by `speed`."""

    def __init__(self, speed: float) -> None:
        self.speed = speed if speed > 0 else 1.0

    def real(self, seconds: float) -> float:
        return max(0.0, seconds) / self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(self.real(seconds))


# --- the menu --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Dish:
    sku: str
    zh: str
    en: str
    price_cents: int
    kind: str = "dish"  # dish, drink or dessert


# One menu for the simulation and the pages (static/menu.json), so that prices agree.
MENU: tuple[Dish, ...] = tuple(Dish(**dish) for dish in
                               json.loads((STATIC / "menu.json").read_text(encoding="utf-8")))
DISHES = tuple(d for d in MENU if d.kind == "dish")
DRINKS = tuple(d for d in MENU if d.kind == "drink")
DESSERTS = tuple(d for d in MENU if d.kind == "dessert")
BY_SKU = {d.sku: d for d in MENU}
# The force reasons the simulated staff give (static/reasons.json: the dashboard shows them in
# its reader's language).
REASONS: dict[str, str] = {
    key: text["en"]
    for key, text in json.loads((STATIC / "reasons.json").read_text(encoding="utf-8")).items()}
RICE = BY_SKU["rice"]


def add_dishes(order: dict[str, Any], dishes: list[Dish]) -> None:
    items: list[dict[str, Any]] = order.setdefault("items", [])
    for dish in dishes:
        for item in items:
            if item["sku"] == dish.sku:
                item["qty"] += 1
                break
        else:
            items.append({"sku": dish.sku, "name": dish.zh, "qty": 1,
                          "price_cents": dish.price_cents})


def names(dishes: list[Dish]) -> str:
    return ", ".join(d.en for d in dishes)


def total(items: list[dict[str, Any]]) -> int:
    return sum(int(item["qty"]) * int(item["price_cents"]) for item in items)


# --- the ERP's order book -----------------------------------------------------------------

class Book:
    """The ERP main's order database: the truth about every order.

    An ERP terminal changes an order by publishing it; the book keeps the change
    only once the broker took it, so the book and the broker never disagree. Each
    attempt gets a new version, but a refused one (the broker kept nothing) gives
    it back; versions only grow. Publishes of one order are serialized here, as
    the ERP's database would serialize them.
    """

    def __init__(self) -> None:
        self._orders: dict[str, dict[str, Any]] = {}
        self._open: dict[str, str] = {}  # table -> its open order
        self._versions: dict[str, int] = {}  # order -> the last version handed out
        self._locks: dict[str, asyncio.Lock] = {}

    def order(self, order_id: str) -> dict[str, Any] | None:
        found = self._orders.get(order_id)
        return copy.deepcopy(found) if found is not None else None

    async def fetch(self, params: dict[str, str]) -> dict[str, Any] | None:
        """The ERP main's answer to the broker's `order.fetch`."""
        order_id = params.get("order_id") or self._open.get(params.get("table_id") or "")
        return self.order(order_id) if order_id else None

    async def publish(self, erp: SimulatedTerminal, order_id: str, change: str,
                      edit: Callable[[dict[str, Any]], None], *, table_id: str | None = None,
                      token: int | None = None, force: bool = False,
                      operator: str | None = None, reason: str | None = None) -> Order:
        """Apply `edit` to a copy of the order, publish it from `erp`, keep it if taken."""
        async with self._locks.setdefault(order_id, asyncio.Lock()):
            client = erp.c  # offline: nothing is sent, no version is used up
            current = self._orders.get(order_id)
            if current is None:
                draft: dict[str, Any] = {"order_id": order_id, "table_id": table_id,
                                         "version": 0, "amount_cents": 0, "items": [],
                                         "status": "open"}
            else:
                draft = copy.deepcopy(current)
            edit(draft)
            draft["amount_cents"] = total(draft["items"])
            version = self._versions.get(order_id, 0) + 1
            self._versions[order_id] = version
            draft["version"] = version
            try:
                published = await client.publish_order(draft, change, token, force,
                                                       operator=operator, reason=reason)
            except (Unavailable, StaleVersion):
                raise  # it may have been taken, or the broker is ahead: this version is used
            except TablelockError:
                self._versions[order_id] = version - 1  # refused: the broker kept nothing
                raise
            self._orders[order_id] = draft
            self._track(draft)
            return published

    def open_orders(self) -> list[str]:
        return list(self._open.values())

    def mark_paid(self, order_id: str) -> None:
        """The payment went through the broker (the ERP learns it from `order.paid`)."""
        found = self._orders.get(order_id)
        if found is not None:
            found["status"] = "paid"
            self._track(found)

    def forget(self, order_id: str) -> None:
        order = self._orders.pop(order_id, None)
        self._versions.pop(order_id, None)
        self._locks.pop(order_id, None)
        if order is not None and self._open.get(order["table_id"]) == order_id:
            del self._open[order["table_id"]]

    def _track(self, order: dict[str, Any]) -> None:
        table = order["table_id"]
        if order["status"] == "open":
            self._open[table] = order["order_id"]
        elif self._open.get(table) == order["order_id"]:
            del self._open[table]


# --- terminals ------------------------------------------------------------------------------

class SimulatedTerminal:
    """One simulated screen: its identity, and a broker client it (re)connects at will."""

    def __init__(self, url: str, tokens: Tokens, store_id: str, stats: Stats, *, sub: str,
                 role: str, name: str, table: str | None = None,
                 order_fetch: Callable[[dict[str, str]], Any] | None = None) -> None:
        self.url = url
        self.tokens = tokens
        self.store_id = store_id
        self.stats = stats
        self.sub = sub
        self.role = role
        self.name = name
        self.table = table
        self.order_fetch = order_fetch
        self.client: Client | None = None
        self.channels: list[str] = []  # of the current client

    @property
    def online(self) -> bool:
        return self.client is not None and not self.client.closed

    @property
    def c(self) -> Client:
        """The client, or Disconnected while this terminal is offline."""
        client = self.client
        if client is None or client.closed:
            raise Disconnected(f"{self.name} is offline")
        return client

    def _token(self) -> str:
        return self.tokens.mint(store=self.store_id, role=self.role, sub=self.sub,
                                table=self.table, name=self.name, ttl_s=TOKEN_TTL_S)

    async def connect(self, *, store_channel: bool = False) -> None:
        """Connect (raises the SDK's errors); ERP screens follow the store channel."""
        client = await connect(self.url, self._token, locale=LOCALE,
                               order_fetch=self.order_fetch, client_name="tablelock-demo")
        try:
            client.on_event(self._on_event)
            if store_channel:
                await client.subscribe_store()
        except BaseException:
            await client.close()
            raise
        self.client = client
        self.channels = [client.store_channel] if store_channel else []

    async def follow(self, channel: str) -> None:
        """Subscribe to a channel, as the screen would (for its lock events, mostly)."""
        await self.c.subscribe(channel)
        self.channels.append(channel)

    async def connect_retrying(self, pace: Pace, *, store_channel: bool = False) -> None:
        """Connect, retrying with backoff until it works (or the task is cancelled)."""
        delay = 0.5
        while True:
            try:
                await self.connect(store_channel=store_channel)
                return
            except TablelockError as exc:
                log.warning("%s cannot connect (%s); retrying in %.1f s", self.name, said(exc),
                            delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        """Close the client (the SDK releases what it holds first). Never raises.

        Channels are left first: a broker that fans an event out to a connection
        that is closing may fail the publish for the other subscribers too.
        """
        client, self.client = self.client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                for channel in self.channels:
                    await client.unsubscribe(channel)
                await client.close()

    def _on_event(self, frame: Frame) -> None:
        """What this screen tells its user about its own locks."""
        name = frame.get("event")
        if name not in ("lock.contended", "lock.forced", "lock.expired"):
            return
        lock = frame.get("lock") or {}
        if (lock.get("holder") or {}).get("terminal_id") != self.sub:
            return
        self.stats.bump(f"event.{name}")
        by = (frame.get("by") or {}).get("name") or "someone"
        order_id, kind = lock.get("order_id"), lock.get("kind")
        if name == "lock.contended":
            log.info("%s: toast: %s was refused (%s %s) because of my %s lock (lock.contended)",
                     self.name, by, frame.get("action"), order_id, kind)
        elif name == "lock.forced":
            log.info("%s: my %s lock on %s was taken over by %s (lock.forced)", self.name, kind,
                     order_id, by)
        else:
            log.info("%s: my %s lock on %s lapsed (lock.expired)", self.name, kind, order_id)


# --- the store's config, over HTTP ------------------------------------------------------------

def http_base(ws_url: str) -> str:
    base = ws_url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
    return base.removesuffix("/").removesuffix("/ws")


async def put_config(ws_url: str, tokens: Tokens, store_id: str,
                     patch: dict[str, Any]) -> dict[str, Any]:
    """PUT /v1/stores/{store}/config with a manager token (the SDK has no call for it)."""
    token = tokens.mint(store=store_id, role="manager", sub="demo-setup",
                        name="Simulation setup", ttl_s=300)
    url = f"{http_base(ws_url)}/v1/stores/{store_id}/config"

    def put() -> dict[str, Any]:
        request = urllib.request.Request(url, data=json.dumps(patch).encode(), method="PUT",
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    return await asyncio.to_thread(put)


CONFIG_ERRORS = (OSError, urllib.error.URLError, ValueError, TimeoutError)


async def wait_listening(ws_url: str) -> None:
    """Wait until the broker answers /healthz: a demo's simulation starts with the broker's
    lifespan, a moment before it listens."""
    url = f"{http_base(ws_url)}/healthz"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    loop = asyncio.get_running_loop()
    started = loop.time()
    told = False
    while not await asyncio.to_thread(healthy):
        if not told and loop.time() - started > 5:
            log.info("waiting for the broker at %s", url)
            told = True
        await asyncio.sleep(0.2)
