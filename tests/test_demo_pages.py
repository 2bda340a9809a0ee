"""The demo pages (demo/static/: dashboard, ERP terminal, H5 page) in real headless Chromium,
against a real `tablelock demo --no-simulation` broker that serves them at /app/.

The other terminals are raw `WsClient`s (tokens minted with the test secret for the demo store),
so every effect a page has is checked on the wire or over HTTP. One Chromium and one demo
broker serve the module; each test uses tables of its own. The tests that restart a broker or
want a clean store for screenshots start one of their own.

`TABLELOCK_WRITE_SCREENSHOT=1` makes test_readme_screenshot write docs/dashboard.png (1366x768)
from a real `tablelock demo`, simulation included.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tablelock.prompts import prompt

from .support import ROOT, SECRET, BrokerProcess, WsClient, ahttp, mint, order

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
STORE = "demo"
LAPTOP = {"width": 1366, "height": 768}
TABLET = {"width": 768, "height": 1024}
PHONE = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
    pytest.mark.asyncio(loop_scope="module"),
]

class DemoBroker(BrokerProcess):
    """`tablelock demo --no-simulation` in a child process, on a port that survives restarts."""

    command = ("demo", "--no-simulation", "--secret", SECRET, "--store", STORE)

    @property
    def ws(self) -> str:
        return self.url

    async def connect(self, role: str, sub: str, *, name: str | None = None,
                      table: str | None = None, store: str = STORE) -> WsClient:
        return await WsClient.connect(self.ws, mint(store, role, sub, table, name=name))

    async def erp(self, sub: str = "erp-test", name: str = "Cashier 1",
                  role: str = "erp_main", store: str = STORE) -> WsClient:
        """An ERP that answers order.fetch with what it published (`publish` below)."""
        client = await self.connect(role, sub, name=name, store=store)
        book: dict[str, dict[str, Any]] = {}
        client.book = book  # type: ignore[attr-defined]

        async def answer(frame: dict[str, Any]) -> dict[str, Any]:
            params = frame["params"]
            found = book.get(params.get("order_id", "")) or next(
                (o for o in book.values() if o["table_id"] == params.get("table_id")), None)
            if found is None:
                return {"ok": False, "error": {"code": "NOT_FOUND", "message": "no order"}}
            return {"ok": True, "result": {"order": found}}

        client.rpc_handler = answer
        return client

    async def api(self, method: str, path: str, body: Any = None,
                  store: str = STORE) -> tuple[int, Any]:
        token = mint(store, "manager", "test-manager")
        return await ahttp(method, f"{self.http}/v1/stores/{store}{path}", token, body)


async def publish(erp: WsClient, order_id: str, table: str, version: int = 1,
                  amount_cents: int = 4200, **extra: Any) -> dict[str, Any]:
    body = order(order_id, table, version, amount_cents,
                 items=[{"sku": "duck", "qty": 1}, {"sku": "rice", "qty": 2}])
    reply = await erp.request("order.publish", order=body, change="modify", **extra)
    assert reply["ok"], reply
    book = getattr(erp, "book", None)
    if book is not None:
        book[order_id] = body
    return body


async def acquire(client: WsClient, order_id: str, kind: str, **extra: Any) -> dict[str, Any]:
    reply = await client.request("lock.acquire", order_id=order_id, kind=kind, **extra)
    assert reply["ok"], reply
    return reply["lock"]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_process() -> Iterator[DemoBroker]:
    """The module's demo broker, booting while Chromium launches."""
    broker = DemoBroker().spawn()
    yield broker
    broker.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(demo_process: DemoBroker) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture(scope="module")
def demo(demo_process: DemoBroker, browser: Browser) -> DemoBroker:
    return demo_process.wait()


class Pages:
    """The pages a test opens; none may throw an uncaught error. Pages share one browser context
    (one origin, no isolation needed) unless a test wants two terminals apart."""

    def __init__(self, browser: Browser, context: BrowserContext) -> None:
        self.browser = browser
        self.context = context
        self.own: list[BrowserContext] = []
        self.pages: list[Page] = []
        self.errors: list[str] = []

    async def open(self, url: str, viewport: dict[str, int] = LAPTOP,
                   own_context: bool = False) -> Page:
        if own_context:
            context = await self.browser.new_context(viewport=viewport)  # type: ignore[arg-type]
            self.own.append(context)
        else:
            context = self.context
        page = await context.new_page()
        self.pages.append(page)
        if viewport != LAPTOP and not own_context:
            await page.set_viewport_size(viewport)  # type: ignore[arg-type]
        page.on("pageerror", lambda exc: self.errors.append(f"{url}: {exc}"))
        await page.goto(url, wait_until="commit")
        await live(page)
        return page

    async def close(self) -> None:
        for page in self.pages:
            await page.close()
        for context in self.own:
            await context.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def module_pages(browser: Browser) -> AsyncIterator[Pages]:
    context = await browser.new_context(viewport=LAPTOP)  # type: ignore[arg-type]
    opened = Pages(browser, context)
    yield opened
    await opened.close()
    await context.close()
    assert not opened.errors, opened.errors


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def dash(demo: DemoBroker, module_pages: Pages) -> Page:
    """The dashboard the map tests share, each on tables of its own."""
    return await module_pages.open(f"{demo.http}/app/dashboard.html?lang=en")


