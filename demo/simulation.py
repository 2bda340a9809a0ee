"""The simulated store of `tablelock demo`: a restaurant that never stops.

Three ERP terminals (the front desk, which owns the order book and answers the
broker's `order.fetch`, a second cashier and the bar) and a dozen tables, each
with the phone of the party seated at it, play a dining cycle through the
Python SDK: seated, ordering, eating (dishes added from the phone, the front
desk or the bar), sometimes a pre-bill, paying, gone, and a new party with a
new order. On top of that the races that tablelock exists for (races.py) are
played, each every 30-70 s (the ERP outage every 60-120 s), all of them once
in the first half minute, each told in human lines of the `tablelock.demo` log.

Timing is random but seeded: every table and every race has a `random.Random`
of its own, derived from `seed`. Every wait is in store seconds divided by
`speed`. The broker's deadlines (the H5 payment lock's TTL) are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tablelock.auth import Tokens
from tablelock_client import (
    ErpUnavailable,
    LockHandle,
    OrderLocked,
    OrderPaid,
    PaymentLocked,
    StoreMirror,
    TablelockError,
    Unavailable,
)

from .provider import Charge, PaymentProvider
from .terminals import (
    CONFIG_ERRORS,
    DESSERTS,
    DISHES,
    DRINKS,
    REASONS,
    Book,
    Dish,
    Pace,
    SimulatedTerminal,
    Stats,
    add_dishes,
    http_base,
    money,
    names,
    put_config,
    said,
    token_of,
    wait_listening,
)

log = logging.getLogger("tablelock.demo")

H5_TTL_MS = 8_000  # the demo store's H5 payment lock, at speed 1 (the broker's floor is 5 s)


@dataclass(eq=False)
class Table:
    table_id: str
    rng: random.Random
    stage: str = "free"  # free, seated, eating, paying, paid, leaving
    order_id: str | None = None
    phone: SimulatedTerminal | None = None
    paid: bool = False
    parties: int = 0
    claimed: str | None = None  # the race playing this table now
    race_over: asyncio.Event = field(default_factory=asyncio.Event)


async def simulate(url: str, tokens: Tokens, store_id: str, *, seed: int = 1, tables: int = 12,
                   speed: float = 1.0, stop: asyncio.Event | None = None,
                   stats: dict[str, int] | None = None) -> None:
    """Play the store against the broker at `url` until cancelled or `stop` is set.

    `stats`, if given, is filled with counters: `orders`, `dishes`, `payments`,
    `race.<name>`, `code.<CODE>` (refusals seen), `event.<name>` (lock events a
    holder received), `errors` (bugs: there should be none).
    """
    store = Store(url, tokens, store_id, seed=seed, tables=tables, speed=speed, stats=stats)
    runner = asyncio.create_task(store.run(), name="tablelock-demo")
    waiter = asyncio.create_task(stop.wait()) if stop is not None else None
    try:
        await asyncio.wait([t for t in (runner, waiter) if t is not None],
                           return_when=asyncio.FIRST_COMPLETED)
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            log.error("the simulation stopped", exc_info=runner.exception())
            await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        for task in (runner, waiter):
            if task is not None:
                task.cancel()
        await asyncio.wait([t for t in (runner, waiter) if t is not None])
        await store.shutdown()
        log.info("simulated store %r stopped", store_id)


class Store:
    """The restaurant: its ERP terminals, its tables and their phones, and the races."""

    def __init__(self, url: str, tokens: Tokens, store_id: str, *, seed: int, tables: int,
                 speed: float, stats: dict[str, int] | None) -> None:
        self.url = url
        self.tokens = tokens
        self.store_id = store_id
        self.seed = seed
        self.pace = Pace(speed)
        self.stats = Stats(stats)
        self.book = Book()
        self.main = self.terminal("erp-front-desk", "erp_main", "前台 Front desk",
                                  order_fetch=self.book.fetch)
        self.cashier2 = self.terminal("erp-cashier-2", "erp_secondary", "Cashier 2")
        self.bar = self.terminal("erp-bar", "erp_secondary", "Bar")
        self.tables = [Table(f"T{i:02d}", self.rng(f"table/{i}")) for i in range(1, tables + 1)]
        self.provider = PaymentProvider(http_base(url), tokens, speed=speed,
                                        rng=self.rng("provider"))
        self.main_ready = asyncio.Event()  # the front desk is online and not about to go
        self.main_users = 0
        # Order numbers start from the clock, so a demo on Redis never reuses one.
        self._numbers = itertools.count(int(time.time()) % 90_000 + 10_000)
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- plumbing -------------------------------------------------------------------------

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    def terminal(self, sub: str, role: str, name: str, **kw: Any) -> SimulatedTerminal:
        return SimulatedTerminal(self.url, self.tokens, self.store_id, self.stats, sub=sub,
                                 role=role, name=name, **kw)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sleep(self, lo: float, hi: float | None = None,
                    rng: random.Random | None = None) -> None:
        await self.pace.sleep(lo if hi is None else (rng or random).uniform(lo, hi))

    @contextlib.asynccontextmanager
    async def using_main(self) -> AsyncIterator[None]:
        """A step that needs the front desk: waits while it is offline, delays its outage."""
        await self.main_ready.wait()
        self.main_users += 1
        try:
            yield
        finally:
            self.main_users -= 1

    async def main_outage_begin(self) -> None:
        self.main_ready.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pace.real(20)
        while self.main_users > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.main.close()

    async def main_outage_end(self) -> None:
        await self.main.connect_retrying(self.pace, store_channel=True)
        self.main_ready.set()

    def counter(self, rng: random.Random) -> SimulatedTerminal:
        """A cashier who is online (the front desk or cashier 2), else the bar."""
        online = [t for t in (self.main, self.cashier2) if t.online]
        return rng.choice(online) if online else self.bar

    # --- life -----------------------------------------------------------------------------

    async def run(self) -> None:
        from .races import RACES

        log.info("simulated store %r: %d tables, seed %d, speed %g", self.store_id,
                 len(self.tables), self.seed, self.pace.speed)
        await wait_listening(self.url)
        await asyncio.gather(*(t.connect_retrying(self.pace, store_channel=True)
                               for t in (self.main, self.cashier2, self.bar)))
        self.main_ready.set()
        await self.configure()
        seating = self.rng("seating")
        at = 0.5
        for table in seating.sample(self.tables, len(self.tables)):
            self.spawn(self.table_life(table, at), f"demo-{table.table_id}")
            at += seating.uniform(1.0, 3.5)
        for race in RACES:
            first = race.first_at + self.rng(f"first/{race.name}").uniform(0, 2)
            self.spawn(self.race_loop(race, first), f"demo-race-{race.name}")
        self.spawn(self.reconcile(), "demo-reconcile")
        await asyncio.Event().wait()  # until cancelled

    async def configure(self) -> None:
        """The H5 payment lock lasts 8 s (at speed 1): the lapse race stays watchable."""
        ttl = max(5_000, min(300_000, round(H5_TTL_MS / self.pace.speed)))
        try:
            config = await put_config(self.url, self.tokens, self.store_id,
                                      {"h5_payment_lock_ttl_ms": ttl})
            log.info("store %r: an H5 payment lock lasts %.1f s", self.store_id,
                     int(config.get("h5_payment_lock_ttl_ms", ttl)) / 1000)
        except CONFIG_ERRORS as exc:
            log.warning("could not set the H5 payment lock TTL (%s): the store's own applies",
                        exc)

    async def reconcile(self) -> None:
        """The front desk re-publishes open orders the broker does not know: a broker that
        restarted without its state (memory backend), say. Checked twice before acting."""
        missing_before: set[str] = set()
        while True:
            await self.pace.sleep(3)
            if not self.main.online:
                missing_before = set()
                continue
            try:
                client = self.main.c
                mirror = client.mirror(client.store_channel)
                if not isinstance(mirror, StoreMirror) or client.stale or mirror.stale:
                    missing_before = set()
                    continue
                missing = {oid for oid in self.book.open_orders() if oid not in mirror.orders}
                for oid in sorted(missing & missing_before):
                    try:
                        order = await self.book.publish(self.main, oid, "modify",
                                                        lambda o: None)
                        log.info("%s publishes order %s again, which the broker did not "
                                 "know: v%d", self.main.name, oid, order.version)
                    except OrderPaid:
                        self.book.mark_paid(oid)
                missing_before = missing
            except TablelockError as exc:
                log.info("%s: checking the broker's orders: %s", self.main.name, said(exc))
                missing_before = set()
            except Exception:
                log.exception("checking the broker's orders failed")
                self.stats.bump("errors")

    async def shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        phones = [t.phone for t in self.tables if t.phone is not None]
        await asyncio.gather(*(t.close() for t in (*phones, self.main, self.cashier2, self.bar)))

    # --- a table's evenings ---------------------------------------------------------------

    async def table_life(self, table: Table, first_at: float) -> None:
        await self.pace.sleep(first_at)
        while True:
            try:
                await self.dine(table)
            except TablelockError as exc:
                log.warning("%s: %s", table.table_id, said(exc))
            except Exception:
                log.exception("%s: the simulation of this table failed", table.table_id)
                self.stats.bump("errors")
            try:
                await self.clear(table)
            except Exception:
                log.exception("%s: clearing the table failed", table.table_id)
                self.stats.bump("errors")
            await self.sleep(8, 20, table.rng)  # the table is cleared and laid

    async def dine(self, table: Table) -> None:
        rng, tid = table.rng, table.table_id
        table.parties += 1
        table.paid = False
        table.order_id = None
        table.stage = "seated"
        phone = self.terminal(f"h5-{tid}-{table.parties}", "h5", f"Phone {tid}", table=tid)
        try:
            await phone.connect()
            table.phone = phone
        except TablelockError as exc:
            log.info("%s: the phone cannot connect (%s): the waiter takes the order", tid,
                     said(exc))
        guests = rng.randint(2, 6)
        log.info("%s: a party of %d sits down%s", tid, guests,
                 " and scans the table's QR code" if table.phone else "")
        await self.sleep(3, 6, rng)  # the menu
        dishes = rng.sample(DISHES, min(len(DISHES), 1 + guests // 2 + rng.randint(0, 1)))
        dishes += [rng.choice(DRINKS) for _ in range(rng.randint(0, 2))]
        if not await self.open_order(table, f"{tid}-{next(self._numbers)}", dishes):
            return
        table.stage = "eating"
        for _ in range(rng.randint(1, 3)):
            await self.sleep(8, 16, rng)
            if await self.yield_to_race(table):
                return
            await self.more_dishes(table)
        await self.sleep(4, 10, rng)
        if await self.yield_to_race(table):
            return
        table.stage = "paying"
        await self.settle(table)

    async def yield_to_race(self, table: Table) -> bool:
        """While a race plays this table, wait; True if the race got it paid."""
        while table.claimed is not None:
            await table.race_over.wait()
        return table.paid

    async def open_order(self, table: Table, order_id: str, dishes: list[Dish]) -> bool:
        tid = table.table_id
        how = "orders on the phone" if table.phone else "orders with the waiter"
        for attempt in range(12):
            try:
                order = await self.book.publish(self.main, order_id, "add_items",
                                                lambda o: add_dishes(o, dishes), table_id=tid)
            except TablelockError as exc:
                if attempt == 0:
                    log.info("%s: the order waits for the front desk (%s)", tid, said(exc))
                await self.sleep(2)
                continue
            table.order_id = order_id
            self.stats.bump("orders")
            log.info("%s: %s %s; %s opens order %s: v%d, %s", tid, how, names(dishes),
                     self.main.name, order_id, order.version, money(order.amount_cents))
            if table.phone is not None:
                try:
                    await table.phone.follow(table.phone.c.order_channel(order_id))
                except TablelockError as exc:
                    log.info("%s phone: cannot follow the order (%s)", tid, said(exc))
            return True
        log.warning("%s: the party gave up waiting for the front desk", tid)
        return False

    async def more_dishes(self, table: Table) -> None:
        rng = table.rng
        roll = rng.random()
        if table.phone is not None and roll < 0.65:
            await self.scan_dish(table, [rng.choice(DISHES + DESSERTS)])
        elif roll < 0.85:
            await self.add_at(self.main, table, [rng.choice(DISHES)])
        else:
            await self.add_at(self.bar, table, [rng.choice(DRINKS)])

    async def scan_dish(self, table: Table, dishes: list[Dish]) -> None:
        """A dish from scan-to-order: the phone checks, the front desk auto-accepts it."""
        assert table.phone is not None and table.order_id is not None
        tid = table.table_id
        try:
            check = await table.phone.c.check(table.order_id, "add_items")
        except TablelockError as exc:
            log.info("%s phone: cannot add a dish: %s", tid, said(exc))
            return
        if not check.allowed:
            self.stats.refused(check.code or "REFUSED")
            log.info("%s phone: cannot add %s now: %s “%s”", tid, names(dishes), check.code,
                     check.message)
            return
        log.info("%s phone: scans %s", tid, names(dishes))
        await self.auto_accept(table, dishes)

    async def auto_accept(self, table: Table, dishes: list[Dish], patience: int = 8) -> bool:
        """The front desk accepts a scanned dish: `check accept` first, retried while blocked."""
        oid, tid, main = table.order_id, table.table_id, self.main
        assert oid is not None
        told = False
        for _ in range(patience):
            try:
                check = await main.c.check(oid, "accept")
                if check.allowed:
                    order = await self.book.publish(main, oid, "add_items",
                                                    lambda o: add_dishes(o, dishes))
                    self.stats.bump("dishes")
                    log.info("%s auto-accepts %s for %s: v%d, %s", main.name, names(dishes), tid,
                             order.version, money(order.amount_cents))
                    return True
                self.stats.refused(check.code or "REFUSED")
                if check.code == "ORDER_PAID":
                    log.info("%s: %s is paid already: the scanned %s is declined", main.name,
                             oid, names(dishes))
                    return False
                if not told:
                    log.info("%s cannot accept %s's %s: %s toast “%s” — retries after the "
                             "payment", main.name, tid, names(dishes), check.code, check.message)
            except OrderPaid:
                log.info("%s: %s is paid already: the scanned %s is declined", main.name, oid,
                         names(dishes))
                return False
            except TablelockError as exc:
                self.stats.refused(exc)
                if not told:
                    log.info("%s: %s's %s waits: %s", main.name, tid, names(dishes), said(exc))
            told = True
            await self.sleep(1.0, 1.5, table.rng)
        log.info("%s: %s's %s could not be accepted; the waiter will sort it out", main.name,
                 tid, names(dishes))
        return False

    async def add_at(self, erp: SimulatedTerminal, table: Table, dishes: list[Dish],
                     note: str = "") -> bool:
        """A waiter (front desk) or the bar adds dishes: published from that terminal."""
        assert table.order_id is not None
        try:
            order = await self.book.publish(erp, table.order_id, "add_items",
                                            lambda o: add_dishes(o, dishes))
        except TablelockError as exc:
            self.stats.refused(exc)
            log.info("%s cannot add %s to %s: %s", erp.name, names(dishes), table.table_id,
                     said(exc))
            return False
        self.stats.bump("dishes")
        log.info("%s adds %s to %s%s: v%d, %s", erp.name, names(dishes), table.table_id, note,
                 order.version, money(order.amount_cents))
        return True

    # --- paying -----------------------------------------------------------------------------

    async def settle(self, table: Table) -> None:
        rng = table.rng
        prebill = await self.print_prebill(table) if rng.random() < 0.3 else None
        try:
            by_phone = table.phone is not None and rng.random() < 0.6
            if by_phone and await self.pay_by_phone(table) == "paid":
                return
            for round_ in range(3):
                if await self.pay_at_counter(table, force_after=2 if round_ == 2 else None):
                    return
                await self.sleep(3, 6, rng)
            log.warning("%s: the bill could not be paid", table.table_id)
        finally:
            if prebill is not None:
                await prebill.release()

    async def print_prebill(self, table: Table) -> LockHandle | None:
        main, oid = self.main, table.order_id
        assert oid is not None
        try:
            prebill = await main.c.acquire(oid, "presettle")
        except TablelockError as exc:
            log.info("%s cannot print %s's pre-bill: %s", main.name, table.table_id, said(exc))
            return None
        order = prebill.order
        log.info("%s prints %s's pre-bill (预结): %s at v%d — presettle lock, the amount is "
                 "frozen", main.name, table.table_id, money(order.amount_cents if order else 0),
                 order.version if order else 0)
        await self.sleep(2, 5, table.rng)
        return prebill

    async def pay_by_phone(self, table: Table, tries: int = 4) -> str:
        """Scan-to-order checkout. Returns `paid`, or `counter` (pay at the front desk)."""
        phone, oid, tid = table.phone, table.order_id, table.table_id
        assert oid is not None
        if phone is None or not phone.online:
            return "counter"
        for _ in range(tries):
            try:
                held = await phone.c.acquire(oid, "payment")
            except OrderPaid:
                table.paid = True
                return "paid"
            except ErpUnavailable as exc:
                self.stats.refused(exc)
                log.info("%s phone: pay → %s — the guest walks to the front desk", tid,
                         said(exc))
                return "counter"
            except (OrderLocked, PaymentLocked) as exc:
                self.stats.refused(exc)
                log.info("%s phone: pay → %s", tid, said(exc))
                await self.sleep(2, 4, table.rng)
                continue
            except TablelockError as exc:
                self.stats.refused(exc)
                log.info("%s phone: pay → %s — pays at the counter instead", tid, said(exc))
                return "counter"
            if await self.phone_pays(table, held):
                return "paid"
            if table.paid:
                return "paid"
        return "counter"

    async def phone_pays(self, table: Table, held: LockHandle) -> bool:
        assert table.phone is not None
        order = held.order
        log.info("%s phone: pays %s for v%d in the payment app (payment lock, token %s)",
                 table.table_id, money(order.amount_cents if order else 0),
                 order.version if order else 0, token_of(held))
        await self.sleep(1.5, 4, table.rng)
        return await self.complete(table, held, table.phone, "WeChat Pay")

    async def pay_at_counter(self, table: Table, cashier: SimulatedTerminal | None = None, *,
                             force_after: int | None = None) -> bool:
        """A cashier takes the payment lock and charges the table; backs off when refused."""
        rng, oid, tid = table.rng, table.order_id, table.table_id
        assert oid is not None
        attempts = 4 if force_after is None else force_after + 1
        for attempt in range(attempts):
            if cashier is None or not cashier.online:
                cashier = self.counter(rng)
            force = attempt == force_after
            try:
                held = await cashier.c.acquire(
                    oid, "payment", force=force,
                    operator=f"{cashier.name} staff" if force else None,
                    reason=REASONS["counter_waiting"] if force else None)
            except OrderPaid:
                table.paid = True
                return True
            except TablelockError as exc:
                self.stats.refused(exc)
                log.info("%s opens %s's bill: %s — backs off", cashier.name, tid, said(exc))
                await self.sleep(2, 4, rng)
                continue
            try:
                order = held.order
                log.info("%s opens %s's bill: %s at v%d (payment lock, token %s%s)", cashier.name,
                         tid, money(order.amount_cents if order else 0),
                         order.version if order else 0, token_of(held),
                         f", forced past {len(held.forced_locks)} lock(s)" if held.forced_locks
                         else "")
                await self.sleep(1, 3, rng)
                if await self.complete(table, held, cashier,
                                       rng.choice(("card", "cash", "Alipay QR"))):
                    return True
            finally:
                await held.release()
            if table.paid:
                return True
        return False

    async def complete(self, table: Table, held: LockHandle, payer: SimulatedTerminal,
                       method: str) -> bool:
        """`payment.complete` under `held`; a lost answer is retried with the same ref. A phone
        pays through the payment provider instead (`through_provider`)."""
        oid = held.order_id
        ref = f"{method.split()[0].upper()}-{oid}-{held.token}"
        if payer.role == "h5":
            return await self.through_provider(table, held, ref, method)
        who = payer.name
        for _ in range(3):
            try:
                result = await held.complete_payment(ref)
            except OrderPaid as exc:
                self.stats.refused(exc)
                table.paid = True
                log.info("%s: payment → %s (a second payment, recorded as payment.rejected)",
                         who, said(exc))
                return False
            except Unavailable as exc:  # Disconnected too: the answer may be lost, not the money
                if not payer.online:
                    log.info("%s: payment → %s", who, said(exc))
                    return False
                log.info("%s: no answer to the payment (%s): retries with the same ref %s",
                         who, said(exc), ref)
                with contextlib.suppress(TimeoutError, TablelockError):
                    await payer.c.wait_fresh(5)
                continue
            except TablelockError as exc:
                self.stats.refused(exc)
                log.info("%s: payment → %s (recorded as payment.rejected)", who, said(exc))
                return False
            self.paid(table, oid)
            log.info("%s: paid %s by %s — order %s v%d is paid", who,
                     money(result.order.amount_cents), method, oid, result.order.version)
            return True
        return False

    async def through_provider(self, table: Table, held: LockHandle, ref: str,
                               method: str) -> bool:
        """A phone pays in the payment app; the provider confirms, and the platform's payment
        service records it with the phone's lock token (role `service`, over HTTP)."""
        oid, tid = held.order_id, table.table_id
        order = held.order
        charge = Charge(self.store_id, oid, held.token, order.version if order else 0,
                        order.amount_cents if order else 0, ref)
        settled = await self.provider.charge(charge)
        if settled.status == "paid":
            self.paid(table, oid)
            log.info("%s phone: paid %s by %s; the payment service recorded it — order %s "
                     "v%d is paid", tid, money(charge.amount_cents), method, oid, charge.version)
            return True
        if settled.code == "ORDER_PAID":
            table.paid = True
        if settled.status == "refused":
            self.stats.refused(settled.code or "REFUSED")
            log.info("%s phone: the payment service could not record %s: %s “%s” — recorded "
                     "as payment.rejected, to refund", tid, ref, settled.code, settled.message)
        else:
            log.info("%s phone: the payment service got no answer for %s (%s)", tid, ref,
                     settled.message)
        with contextlib.suppress(TablelockError):
            await held.release()
        return False

    def paid(self, table: Table, order_id: str) -> None:
        self.book.mark_paid(order_id)
        table.paid = True
        self.stats.bump("payments")

    async def clear(self, table: Table) -> None:
        """The party leaves: the front desk closes the bill, the phone goes, the table is free."""
        table.stage = "leaving"
        oid, tid = table.order_id, table.table_id
        if oid is not None:
            if not table.paid:
                log.warning("%s: the party left without paying order %s", tid, oid)
            await self.sleep(1, 3, table.rng)
            try:
                await self.book.publish(self.main, oid, "status",
                                        lambda o: o.update(status="closed"))
                log.info("%s: the party leaves; %s closes order %s", tid, self.main.name, oid)
            except TablelockError as exc:
                log.info("%s: the party leaves; order %s is not closed (%s)", tid, oid,
                         said(exc))
            self.book.forget(oid)
        phone, table.phone = table.phone, None
        if phone is not None:
            await phone.close()
        table.order_id = None
        table.stage = "free"

    # --- races --------------------------------------------------------------------------------

    async def claim(self, rng: random.Random, race: str, *, phone: bool) -> Table:
        """Wait for a table whose party is eating, and take it over for a race."""
        while True:
            ready = [t for t in self.tables
                     if t.stage == "eating" and t.claimed is None and t.order_id is not None
                     and not t.paid
                     and (not phone or (t.phone is not None and t.phone.online))]
            if ready:
                table = rng.choice(ready)
                table.claimed = race
                table.race_over = asyncio.Event()
                return table
            await self.pace.sleep(1.0)

    def unclaim(self, table: Table) -> None:
        if table.paid:
            table.stage = "paid"  # not to be claimed again before the party leaves
        table.claimed = None
        table.race_over.set()

    async def race_loop(self, race: Any, first_at: float) -> None:
        rng = self.rng(f"race/{race.name}")
        await self.pace.sleep(first_at)
        while True:
            if race.needs_main:
                await self.main_ready.wait()
            table = await self.claim(rng, race.name, phone=race.needs_phone)
            self.stats.bump(f"race.{race.name}")
            log.info("race · %s — %s, order %s", race.title, table.table_id, table.order_id)
            pause = race.every
            try:
                if race.needs_main:
                    async with self.using_main():
                        await race.play(self, rng, table)
                else:
                    await race.play(self, rng, table)
            except TablelockError as exc:
                log.warning("race · %s at %s stopped: %s", race.title, table.table_id, said(exc))
                pause = (5, 10)  # not played out: again soon
            except Exception:
                log.exception("race · %s at %s failed", race.title, table.table_id)
                self.stats.bump("errors")
            finally:
                self.unclaim(table)
            await self.sleep(pause[0], pause[1], rng)
