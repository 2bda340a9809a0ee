"""The browser SDK (client_sdk/js/tablelock.js) in real headless Chromium, against a real broker.

A small static HTTP server serves the module under /sdk/ and tests/js_pages/ at /; the page
imports the module and the tests drive it with `page.evaluate`. The "other terminal" is the
raw Python `WsClient`, so every effect the SDK has is checked on the wire.

The page's origin is not the broker's, so the module's brokers allow it
(`TABLELOCK_ALLOWED_ORIGINS`), as a deployment would. One Chromium serves the whole module (a
launch costs seconds); each test gets a fresh browser context. The SDK does not depend on the
backend, so these tests use the in-memory one only.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import posixpath
import re
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from tablelock.prompts import ERROR_CODES, prompt

from .conftest import Store
from .support import ROOT, BrokerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SDK_DIR = ROOT / "client_sdk" / "js"
PAGES_DIR = ROOT / "tests" / "js_pages"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
    pytest.mark.asyncio(loop_scope="module"),
]


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    """/sdk/* from client_sdk/js, everything else from tests/js_pages."""

    def translate_path(self, path: str) -> str:
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        root, rest = (SDK_DIR, path[len("/sdk/"):]) if path.startswith("/sdk/") else (
            PAGES_DIR, path.lstrip("/"))
        return str(root / rest)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StaticHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def broker_env(site: str) -> dict[str, str]:
    """A broker that lets the test page in, and restarts without the 5 s drain window."""
    return {"TABLELOCK_ALLOWED_ORIGINS": site, "TABLELOCK_DRAIN_WINDOW_S": "0"}


@pytest.fixture(scope="module")
def js_broker(site: str) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(env=broker_env(site)).start()
    yield proc
    proc.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def store(js_broker: BrokerProcess) -> AsyncIterator[Store]:
    """A fresh store on the module's broker (shadows conftest's, which spans both backends)."""
    created = Store(js_broker)
    yield created
    await created.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, site: str) -> AsyncIterator[Page]:
    context = await browser.new_context()
    try:
        tab = await context.new_page()
        uncaught: list[str] = []
        tab.on("pageerror", lambda exc: uncaught.append(str(exc)))
        await tab.goto(f"{site}/index.html")
        await tab.wait_for_function("window.sdkLoaded === true", timeout=5000)
        yield tab
        # Nothing the SDK did may have escaped as an uncaught error or unhandled rejection.
        assert not uncaught, uncaught
    finally:
        await context.close()


async def until(page: Page, condition: str, arg: Any = None, timeout: float = 5.0) -> None:
    """Wait until the JS arrow function `condition(arg)` is truthy in the page."""
    await page.wait_for_function(condition, arg=arg, timeout=timeout * 1000, polling=20)


async def connect_js(page: Page, name: str, url: str, token: str, **options: Any) -> None:
    """`window[name] = await tablelock.connect({url, token, locale: "en", ...options})`."""
    await page.evaluate(
        """async ({name, options}) => {
            window[name] = await tablelock.connect({locale: "en", ...options});
        }""", {"name": name, "options": {"url": url, "token": token, **options}})


# --- tests ----------------------------------------------------------------------------


async def test_connect_and_mirror_snapshots(store: Store, page: Page) -> None:
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1", amount_cents=4200)
    await store.publish(cashier, order_id="o2", table_id="t2")
    held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    await connect_js(page, "c", store.broker.url,
                     store.token("erp_secondary", "screen-2", name="Screen 2"))

    got = await page.evaluate(
        """async (storeId) => {
            const m = window.m = await c.subscribe(`store:${storeId}`);
            const om = await c.subscribeOrder("o1");
            return {
                terminal: c.terminal, connected: c.connected, stale: c.stale,
                offset: c.serverOffsetMs, drift: c.serverNow() - Date.now(), role: c.role,
                storeId: c.storeId, config: c.config,
                sameMirror: (await c.subscribe(m.channel)) === m,
                orders: [...m.orders.keys()].sort(), locks: Object.fromEntries(m.locks),
                terminals: [...m.terminals.keys()].sort(), seq: m.seq, stale_m: m.stale,
                order: om.order, lockOf: om.lockOf("payment"), omLocks: [...om.locks.keys()],
            };
        }""", store.store_id)
    assert got["terminal"]["terminal_id"] == "screen-2" and got["terminal"]["name"] == "Screen 2"
    assert got["connected"] and not got["stale"] and not got["stale_m"]
    assert got["role"] == "erp_secondary" and got["storeId"] == store.store_id
    assert got["config"]["erp_lock_ttl_ms"] == 600_000
    assert abs(got["offset"]) < 2000 and abs(got["drift"]) < 2000  # same host: clocks agree
    assert got["sameMirror"]
    assert got["orders"] == ["o1", "o2"]
    assert list(got["locks"]) == ["o1/payment"]
    assert got["locks"]["o1/payment"]["token"] == held["lock"]["token"]
    assert got["terminals"] == ["cashier-1", "screen-2"]
    assert got["seq"] >= 4
    assert got["order"]["amount_cents"] == 4200
    assert got["lockOf"]["token"] == held["lock"]["token"]
    assert got["omLocks"] == ["o1/payment"]

    # token.refresh: a new token for the same terminal moves the connection's end.
    fresh = store.token("erp_secondary", "screen-2", name="Screen 2", ttl_s=7200)
    refreshed = await page.evaluate("async (t) => c.refreshToken(t)", fresh)
    assert abs(refreshed["expires_at"] - (time.time() + 7200) * 1000) < 5000

    # A token the broker refuses is an AuthFailedError, for good (no reconnect loop).
    refused = await page.evaluate(
        """async (url) => {
            try { await tablelock.connect({url, token: "not-a-jwt", locale: "en"}); }
            catch (e) {
                return {name: e.name, code: e.code, message: e.message,
                        typed: e instanceof tablelock.AuthFailedError};
            }
        }""", store.broker.url)
    assert refused["name"] == "AuthFailedError" and refused["typed"]
    assert refused["code"] == "AUTH_FAILED"
    assert refused["message"].startswith(prompt("AUTH_FAILED", "en"))


async def test_acquire_release_and_events_from_another_terminal(store: Store, page: Page) -> None:
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1")
    await store.publish(cashier, order_id="o2")
    watcher = await store.connect("erp_secondary", "watcher")
    await watcher.request("subscribe", channel=f"order:{store.store_id}:o1")
    await connect_js(page, "c", store.broker.url, store.token("erp_secondary", "screen-2"))
    await page.evaluate(
        """async (storeId) => {
            window.m = await c.subscribe(`store:${storeId}`);
            track(m, "m", ["change"]);
        }""", store.store_id)

    # An event made by another terminal reaches the mirror, with the raw event.
    other = await cashier.request("lock.acquire", order_id="o2", kind="payment")
    await until(page, "() => m.locks.has('o2/payment')")
    change = await page.evaluate("() => seen.m.at(-1).detail.event")
    assert change["event"] == "lock.acquired" and change["lock"]["token"] == other["lock"]["token"]

    # Acquire: the handle carries the lock, and the other screen sees the same token.
    handle = await page.evaluate(
        """async () => {
            const h = window.h = await c.acquire("o1", "order");
            return {token: h.token, expiresAt: h.expiresAt, acquiredAt: h.acquiredAt,
                    held: h.held, kind: h.kind, msLeft: h.msLeft(),
                    again: (await c.acquire("o1", "order")) === h, watched: c.mirrors.size};
        }""")
    seen = await watcher.event("lock.acquired")
    assert seen["lock"]["token"] == handle["token"]
    assert seen["lock"]["holder"]["terminal_id"] == "screen-2"
    assert handle["held"] and handle["kind"] == "order" and handle["again"]
    assert handle["expiresAt"] - handle["acquiredAt"] == 600_000
    # The server's clock is estimated from a round trip's midpoint: off by up to half of one.
    assert 590_000 < handle["msLeft"] <= 600_000 + 50
    assert handle["watched"] == 2  # the store mirror, and the order's channel while it is held

    # Release: the broker tells everyone; the handle ended, and was not "lost".
    end = await page.evaluate(
        """async () => {
            await h.release();
            const end = await h.ended;
            return {reason: end.reason, lost: end.lost, held: h.held,
                    inMirror: m.locks.has("o1/order"), mirrors: [...c.mirrors.keys()]};
        }""")
    released = await watcher.event("lock.released")
    assert released["reason"] == "released" and released["lock"]["token"] == handle["token"]
    assert end == {"reason": "released", "lost": False, "held": False, "inMirror": False,
                   "mirrors": [f"store:{store.store_id}"]}

    await cashier.request("lock.release", order_id="o2", kind="payment",
                          token=other["lock"]["token"])
    await until(page, "() => m.locks.size === 0")


async def test_payment_locked_is_a_typed_error_and_a_forced_lock_is_lost(
        store: Store, page: Page) -> None:
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1")
    held = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    await connect_js(page, "c", store.broker.url, store.token("erp_secondary", "screen-2"))

    got = await page.evaluate(
        """async () => {
            const check = await c.check("o1", "pay");
            let error;
            try { await c.acquire("o1", "payment"); } catch (e) { error = e; }
            return {
                check: {allowed: check.allowed, code: check.code, canForce: check.canForce,
                        message: check.message, token: check.lock.token,
                        isError: check.error instanceof tablelock.PaymentLockedError},
                name: error.name, code: error.code, message: error.message,
                canForce: error.canForce, token: error.lock.token,
                holder: error.holder.terminal_id, request: error.request,
                typed: error instanceof tablelock.PaymentLockedError,
                base: error instanceof tablelock.TablelockError && error instanceof Error,
                constant: error.code === tablelock.ErrorCode.PAYMENT_LOCKED,
                frontDesk: error.payAtFrontDesk, unavailable: error.unavailable,
                classes: Object.keys(tablelock.ERROR_CLASSES),
            };
        }""")
    text = prompt("PAYMENT_LOCKED", "en")
    assert got["check"] == {"allowed": False, "code": "PAYMENT_LOCKED", "canForce": True,
                            "message": text, "token": held["lock"]["token"], "isError": True}
    assert got["name"] == "PaymentLockedError" and got["code"] == "PAYMENT_LOCKED"
    assert got["message"] == text and got["canForce"] is True
    assert got["token"] == held["lock"]["token"] and got["holder"] == "cashier-1"
    assert got["request"] == "lock.acquire"
    assert got["typed"] and got["base"] and got["constant"]
    assert not got["frontDesk"] and not got["unavailable"]
    assert set(ERROR_CODES) <= set(got["classes"])  # one class per code of section 7
    contended = await cashier.event("lock.contended")  # the holder is told, directly
    assert contended["direct"] and contended["by"]["terminal_id"] == "screen-2"

    # Force past the cashier (the ERP's "continue?"), then lose the lock to a force back.
    forced = await page.evaluate(
        """async () => {
            const h = window.h = await c.acquire("o1", "payment",
                {force: true, operator: "alice", reason: "customer at the counter"});
            return {token: h.token, forced: h.forced.map((l) => l.token)};
        }""")
    assert forced["forced"] == [held["lock"]["token"]]
    revoked = await cashier.event("lock.forced")
    assert revoked["lock"]["token"] == held["lock"]["token"]
    assert forced["token"] > held["lock"]["token"]  # fencing tokens only grow

    await cashier.request("lock.acquire", order_id="o1", kind="payment", force=True)
    lost = await page.evaluate(
        """async () => {
            const end = await h.lost;
            return {reason: end.reason, lost: end.lost, by: end.event.by.terminal_id,
                    held: h.held, handles: c.handles.size};
        }""")
    assert lost == {"reason": "forced", "lost": True, "by": "cashier-1", "held": False,
                    "handles": 0}


async def test_h5_pay_helper_with_an_erp_page_answering_order_fetch(
        store: Store, page: Page) -> None:
    screen = await store.connect("erp_secondary", "screen-2")
    await screen.request("subscribe", channel=f"order:{store.store_id}:o1")
    await screen.request("subscribe", channel=f"order:{store.store_id}:o2")
    await connect_js(page, "erp", store.broker.url, store.token("erp_main", "cashier-js"))
    await connect_js(page, "h5", store.broker.url, store.token("h5", "phone-1", table="t1"))

    # The ERP page publishes v1, then has v2 in its own books: the broker must pull v2.
    await page.evaluate(
        """async () => {
            window.books = {};
            erp.onOrderFetch((params) => {
                note("fetch", params);
                const {order_id, table_id} = params;
                return books[order_id] ?? Object.values(books).find(
                    (o) => o.table_id === table_id && o.status === "open");
            });
            const o1 = {order_id: "o1", table_id: "t1", version: 1, amount_cents: 4200,
                        items: [{sku: "rice", qty: 1}], status: "open"};
            await erp.publishOrder(o1, "modify");
            books.o1 = {...o1, version: 2, amount_cents: 5000,
                        items: [...o1.items, {sku: "tea", qty: 1}]};
        }""")
    await screen.event("order.updated")

    got = await page.evaluate(
        """async () => {
            const pay = window.pay = await h5.pay();   // the table's order, fresh from the ERP
            const ticks = [];
            await new Promise((resolve) => {
                const stop = pay.countdown((ms) => {
                    ticks.push(ms);
                    if (ticks.length === 3) { stop(); resolve(); }
                }, {intervalMs: 50});
            });
            return {orderId: pay.orderId, version: pay.version, amount: pay.amountCents,
                    token: pay.token, expiresAt: pay.expiresAt, msLeft: pay.msLeft(),
                    serverLeft: pay.expiresAt - h5.serverNow(), ticks,
                    renews: pay.handle.autoRenews, fetches: seen.fetch};
        }""")
    acquired = await screen.event("lock.acquired")
    assert acquired["lock"]["token"] == got["token"]
    assert acquired["lock"]["holder"]["role"] == "h5"
    assert got["orderId"] == "o1" and got["version"] == 2 and got["amount"] == 5000
    assert {"table_id": "t1"} in got["fetches"] and {"order_id": "o1"} in got["fetches"]
    assert 12_000 < got["msLeft"] <= 15_000 + 50  # the h5 TTL, on the estimated server clock
    assert got["ticks"][0] >= got["ticks"][1] >= got["ticks"][2] > 12_000
    assert got["renews"] is False  # an h5 payment lock is never renewed

    # A phone never records a payment: refused before anything is sent.
    refused = await page.evaluate(
        """async () => {
            window.sent = [];
            const ws = h5._ws, send = ws.send.bind(ws);
            ws.send = (data) => { sent.push(JSON.parse(data).type); return send(data); };
            try { await pay.complete({paymentRef: "wx-0000"}); return null; } catch (e) {
                return {name: e.name, code: e.code, message: e.message, sent,
                        typed: e instanceof tablelock.ForbiddenError};
            }
        }""")
    assert refused == {"name": "ForbiddenError", "code": "FORBIDDEN", "typed": True, "sent": [],
                       "message": "A phone does not record payments: pay through the payment "
                                  "provider, whose payment service records the payment."}
    # The phone hands its charge to the provider; the payment service records it.
    charge = await page.evaluate("pay.charge")
    assert charge == {"store_id": store.store_id, "order_id": "o1", "token": got["token"],
                      "version": 2, "amount_cents": 5000}
    await page.evaluate("() => { window.confirmed = pay.confirmed; }")
    status, body = await store.http(
        "POST", "/orders/o1/payment", "service",
        {k: charge[k] for k in ("token", "version", "amount_cents")} | {"payment_ref": "wx-0001"})
    assert status == 200 and body["order"]["status"] == "paid", body
    paid = await page.evaluate(
        """async () => {
            const r = await confirmed;
            const end = await pay.ended;
            return {status: r.order.status, ref: r.payment.payment_ref, reason: end.reason,
                    lost: end.lost, active: pay.active};
        }""")
    assert paid == {"status": "paid", "ref": "wx-0001", "reason": "paid", "lost": False,
                    "active": False}
    event = await screen.event("order.paid")
    assert event["payment"]["amount_cents"] == 5000 and event["order"]["version"] == 2
    assert event["payment"]["by"]["role"] == "service"

    # The ERP does not know the order: "pay at the front desk", and no lock is taken.
    failed = await page.evaluate(
        """async () => {
            try { await h5.pay("o-unknown"); return null; } catch (e) {
                return {name: e.name, code: e.code, message: e.message,
                        frontDesk: e.payAtFrontDesk,
                        typed: e instanceof tablelock.ErpUnavailableError};
            }
        }""")
    assert failed == {"name": "ErpUnavailableError", "code": "ERP_UNAVAILABLE",
                      "message": prompt("ERP_UNAVAILABLE", "en"), "frontDesk": True,
                      "typed": True}
    assert (await screen.request("order.get", order_id="o-unknown"))["error"]["code"] == "NOT_FOUND"

    # Leaving the page releases the payment lock.
    await page.evaluate(
        """async () => {
            books.o2 = {order_id: "o2", table_id: "t1", version: 1, amount_cents: 800,
                        items: [], status: "open"};
            await erp.publishOrder(books.o2, "modify");
            window.pay2 = await h5.pay("o2");
            window.dispatchEvent(new PageTransitionEvent("pagehide", {persisted: false}));
        }""")
    released = await screen.event("lock.released", where=lambda e: e["lock"]["order_id"] == "o2")
    assert released["reason"] == "released" and released["lock"]["holder"]["role"] == "h5"
    end = await page.evaluate("async () => { const e = await pay2.ended; return e.reason; }")
    assert end == "released"

    # With the broker out of reach, an h5 page shows the same prompt.
    offline = await page.evaluate(
        """async () => {
            h5.close();
            try { await h5.pay("o2"); return null; } catch (e) {
                return {code: e.code, message: e.message, cause: e.cause.code};
            }
        }""")
    assert offline == {"code": "ERP_UNAVAILABLE", "message": prompt("ERP_UNAVAILABLE", "en"),
                       "cause": "DISCONNECTED"}


async def test_erp_lock_renews_itself(store: Store, page: Page) -> None:
    await store.config(erp_lock_ttl_ms=10_000)
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1")
    await cashier.request("subscribe", channel=f"order:{store.store_id}:o1")
    await connect_js(page, "c", store.broker.url, store.token("erp_secondary", "screen-2"))
    got = await page.evaluate(
        """async () => {
            const h = await c.acquire("o1", "presettle");
            const first = h.expiresAt;
            const renewed = await new Promise((resolve) =>
                h.addEventListener("renewed", (e) => resolve(e.detail.lock), {once: true}));
            return {first, token: h.token, renewed, held: h.held};
        }""")
    assert got["renewed"]["token"] == got["token"] and got["held"]
    assert 3000 <= got["renewed"]["expires_at"] - got["first"] < 5000  # at about a third
    acquired = await cashier.event("lock.acquired")
    assert acquired["lock"]["kind"] == "presettle"
    await cashier.no_event("lock.expired", within=0.2)  # a renewal publishes nothing


async def test_reconnect_after_a_dropped_socket_recovers_missed_events(
        store: Store, page: Page) -> None:
    """One way back: a new session, each channel subscribed again at (since, epoch)."""
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1")
    await store.publish(cashier, order_id="o2")
    await cashier.request("subscribe", channel=f"store:{store.store_id}")
    await connect_js(page, "c", store.broker.url, store.token("erp_secondary", "screen-2"),
                     reconnect={"minDelayMs": 600, "maxDelayMs": 800, "jitter": 0})
    session, epoch = await page.evaluate(
        """async (storeId) => {
            window.m = await c.subscribe(`store:${storeId}`);
            window.h = await c.acquire("o2", "order");
            track(c, "client", ["stale", "open"]);
            track(m, "m", ["snapshot", "change"]);
            window.sent = [];
            const send = WebSocket.prototype.send;
            WebSocket.prototype.send = function (data) {  // what the SDK says from now on
                sent.push(JSON.parse(data));
                return send.call(this, data);
            };
            const at = [c.sessionId, m.epoch];
            c._ws.close();          // the network drops
            return at;
        }""", store.store_id)
    await cashier.event("terminal.offline", where=lambda e: e["terminal"]["terminal_id"]
                        == "screen-2")
    taken = await cashier.request("lock.acquire", order_id="o1", kind="payment")
    await until(page, "() => !c.stale && m.locks.has('o1/payment')")

    got = await page.evaluate(
        """() => ({
            resumed: c.hello.resumed, session: c.sessionId, epoch: m.epoch,
            hello: sent.find((f) => f.type === "hello"),
            subscribe: sent.find((f) => f.type === "subscribe"),
            stale: seen.client.filter((e) => e.type === "stale").map((e) => e.detail.stale),
            snapshot: seen.m.filter((e) => e.type === "snapshot").map((e) => ({
                reason: e.detail.reason, recovered: e.detail.recovered,
                missed: e.detail.missed.map((f) => f.event)})),
            replayed: seen.m.filter((e) => e.type === "change" && e.detail.replayed)
                .map((e) => e.detail.event.event),
            token: m.locks.get("o1/payment").token, held: h.held,
            mine: m.locks.get("o2/order").token === h.token,
        })""")
    assert got["resumed"] is False and got["session"] != session
    assert "resume" not in got["hello"]
    assert got["subscribe"]["epoch"] == epoch and got["epoch"] == epoch
    assert isinstance(got["subscribe"]["since"], int)
    assert got["stale"] == [True, False]
    # What happened while away, its own return included, told in order; the state has it all.
    missed = ["terminal.offline", "lock.acquired", "terminal.online"]
    assert got["snapshot"] == [{"reason": "reconnect", "recovered": True, "missed": missed}]
    assert got["replayed"] == missed
    assert got["token"] == taken["lock"]["token"]
    assert got["held"] and got["mine"]  # within the disconnect grace the lock stays


async def test_a_seq_gap_triggers_a_fresh_snapshot(store: Store, page: Page) -> None:
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1")
    await connect_js(page, "c", store.broker.url, store.token("manager", "boss"))
    await page.evaluate(
        """async (storeId) => {
            window.m = await c.subscribe(`store:${storeId}`);
            track(m, "m", ["snapshot"]);
            m.seq -= 1;   // as if an event had been lost on the way
        }""", store.store_id)
    taken = await cashier.request("lock.acquire", order_id="o1", kind="order")
    await until(page, "() => seen.m && !m.stale && m.locks.has('o1/order')")
    snap = await page.evaluate("() => seen.m.map((e) => e.detail)")
    assert [(s["reason"], s["recovered"]) for s in snap] == [("gap", True)]
    assert [f["event"] for f in snap[0]["missed"]][-1] == "lock.acquired"
    assert await page.evaluate("() => m.locks.get('o1/order').token") == taken["lock"]["token"]


async def test_reconnect_after_the_broker_restarts(
        broker_factory: Callable[..., BrokerProcess], site: str, page: Page) -> None:
    broker = broker_factory(env=broker_env(site))
    await asyncio.to_thread(broker.start)
    before = Store(broker)
    cashier = await before.erp("cashier-1")
    for n in range(1, 5):
        await before.publish(cashier, order_id=f"o{n}")
    await cashier.request("lock.acquire", order_id="o1", kind="payment")
    await connect_js(page, "c", broker.url, before.token("erp_secondary", "screen-2"),
                     reconnect={"minDelayMs": 100, "maxDelayMs": 400})
    old_seq, old_epoch = await page.evaluate(
        """async (storeId) => {
            window.m = await c.subscribe(`store:${storeId}`);
            window.h = await c.acquire("o2", "order");
            track(c, "client", ["stale"]);
            track(m, "m", ["snapshot"]);
            return [m.seq, m.epoch];
        }""", before.store_id)

    await before.close()
    await asyncio.to_thread(broker.stop)
    await until(page, "() => c.stale && m.stale && !c.connected")
    await asyncio.to_thread(broker.start)

    # The restarted in-memory broker knows nothing: a new ERP publishes the only order.
    after = Store(broker, store_id=before.store_id)
    try:
        cashier = await after.erp("cashier-1")
        await after.publish(cashier, order_id="o9", amount_cents=990)
        taken = await cashier.request("lock.acquire", order_id="o9", kind="order")
        await until(page, "() => !c.stale && m.orders.has('o9') && m.locks.has('o9/order')",
                    timeout=10)
        got = await page.evaluate(
            """async () => ({
                stale: seen.client.map((e) => e.detail.stale),
                snapshots: seen.m.map((e) => [e.detail.reason, e.detail.recovered]),
                resumed: c.hello.resumed, mirror: m.toJSON(),
                end: await Promise.race([h.lost.then((e) => e.reason),
                                         new Promise((r) => setTimeout(() => r("held"), 2000))]),
            })""")
        truth = await cashier.request("subscribe", channel=f"store:{before.store_id}")
    finally:
        await after.close()

    assert got["stale"] == [True, False]
    assert got["snapshots"] == [["reconnect", False]]  # history does not reach back: snapshot
    assert got["resumed"] is False
    assert got["end"] == "gone"  # the lock held before the restart is gone, and said so
    mirror, snap = got["mirror"], truth["snapshot"]
    assert truth["seq"] > old_seq  # numbering starts from the clock: never reused
    # ...in a new epoch, which the mirror now holds
    assert old_epoch and mirror["epoch"] == truth["epoch"] != old_epoch
    assert sorted(o["order_id"] for o in mirror["orders"]) == ["o9"]
    assert mirror["orders"] == snap["orders"]
    assert [lock["token"] for lock in mirror["locks"]] == [taken["lock"]["token"]]
    assert mirror["locks"] == snap["locks"]
    assert sorted(t["terminal_id"] for t in mirror["terminals"]) == sorted(
        t["terminal_id"] for t in snap["terminals"]) == ["cashier-1", "screen-2"]
    assert mirror["seq"] <= truth["seq"]


async def test_h5_lock_lapses_then_the_page_pays_again(store: Store, page: Page) -> None:
    await store.config(h5_payment_lock_ttl_ms=5000)
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1", amount_cents=1200)
    await connect_js(page, "h5", store.broker.url, store.token("h5", "phone-1", table="t1"))
    got = await page.evaluate(
        """async () => {
            const pay = window.pay = await h5.pay("o1");
            const ticks = [];
            const stop = pay.countdown((ms) => ticks.push(ms), {intervalMs: 500});
            let confirmed;
            try { await pay.confirmed; } catch (e) { confirmed = e; }
            const end = await pay.lost;            // the broker's lock.expired, not a guess
            stop();
            return {reason: end.reason, lost: end.lost, first: ticks[0], last: ticks.at(-1),
                    confirmed: {name: confirmed.name, code: confirmed.code,
                                message: confirmed.message}, charge: pay.charge};
        }""")
    assert got["reason"] == "expired" and got["lost"] is True
    assert 4000 < got["first"] <= 5000 and got["last"] <= 500
    assert got["confirmed"] == {"name": "LockExpiredError", "code": "LOCK_EXPIRED",
                                "message": prompt("LOCK_EXPIRED", "en")}
    # The provider's late confirmation: the payment service is refused, for a refund.
    charge = got["charge"]
    wire = {k: charge[k] for k in ("token", "version", "amount_cents")}
    status, body = await store.http("POST", "/orders/o1/payment", "service",
                                    wire | {"payment_ref": "wx-late"})
    assert status == 409 and body["error"]["code"] == "LOCK_EXPIRED", body
    again = await page.evaluate(
        """async () => {
            const again = window.again = await h5.pay("o1");      // re-fetch, re-lock
            window.confirmed = again.confirmed;
            return {newer: again.token > pay.token, charge: again.charge};
        }""")
    assert again["newer"]
    wire = {k: again["charge"][k] for k in ("token", "version", "amount_cents")}
    status, body = await store.http("POST", "/orders/o1/payment", "service",
                                     wire | {"payment_ref": "wx-2"})
    assert status == 200, body
    assert await page.evaluate("confirmed.then((r) => r.order.status)") == "paid"
    rejected = await store.audit(kind="payment.rejected")  # for the store to reconcile
    assert [e["detail"]["payment_ref"] for e in rejected] == ["wx-late"]


async def test_since_across_a_broker_restart_is_not_recovered(
        broker_factory: Callable[..., BrokerProcess], site: str) -> None:
    broker = broker_factory(env=broker_env(site))
    await asyncio.to_thread(broker.start)
    before = Store(broker)
    cashier = await before.erp("cashier-1")
    await before.publish(cashier, order_id="o1")
    await cashier.request("lock.acquire", order_id="o1", kind="order")
    screen = await before.connect("erp_secondary", "screen-2")
    seen = await screen.request("subscribe", channel=f"order:{before.store_id}:o1")
    await before.close()
    await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(broker.start)

    after = Store(broker, store_id=before.store_id)
    try:
        cashier = await after.erp("cashier-1")
        await after.publish(cashier, order_id="o1")
        await after.publish(cashier, order_id="o1", version=2)
        await cashier.request("lock.acquire", order_id="o1", kind="payment")
        screen = await after.connect("erp_secondary", "screen-2")
        again = await screen.request("subscribe", channel=f"order:{before.store_id}:o1",
                                     since=seen["seq"])
    finally:
        await after.close()
    # The order lock the screen saw before is gone, and no event in `missed` says so.
    assert [lock["kind"] for lock in again["snapshot"]["locks"]] == ["payment"]
    assert again["recovered"] is False, again["missed"]


async def test_an_unknown_outcome_is_settled_by_reading_the_order(
        store: Store, page: Page) -> None:
    """`UNAVAILABLE` with `"outcome": "unknown"` (the broker could not tell whether a write was
    applied): the SDK reads the order before it reports. The write really reaches the broker;
    only its reply is replaced on the way back to the page."""
    screen = await store.connect("erp_secondary", "screen-2")
    await screen.request("subscribe", channel=f"order:{store.store_id}:o1")
    lose = {"order.publish", "lock.acquire", "payment.complete"}
    lost: dict[int, str] = {}

    def route(ws: Any) -> None:
        server = ws.connect_to_server()

        def upstream(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") in lose:
                lose.discard(frame["type"])  # once each
                lost[frame["id"]] = frame["type"]
            server.send(message)

        def downstream(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("id") in lost:
                message = json.dumps({"id": frame["id"], "ok": False, "error": {
                    "code": "UNAVAILABLE", "message": "no answer in time",
                    "outcome": "unknown"}})
            ws.send(message)

        ws.on_message(upstream)
        server.on_message(downstream)

    # The SDK names the store in the URL's query (for a store-affine load balancer).
    await page.route_web_socket(re.compile(re.escape(store.broker.url) + r"(\?.*)?$"), route)
    await connect_js(page, "erp", store.broker.url, store.token("erp_main", "cashier-js"))
    got = await page.evaluate(
        """async () => {
            const o1 = {order_id: "o1", table_id: "t1", version: 1, amount_cents: 4200,
                        items: [], status: "open"};
            const published = await erp.publishOrder(o1, "modify");
            const lock = await erp.acquire("o1", "payment");
            const held = lock.held;
            const paid = await erp.completePayment({orderId: "o1", token: lock.token,
                version: 1, amountCents: 4200, paymentRef: "pos-1"});
            return {version: published.version, held, token: lock.token,
                    status: paid.order.status, ref: paid.payment.payment_ref};
        }""")
    assert sorted(lost.values()) == ["lock.acquire", "order.publish", "payment.complete"]
    assert got["version"] == 1 and got["held"] is True and got["status"] == "paid"
    assert got["ref"] == "pos-1"
    acquired = await screen.event("lock.acquired")
    assert acquired["lock"]["token"] == got["token"]
    paid = await screen.event("order.paid")
    assert paid["payment"]["payment_ref"] == "pos-1"
    completed = await store.audit(kind="payment.completed")
    assert len(completed) == 1  # asked twice, paid once

    # A write that did not happen is reported as such, with the order as it is.
    lose.add("order.publish")
    stale = await page.evaluate(
        """async () => {
            const o2 = {order_id: "o1", table_id: "t1", version: 1, amount_cents: 9900,
                        items: [], status: "open"};
            try { await erp.publishOrder(o2, "modify"); return null; } catch (e) {
                return {code: e.code, outcome: e.outcome, status: e.reread.order.status};
            }
        }""")
    assert stale == {"code": "UNAVAILABLE", "outcome": "unknown", "status": "paid"}

    # A release whose reply is lost: the lock is gone, so it was released.
    await store.publish(screen, order_id="o2")  # an erp_secondary may publish
    await screen.request("subscribe", channel=f"order:{store.store_id}:o2")
    lose.add("lock.release")
    released = await page.evaluate(
        """async () => {
            const lock = await erp.acquire("o2", "order");
            await lock.release();
            return {held: lock.held, reason: lock.end.reason, handles: erp.handles.size};
        }""")
    assert released == {"held": False, "reason": "released", "handles": 0}
    gone = await screen.event("lock.released", where=lambda e: e["lock"]["order_id"] == "o2")
    assert gone["reason"] == "released"


async def test_the_modules_seams_from_the_outside(store: Store, page: Page) -> None:
    """What the modules give one another works end to end, and none of it leaks into the
    public API: a held lock watches its order's channel until it ends, the client forgets an
    ended handle, `released` by this client is no loss, `whenConnected` waits for a
    reconnect, and the entry exports no internal symbol."""
    cashier = await store.erp("cashier-1")
    await store.publish(cashier, order_id="o1", table_id="t7")
    token = store.token("h5", "phone-1", table="t7")
    await connect_js(page, "c", store.broker.url, token)
    got = await page.evaluate(
        """async (token) => {
            const channel = `order:${c.storeId}:o1`;
            const before = {token: c.token === token, table: c.tableId, closed: c.closed,
                            failure: c.failure};
            const h = await c.acquire("o1", "payment");
            const watching = c.mirror(channel) !== undefined && c.handles.get("o1/payment") === h;
            const autoRenews = h.autoRenews;
            await h.release();
            const end = await h.ended;
            await new Promise((r) => setTimeout(r, 0));
            const after = {mirror: c.mirror(channel) === undefined, handles: c.handles.size};
            c.reconnect();
            const down = c.connected;
            await c.whenConnected(5000);
            const exported = Object.entries(tablelock);
            c.close();
            return {
                before, watching, autoRenews, end: {reason: end.reason, lost: end.lost}, after,
                down, up: true, closed: c.closed,
                symbols: exported.filter(([, v]) => typeof v === "symbol").map(([k]) => k),
                underscored: Object.keys(h).filter((k) => k.startsWith("_") &&
                    ["_releasing", "_end", "_update", "_start"].includes(k)),
                hidden: Object.getOwnPropertySymbols(h).length > 0,
            };
        }""", token)
    assert got["before"] == {"token": True, "table": "t7", "closed": False, "failure": None}
    assert got["watching"] and got["autoRenews"] is False  # an h5 lock is never renewed
    assert got["end"] == {"reason": "released", "lost": False}
    assert got["after"] == {"mirror": True, "handles": 0}
    assert got["down"] is False and got["up"] and got["closed"] is True
    assert got["symbols"] == [] and got["underscored"] == [] and got["hidden"]
    released = await cashier.request("order.get", order_id="o1")
    assert released["ok"] and released["locks"] == []


async def test_the_url_names_the_store_for_a_store_affine_load_balancer(
        store: Store, page: Page) -> None:
    await connect_js(page, "c", store.broker.url, store.token("manager", "boss"))
    got = await page.evaluate(
        """async () => {
            const { routedUrl } = await import("/sdk/helpers.js");
            return {opened: new URL(c._ws.url).searchParams.get("store"),
                    kept: routedUrl("ws://x/ws?store=other", {store: "s1"}),
                    none: routedUrl("ws://x/ws", null)};
        }""")
    assert got == {"opened": store.store_id, "kept": "ws://x/ws?store=other",
                   "none": "ws://x/ws"}