@pytest_asyncio.fixture(loop_scope="module")
async def pages(browser: Browser, module_pages: Pages) -> AsyncIterator[Pages]:
    opened = Pages(browser, module_pages.context)
    yield opened
    await opened.close()
    assert not opened.errors, opened.errors
    assert not module_pages.errors, module_pages.errors


async def live(page: Page, timeout: float = 10.0) -> None:
    await page.wait_for_selector('[data-testid="conn-state"][data-state="live"]',
                                 timeout=timeout * 1000)


def tile(table: str, state: str | None = None) -> str:
    sel = f'[data-testid="table-{table}"]'
    return f'{sel}[data-state="{state}"]' if state else sel


async def shoot(page: Page, path: Path) -> Path:
    await page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


# --- dashboard -----------------------------------------------------------------------------


async def test_dashboard_shows_the_tables(demo: DemoBroker, pages: Pages) -> None:
    page = await pages.open(f"{demo.http}/app/dashboard.html?lang=en")
    for n in range(1, 13):
        await page.wait_for_selector(tile(f"T{n:02d}"), timeout=2000)
    assert await page.get_attribute(tile("T12"), "data-state") == "free"
    # A table beyond ?tables= shows up as soon as it has an order.
    erp = await demo.erp("erp-tables")
    await publish(erp, "o-t20", "T20")
    await page.wait_for_selector(tile("T20", "ordering"), timeout=2000)
    assert "o-t20" in (await page.text_content(tile("T20")) or "")
    # Terminals: the ERP is online with its role; the dashboard lists itself.
    row = page.locator('[data-testid="terminal-erp-tables"]')
    await row.wait_for(timeout=2000)
    assert await row.get_attribute("data-online") == "true"
    assert "main cashier" in (await row.text_content() or "")
    await erp.close()
    await page.wait_for_selector('[data-testid="terminal-erp-tables"][data-online="false"]',
                                 timeout=3000)
    # ?tables= sets the map's size; zh-CN is the default locale and switches in place.
    small = await pages.open(f"{demo.http}/app/dashboard.html?tables=4")
    await small.wait_for_selector(tile("T20"))
    assert await small.locator(tile("T04")).count() == 1
    assert await small.locator(tile("T05")).count() == 0
    assert "桌台" in (await small.text_content("#map-h") or "")
    await small.select_option('[data-testid="lang-switch"]', "en")
    await small.wait_for_function("document.querySelector('#map-h').textContent === 'Tables'")
    assert "lang=en" in small.url


async def test_a_lock_shows_on_the_map_within_a_second(demo: DemoBroker, dash: Page) -> None:
    page = dash
    erp = await demo.erp("erp-map", "Cashier 7")
    await publish(erp, "o-t02", "T02")
    await page.wait_for_selector(tile("T02", "ordering"), timeout=2000)

    started = time.monotonic()
    await acquire(erp, "o-t02", "order")
    await page.wait_for_selector(tile("T02", "editing"), timeout=1000)
    shown = time.monotonic() - started
    text = await page.text_content(tile("T02")) or ""
    assert "Cashier 7" in text and "order lock" in text, text
    assert await page.locator('[data-testid="force-release-T02-order"]').is_enabled()

    started = time.monotonic()
    reply = await erp.request("lock.release", order_id="o-t02", kind="order")
    assert reply["ok"], reply
    await page.wait_for_selector(tile("T02", "ordering"), timeout=1000)
    cleared = time.monotonic() - started
    print(f"lock shown after {shown * 1000:.0f} ms, cleared after {cleared * 1000:.0f} ms")
    # The feed told both, and filters by table.
    feed = page.locator('[data-testid="feed"] li[data-table="T02"]')
    assert await feed.count() >= 3  # new order, acquired, released
    await page.select_option('[data-testid="feed-filter"]', "T05")
    assert await page.locator('[data-testid="feed"] li[data-table="T02"]:visible').count() == 0
    await page.select_option('[data-testid="feed-filter"]', "")
    await erp.close()


async def test_pages_ask_the_capability_table(demo: DemoBroker, dash: Page,
                                              pages: Pages) -> None:
    """Which till a page is, and how a lock shows, come from the generated capability
    constants: the first order authority keeps the order book; a phone's lock, which is never
    renewed, shows its countdown on the map, an ERP's does not."""
    roles = {}
    for query in ("role=erp_main", "", "role=manager"):
        erp = await pages.open(f"{demo.http}/app/erp.html?table=T17&lang=en&{query}",
                               own_context=True)
        await erp.wait_for_function("window.tablelockClient?.terminal", timeout=5000)
        role = await erp.evaluate("window.tablelockClient.terminal.role")
        roles[query] = (role, await erp.locator('[data-testid="new-order"]').count() > 0)
    # ?role= names a till, else the page is one the broker does not ask first.
    assert roles == {"role=erp_main": ("erp_main", True), "": ("erp_secondary", False),
                     "role=manager": ("erp_secondary", False)}

    erp = await demo.erp("erp-caps", "Cashier 8")
    await publish(erp, "o-t17", "T17")
    await publish(erp, "o-t18", "T18")
    phone = await demo.connect("h5", "h5-t17", table="T17", name="T17")
    await acquire(phone, "o-t17", "payment")
    await acquire(erp, "o-t18", "order")
    await dash.wait_for_selector(f'{tile("T17")} [data-testid="lock-T17-payment"]', timeout=2000)
    await dash.wait_for_selector(f'{tile("T18")} [data-testid="lock-T18-order"]', timeout=2000)
    assert await dash.locator('[data-testid="lock-T17-payment"] .ttl-bar').count() == 1
    assert await dash.locator('[data-testid="lock-T18-order"] .ttl-bar').count() == 0
    await phone.close()
    await erp.close()


async def test_force_release_from_the_map(demo: DemoBroker, dash: Page) -> None:
    page = dash
    erp = await demo.erp("erp-force", "Cashier 3")
    await publish(erp, "o-t03", "T03")
    lock = await acquire(erp, "o-t03", "payment")
    await page.wait_for_selector(tile("T03", "paying"), timeout=2000)

    await page.click('[data-testid="force-release-T03-payment"]')
    dialog = page.locator('[data-testid="dialog"]')
    await dialog.wait_for()
    assert "T03" in (await dialog.text_content() or "")
    await page.click('[data-testid="dialog-confirm"]')  # no reason: refused by the form
    await page.wait_for_selector('[data-testid="dialog-error"]:visible')
    assert await page.is_visible(tile("T03", "paying"))
    reason = "till 3 froze; the guest pays at the front desk"
    await page.fill('[data-testid="dialog-reason"]', reason)
    await page.click('[data-testid="dialog-confirm"]')
    await dialog.wait_for(state="detached")

    forced = await erp.event("lock.forced", timeout=3)
    assert forced["lock"]["token"] == lock["token"]
    assert forced["by"]["role"] == "manager"
    await page.wait_for_selector(tile("T03", "ordering"), timeout=2000)
    entries = (await demo.api("GET", "/audit?kind=lock.forced"))[1]["entries"]
    mine = [e for e in entries if e["order_id"] == "o-t03"]
    assert mine and mine[0]["detail"]["reason"] == reason
    assert mine[0]["detail"]["operator"] == "Manager"
    # The feed highlights the takeover, with the reason once the audit log has been read.
    line = page.locator('[data-testid="feed"] li[data-event="lock.forced"][data-table="T03"]')
    await line.first.wait_for()
    assert "forced the payment lock of T03" in (await line.first.text_content() or "")
    await page.wait_for_function(
        """(reason) => [...document.querySelectorAll('[data-testid="feed"] li')]
            .some((li) => li.textContent.includes(reason))""", arg=reason, timeout=6000)
    await erp.close()


async def test_reconcile_queue(demo: DemoBroker, dash: Page) -> None:
    page = dash
    erp = await demo.erp("erp-rec", "Cashier 4")
    await publish(erp, "o-t06", "T06", amount_cents=5000)
    lock = await acquire(erp, "o-t06", "payment")
    wrong = await erp.request("payment.complete", order_id="o-t06", token=lock["token"],
                              version=1, amount_cents=4999, payment_ref="ref-wrong-amount")
    assert wrong["error"]["code"] == "AMOUNT_MISMATCH"
    paid = await erp.request("payment.complete", order_id="o-t06", token=lock["token"],
                             version=1, amount_cents=5000, payment_ref="ref-ok")
    assert paid["ok"], paid
    await page.wait_for_selector(tile("T06", "paid"), timeout=2000)
    # The queue is read every few seconds, and at once after an order.paid.
    entry = page.locator('[data-testid="reconcile"] li', has_text="ref-wrong-amount")
    await entry.wait_for(timeout=2000)
    text = await entry.text_content() or ""
    assert "AMOUNT_MISMATCH" in text and "¥49.99" in text and "v1" in text and "T06" in text
    entry_id = await entry.get_attribute("data-id")
    await page.click(f'[data-testid="reconcile-handle-{entry_id}"]')
    await entry.wait_for(state="detached", timeout=3000)
    entries = (await demo.api("GET", "/audit?kind=payment.rejected"))[1]["entries"]
    assert next(e for e in entries if e["id"] == entry_id)["handled"] is True
    await erp.close()


async def test_config_through_the_page(demo: DemoBroker, dash: Page) -> None:
    page = dash
    form = page.locator('[data-testid="config-form"]')
    await page.wait_for_function(
        "document.querySelector('[data-testid=config-h5-ttl]').value !== ''")
    before = (await demo.api("GET", "/config"))[1]
    try:
        await page.fill('[data-testid="config-h5-ttl"]', "3")  # below 5 s
        await page.click('[data-testid="config-save"]')
        error = page.locator('[data-testid="config-h5-ttl-error"]')
        await error.wait_for()
        assert "between 5 and 300" in (await error.text_content() or "")
        assert (await demo.api("GET", "/config"))[1] == before

        await page.fill('[data-testid="config-h5-ttl"]', "20")
        await page.fill('[data-testid="config-grace"]', "45")
        await page.click('[data-testid="config-save"]')
        await page.wait_for_selector('[data-testid="config-status"]:has-text("saved")')
        config = (await demo.api("GET", "/config"))[1]
        assert config["h5_payment_lock_ttl_ms"] == 20000
        assert config["disconnect_grace_ms"] == 45000
        assert config["strong_link"] is True

        # A change made elsewhere (config.updated) refreshes the form.
        status, _ = await demo.api("PUT", "/config", {"disconnect_grace_ms": 12500})
        assert status == 200
        await page.wait_for_function(
            "document.querySelector('[data-testid=config-grace]').value === '12.5'")
        assert await form.is_visible()
    finally:
        await demo.api("PUT", "/config", {k: before[k] for k in (
            "h5_payment_lock_ttl_ms", "disconnect_grace_ms", "strong_link")})


async def test_stale_indicator_when_the_broker_stops(pages: Pages, tmp_path: Path) -> None:
    broker = DemoBroker().start()
    try:
        page = await pages.open(f"{broker.http}/app/dashboard.html?lang=en")
        erp = await broker.erp("erp-stale")
        await publish(erp, "o-t01", "T01")
        await acquire(erp, "o-t01", "order")
        button = page.locator('[data-testid="force-release-T01-order"]')
        await button.wait_for()
        assert await button.is_enabled()

        broker.stop()
        started = time.monotonic()
        await page.wait_for_selector('[data-testid="conn-state"][data-state="stale"]',
                                     timeout=5000)
        print(f"stale after {(time.monotonic() - started) * 1000:.0f} ms")
        assert await page.is_visible('[data-testid="stale-banner"]')
        assert await page.evaluate("document.body.classList.contains('is-stale')")
        assert await button.is_disabled()  # the last known state stays, greyed, actionless
        assert await page.is_visible(tile("T01", "editing"))
        await shoot(page, tmp_path / "dashboard-stale.png")

        broker.start()
        started = time.monotonic()
        await live(page, timeout=15)
        print(f"live again after {(time.monotonic() - started) * 1000:.0f} ms")
        assert not await page.is_visible('[data-testid="stale-banner"]')
        # An in-memory broker restarted empty: the snapshot is the truth.
        await page.wait_for_selector(tile("T01", "free"), timeout=3000)
        await erp.close()
    finally:
        broker.stop()


# --- terminal pages ------------------------------------------------------------------------


async def test_erp_force_continue_when_the_phone_pays(demo: DemoBroker, pages: Pages,
                                                      tmp_path: Path) -> None:
    # The ERP page as erp_main (zh-CN, the default) opens the order and answers order.fetch.
    erp = await pages.open(f"{demo.http}/app/erp.html?role=erp_main&table=T04")
    await erp.click('[data-testid="new-order"]')
    await erp.wait_for_selector('[data-testid="erp-total"]')
    watcher = await demo.connect("manager", "watch-erp")
    await watcher.request("subscribe", channel=f"store:{STORE}")

    # The phone in a browser context of its own.
    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T04&lang=en", PHONE, own_context=True)
    await h5.wait_for_selector('[data-testid="pay"]')
    await h5.click('[data-testid="pay"]')
    await h5.wait_for_selector('[data-testid="countdown"]')
    acquired = await watcher.event("lock.acquired", where=lambda e: e["lock"]["kind"] == "payment")
    assert acquired["lock"]["holder"]["role"] == "h5"
    seconds = int((await h5.text_content('[data-testid="countdown"]') or "0s").rstrip("s"))
    assert 10 <= seconds <= 20
    await shoot(h5, tmp_path / "h5-paying.png")

    # Accepting a scanned order is blocked, with the seed's toast word for word.
    await erp.click('[data-testid="accept"]')
    # Toasts stack: the new order's own may still be showing, so find the one that says it.
    blocked = prompt("ACCEPT_BLOCKED", "zh-CN")
    toast = erp.locator('[data-testid="toast"]', has_text=blocked)
    await toast.wait_for()
    assert await toast.text_content() == blocked

    # Going to the cashier: the force-continue dialog with the exact PAYMENT_LOCKED prompt.
    await erp.click('[data-testid="checkout"]')
    await erp.wait_for_selector('[data-testid="dialog"]')
    assert (await erp.text_content('[data-testid="dialog-message"]')
            == prompt("PAYMENT_LOCKED", "zh-CN"))
    await shoot(erp, tmp_path / "erp-force-continue.png")
    await erp.click('[data-testid="dialog-confirm"]')
    await erp.wait_for_selector('[data-testid="collect"]')
    forced = await watcher.event("lock.forced")
    assert forced["lock"]["holder"]["role"] == "h5"
    assert forced["by"]["role"] == "erp_main"

    # The phone is told, and cannot pay any more; the cashier takes the money.
    message = h5.locator('[data-testid="h5-message"]')
    await message.wait_for()
    assert await message.text_content() == prompt("FENCED", "en")
    assert not await h5.is_visible('[data-testid="confirm-payment"]')
    await h5.wait_for_selector('[data-testid="pay"]:disabled')  # the counter's payment lock
    assert "being paid elsewhere" in (await h5.text_content('[data-testid="pay-reason"]') or "")
    await erp.click('[data-testid="collect"]')
    paid = await watcher.event("order.paid")
    assert paid["order"]["table_id"] == "T04"
    assert paid["payment"]["by"]["role"] == "erp_main"
    # The phone says where it was paid, and the "taken over" error is gone.
    await h5.wait_for_selector('[data-testid="paid-elsewhere"][data-by="counter"]', timeout=3000)
    assert await h5.text_content('[data-testid="paid-elsewhere"]') == "Paid at the counter"
    assert not await message.is_visible()
    assert await h5.text_content('[data-testid="h5-status"]') == "paid"
    await shoot(erp, tmp_path / "erp-paid.png")
    await watcher.close()


async def test_h5_pays_and_falls_back_to_the_front_desk(demo: DemoBroker, pages: Pages) -> None:
    erp = await demo.erp("erp-h5", "Cashier 5")
    await publish(erp, "o-t07", "T07", amount_cents=8800)
    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T07&lang=en", PHONE)
    await h5.wait_for_selector('[data-testid="h5-total"]:has-text("¥88.00")')

    # A dish under the ERP's order lock is allowed (asked for); Pay waits, and says why.
    await acquire(erp, "o-t07", "order")
    await h5.click('[data-testid="add-beer"]')
    await h5.wait_for_selector('[data-testid="h5-message"]:has-text("Tsingtao beer")')
    await h5.wait_for_selector('[data-testid="pay"]:disabled', timeout=3000)
    assert (await h5.text_content('[data-testid="pay-reason"]')
            == "The counter is changing the order")
    await erp.request("lock.release", order_id="o-t07", kind="order")
    await h5.wait_for_selector('[data-testid="pay"]:enabled', timeout=3000)

    # Pay: countdown, then the payment app's confirm goes to the payment provider, whose
    # payment service records it (role service); the page learns it from order.paid.
    watcher = await demo.connect("manager", "watch-h5-pay")
    await watcher.request("subscribe", channel=f"order:{STORE}:o-t07")
    await h5.click('[data-testid="pay"]')
    await h5.wait_for_selector('[data-testid="countdown"]')
    await h5.click('[data-testid="confirm-payment"]')
    await h5.wait_for_selector('[data-testid="provider-wait"]')
    paid = await watcher.event("order.paid", timeout=10)
    assert paid["payment"]["by"]["role"] == "service"
    await h5.wait_for_selector('[data-testid="paid"]')
    ref = (await h5.text_content('[data-testid="paid-ref"]') or "").split()[-1]
    assert paid["payment"]["payment_ref"] == ref
    await watcher.close()

    # No ERP to ask: "pay at the front desk", and no lock is taken.
    await erp.close()
    secondary = await demo.connect("erp_secondary", "erp-h5-2")
    await publish(secondary, "o-t08", "T08")
    other = await pages.open(f"{demo.http}/app/h5.html?table=T08&lang=en", PHONE)
    await other.wait_for_selector('[data-testid="pay"]')
    await other.click('[data-testid="pay"]')
    desk = other.locator('[data-testid="front-desk-message"]')
    await desk.wait_for(timeout=10000)
    assert await desk.text_content() == prompt("ERP_UNAVAILABLE", "en")
    _, got = await demo.api("GET", "/orders/o-t08")
    assert got["locks"] == []
    await secondary.close()


async def test_h5_follows_the_push(demo: DemoBroker, pages: Pages) -> None:
    """A new order, a change and the next party's order reach the phone at once: the order's
    channel and the table feed, no polling."""
    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T10&lang=en", PHONE)
    await h5.wait_for_selector('[data-testid="h5-no-order"]')
    erp = await demo.erp("erp-push", "Cashier 8")
    await publish(erp, "o-t10", "T10", amount_cents=4200)
    await h5.wait_for_selector('[data-testid="h5-total"]:has-text("¥42.00")', timeout=2000)
    await publish(erp, "o-t10", "T10", version=2, amount_cents=5500)
    await h5.wait_for_selector('[data-testid="h5-total"]:has-text("¥55.00")', timeout=2000)
    # Paid at the counter, closed, and the next party's order appears by itself.
    lock = await acquire(erp, "o-t10", "payment")
    reply = await erp.request("payment.complete", order_id="o-t10", token=lock["token"],
                              version=2, amount_cents=5500, payment_ref="pos-t10")
    assert reply["ok"], reply
    await h5.wait_for_selector('[data-testid="paid-elsewhere"][data-by="counter"]', timeout=2000)
    await publish(erp, "o-t10b", "T10", amount_cents=2600)
    await h5.wait_for_selector('[data-testid="h5-total"]:has-text("¥26.00")', timeout=2000)
    assert not await h5.is_visible('[data-testid="paid-elsewhere"]')
    await erp.close()


async def test_h5_pay_waits_while_paid_elsewhere(demo: DemoBroker, pages: Pages) -> None:
    erp = await demo.erp("erp-elsewhere", "Cashier 9")
    await publish(erp, "o-t11", "T11", amount_cents=3000)
    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T11&lang=en", PHONE)
    await h5.wait_for_selector('[data-testid="pay"]:enabled')
    # Another phone at the table pays: Pay is off, with the reason and that phone's time left.
    other = await demo.connect("h5", "h5-t11-other", table="T11", name="T11")
    await acquire(other, "o-t11", "payment")
    await h5.wait_for_selector('[data-testid="pay"]:disabled', timeout=2000)
    reason = await h5.text_content('[data-testid="pay-reason"]') or ""
    assert reason.startswith("This order is being paid elsewhere") and "s left" in reason, reason
    await other.close()  # an h5 lock outlives its phone: it ends at its TTL, or by a cashier
    reply = await erp.request("lock.release", order_id="o-t11", kind="payment", force=True,
                              operator="test", reason="the phone went away")
    assert reply["ok"], reply
    await h5.wait_for_selector('[data-testid="pay"]:enabled', timeout=2000)
    # Its own payment: Pay is off and counts down with the lock.
    await h5.click('[data-testid="pay"]')
    pay = h5.locator('[data-testid="pay"]')
    await h5.wait_for_selector('[data-testid="pay"][data-paying]:disabled')
    first = await pay.text_content() or ""
    assert first.startswith("Paying") and "s left" in first, first
    await h5.wait_for_function(
        """(first) => document.querySelector('[data-testid="pay"]').textContent !== first""",
        arg=first, timeout=3000)
    await h5.click('[data-testid="cancel-payment"]')
    await h5.wait_for_selector('[data-testid="pay"]:enabled', timeout=3000)
    await erp.close()


async def test_h5_payment_refused_by_the_broker_is_refunded(demo: DemoBroker,
                                                             pages: Pages) -> None:
    """The cashier forces the phone's lock while the provider confirms: the payment service
    is refused (FENCED), the page says the money goes back, the store has it to reconcile."""
    erp = await demo.erp("erp-refund", "Cashier 11")
    await publish(erp, "o-t15", "T15", amount_cents=2000)
    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T15&lang=en", PHONE)
    await h5.click('[data-testid="pay"]')
    await h5.wait_for_selector('[data-testid="countdown"]')
    await h5.click('[data-testid="confirm-payment"]')
    await h5.wait_for_selector('[data-testid="provider-wait"]')
    await acquire(erp, "o-t15", "payment", force=True, operator="test", reason="refund test")
    message = h5.locator('[data-testid="h5-message"]')
    await message.wait_for(timeout=10_000)
    expected = f"The payment was not recorded: {prompt('FENCED', 'en')} It will be refunded."
    await h5.wait_for_function(
        "(text) => document.querySelector('[data-testid=h5-message]').textContent === text",
        arg=expected, timeout=10_000)
    entries = (await demo.api("GET", "/audit?kind=payment.rejected"))[1]["entries"]
    mine = [e for e in entries if e["order_id"] == "o-t15"]
    assert mine and mine[0]["detail"]["code"] == "FENCED"
    assert mine[0]["terminal"]["role"] == "service"
    await erp.close()


async def test_language_follows_the_switch(demo: DemoBroker, pages: Pages) -> None:
    """Pages open in Chinese; status words, dish names, errors on screen and force reasons
    follow the switch."""
    erp = await demo.erp("erp-lang", "Cashier 10")
    body = order("o-t12", "T12", 1, 1600, items=[{"sku": "hotsour", "name": "酸辣汤", "qty": 1,
                                                  "price_cents": 1600}])
    assert (await erp.request("order.publish", order=body, change="modify"))["ok"]
    erp.book["o-t12"] = body  # type: ignore[attr-defined]
    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T12", PHONE)
    items = h5.locator('[data-testid="h5-items"]')
    await items.wait_for()
    assert await h5.text_content('[data-testid="h5-status"]') == "未支付"
    assert "酸辣汤" in (await items.text_content() or "")
    assert "Hot and sour" not in (await items.text_content() or "")
    # An error on screen (a dish while the counter pays), then the switch.
    lock = await acquire(erp, "o-t12", "payment")
    await h5.click('[data-testid="add-rice"]')
    message = h5.locator('[data-testid="h5-message"]')
    await message.wait_for()
    assert await message.text_content() == "订单正在其他机器/顾客端进行支付，请稍后再试"
    await h5.select_option('[data-testid="lang-switch"]', "en")
    await h5.wait_for_function(
        "document.querySelector('[data-testid=h5-status]').textContent === 'unpaid'")
    assert (await message.text_content()
            == "This order is being paid elsewhere. Please try again shortly.")
    assert "Hot and sour soup" in (await items.text_content() or "")
    assert "酸辣汤" not in (await items.text_content() or "")

    # A force reason the ERP page gave in Chinese reads in English on an English dashboard.
    dash = await pages.open(f"{demo.http}/app/dashboard.html?lang=en")
    erp_page = await pages.open(f"{demo.http}/app/erp.html?table=T12")
    await erp_page.click('[data-testid="checkout"]')
    await erp_page.click('[data-testid="dialog-confirm"]')
    await erp_page.wait_for_selector('[data-testid="collect"]')
    line = dash.locator('[data-testid="feed"] li[data-event="lock.forced"][data-table="T12"]')
    await line.first.wait_for(timeout=3000)
    await dash.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="feed"] li[data-table="T12"]')]
            .some((li) => li.textContent.includes('the cashier chose to continue the checkout'))""",
        timeout=8000)
    await dash.select_option('[data-testid="lang-switch"]', "zh-CN")
    await dash.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="feed"] li[data-table="T12"]')]
            .some((li) => li.textContent.includes('收银台确认继续结账'))""")
    entries = (await demo.api("GET", "/audit?kind=lock.forced"))[1]["entries"]
    assert any(e["order_id"] == "o-t12" and e["detail"]["reason"] == "收银台确认继续结账"
               for e in entries)
    await erp.request("lock.release", order_id="o-t12", kind="payment", token=lock["token"])
    await erp.close()


async def test_erp_page_identity_words_toasts_and_cart(demo: DemoBroker, pages: Pages) -> None:
    one = await pages.open(f"{demo.http}/app/erp.html?table=T13&lang=en", own_context=True)
    two = await pages.open(f"{demo.http}/app/erp.html?table=T13&lang=en", own_context=True)
    ids = [await p.evaluate("window.tablelockClient.terminal.terminal_id") for p in (one, two)]
    assert ids[0] != ids[1] and "erp-cashier-2" not in ids, ids
    names = [await p.evaluate("window.tablelockClient.terminal.name") for p in (one, two)]
    assert names[0] != names[1] and "Cashier 2" not in names, names
    # Cashier language: no protocol words.
    main = await pages.open(f"{demo.http}/app/erp.html?role=erp_main&table=T13&lang=en",
                            own_context=True)
    text = await main.text_content("body") or ""
    assert "order.fetch" not in text and "lock service" not in text, text
    await main.click('[data-testid="new-order"]')
    await one.wait_for_selector('[data-testid="erp-total"]')
    # Stacked toasts never cover the activity log.
    for _ in range(5):
        await one.click('[data-testid="accept"]')
    await one.wait_for_selector('[data-testid="toast"]')
    log_box = await one.locator('[data-testid="erp-log"]').bounding_box()
    toasts = await one.locator(".toast").all()
    assert log_box is not None and 1 <= len(toasts) <= 3, toasts
    # A toast may time out between listing and measuring: measure those still shown.
    for box in [await t.bounding_box() for t in toasts]:
        if box is None:
            continue
        overlap = not (box["y"] + box["height"] <= log_box["y"]
                       or log_box["y"] + log_box["height"] <= box["y"])
        assert not overlap, (box, log_box)
    # A phone's payment lock: "Edit cart" is off, and says why.
    order_id = await one.evaluate(
        """[...window.tablelockClient.mirror("store:demo").orders.values()]
            .find((o) => o.table_id === "T13").order_id""")
    phone = await demo.connect("h5", "h5-t13", table="T13", name="T13")
    await acquire(phone, order_id, "payment")
    await one.wait_for_selector('[data-testid="edit-cart"]:disabled', timeout=2000)
    assert "paying on their phone" in (await one.text_content('[data-testid="edit-cart-reason"]')
                                       or "")
    await phone.close()


async def test_prices_agree_with_the_menu(demo: DemoBroker, pages: Pages) -> None:
    """One menu (demo/static/menu.json) for the simulation and the pages."""
    from tablelock_demo.terminals import MENU, add_dishes, money

    h5 = await pages.open(f"{demo.http}/app/h5.html?table=T14&lang=en", PHONE)
    for dish in MENU:
        button = h5.locator(f'[data-testid="add-{dish.sku}"]')
        text = await button.text_content() or ""
        assert dish.en in text and money(dish.price_cents) in text, (dish, text)
    body = order("o-t14", "T14", 1, 0, items=[])
    add_dishes(body, [MENU[0], MENU[0], MENU[5]])  # as the simulation orders
    body["amount_cents"] = sum(i["qty"] * i["price_cents"] for i in body["items"])
    erp = await demo.erp("erp-prices")
    assert (await erp.request("order.publish", order=body, change="modify"))["ok"]
    total = money(body["amount_cents"])
    await h5.wait_for_selector(f'[data-testid="h5-total"]:has-text("{total}")')
    items = await h5.text_content('[data-testid="h5-items"]') or ""
    assert money(2 * MENU[0].price_cents) in items and MENU[0].zh not in items, items
    await erp.close()


# --- screenshots ---------------------------------------------------------------------------


async def test_screenshots(demo: DemoBroker, pages: Pages, tmp_path: Path) -> None:
    """The dashboard with tables in every state, and the terminal pages, as artefacts. A store of
    its own keeps it tidy; its pages get their tokens in the URL (`#token=`), as a real
    deployment hands them."""
    store = "bistro"

    def url(page: str, role: str, sub: str, h5_table: str | None = None, **query: str) -> str:
        token = mint(store, role, sub, h5_table, name=query.pop("name", None))
        return (f"{demo.http}/app/{page}?{urllib.parse.urlencode({'lang': 'en', **query})}"
                f"#token={token}")

    main = await demo.erp("erp-front", "Front desk", store=store)
    cashier2 = await demo.erp("erp-cashier-2", "Cashier 2", role="erp_secondary", store=store)
    for i, table in enumerate(["T01", "T02", "T03", "T05", "T06", "T07", "T08", "T09", "T11"]):
        await publish(main, f"o-{table.lower()}", table, amount_cents=3000 + 1700 * i)
    # A phone's payment lock that lapses in 5 s, meanwhile the rest is set up: an expiry.
    assert (await demo.api("PUT", "/config", {"h5_payment_lock_ttl_ms": 5000}, store))[0] == 200
    phone9 = await demo.connect("h5", "h5-t09", table="T09", name="T09", store=store)
    lock9 = await acquire(phone9, "o-t09", "payment")
    assert (await demo.api("PUT", "/config", {"h5_payment_lock_ttl_ms": 30000}, store))[0] == 200

    dash = await pages.open(url("dashboard.html", "manager", "manager-1", name="Manager"))
    await dash.wait_for_selector(tile("T11", "ordering"))
    await acquire(main, "o-t02", "order")
    await acquire(cashier2, "o-t03", "presettle")
    phone7 = await demo.connect("h5", "h5-t07", table="T07", name="T07", store=store)
    await acquire(phone7, "o-t07", "payment")
    phone8 = await demo.connect("h5", "h5-t08", table="T08", name="T08", store=store)
    lock8 = await acquire(phone8, "o-t08", "payment")
    amount8 = 3000 + 1700 * 6
    service = mint(store, "service", "payment-service")
    for ref in ("pay-t08-1", "pay-t08-2"):  # the second is refused: reconcile it
        await ahttp("POST", f"{demo.http}/v1/stores/{store}/orders/o-t08/payment", service,
                    {"token": lock8["token"], "version": 1, "amount_cents": amount8,
                     "payment_ref": ref})
    # A phone paying now, from the H5 page (the ERP answers its order.fetch).
    h5 = await pages.open(url("h5.html", "h5", "h5-t05", "T05", name="T05"), PHONE)
    await h5.click('[data-testid="pay"]')
    await h5.wait_for_selector('[data-testid="countdown"]')
    erp = await pages.open(url("erp.html", "erp_secondary", "erp-page-1", name="Cashier 3",
                                table="T02"))
    await erp.wait_for_selector('[data-testid="erp-lock-order"]')
    await shoot(erp, tmp_path / "erp-T02.png")
    await shoot(h5, tmp_path / "h5-T05.png")
    await acquire(cashier2, "o-t07", "payment", force=True)  # a takeover

    for table, state in (("T01", "ordering"), ("T02", "editing"), ("T03", "prebilled"),
                         ("T04", "free"), ("T05", "paying"), ("T07", "paying"), ("T08", "paid")):
        await dash.wait_for_selector(tile(table, state), timeout=3000)
    await dash.wait_for_selector('[data-testid="reconcile"] li[data-id]', timeout=6000)
    expires_in = max(0.0, (lock9["expires_at"] - time.time() * 1000) / 1000)
    await dash.wait_for_selector(tile("T09", "ordering"), timeout=(expires_in + 3) * 1000)
    await dash.wait_for_selector('[data-testid="feed"] li[data-event="lock.expired"]')
    await asyncio.sleep(1.1)  # let the tiles' flash settle

    shot = await shoot(dash, tmp_path / "dashboard-1366x768.png")
    await dash.set_viewport_size(TABLET)  # type: ignore[arg-type]
    await asyncio.sleep(0.3)
    await shoot(dash, tmp_path / "dashboard-768x1024.png")
    assert shot.stat().st_size > 0
    for client in (main, cashier2, phone7, phone8, phone9):
        await client.close()


class SimulatedDemo(DemoBroker):
    """`tablelock demo` as a user runs it: the simulated store included."""

    command = ("demo", "--secret", SECRET, "--store", STORE, "--seed", "1")


@pytest.mark.timeout(180)
async def test_readme_screenshot(pages: Pages, tmp_path: Path) -> None:
    """The README's picture is the real `tablelock demo`'s dashboard once the store is busy.
    With TABLELOCK_WRITE_SCREENSHOT=1 it is written to docs/dashboard.png."""
    broker = await asyncio.to_thread(SimulatedDemo().start)
    try:
        dash = await pages.open(f"{broker.http}/app/dashboard.html?lang=en")
        await dash.wait_for_function(
            """() => {
                const tiles = [...document.querySelectorAll('[data-testid=table-map] .tile')];
                const busy = tiles.filter((t) => t.dataset.state !== 'free').length;
                const locked = tiles.some((t) => ['paying', 'editing', 'prebilled']
                    .includes(t.dataset.state));
                const feed = document.querySelectorAll('[data-testid=feed] li[data-event]');
                const online = document.querySelectorAll(
                    '[data-testid=terminals] [data-online=true]');
                return busy >= 8 && locked && feed.length >= 20 && online.length >= 6;
            }""", timeout=90_000, polling=250)
        await asyncio.sleep(1.1)  # let the tiles' flash settle
        shot = await shoot(dash, tmp_path / "dashboard.png")
        header = shot.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (
            LAPTOP["width"], LAPTOP["height"])
        if os.environ.get("TABLELOCK_WRITE_SCREENSHOT") == "1":
            target = ROOT / "docs" / "dashboard.png"
            shutil.copyfile(shot, target)
            print(f"wrote {target}")
    finally:
        await asyncio.to_thread(broker.stop)
