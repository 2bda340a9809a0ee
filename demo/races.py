"""The races a restaurant cares about (SCENARIOS.md), played on a table taken over.

Each race takes a table whose party is eating, plays its script through the
SDK, and normally ends with the table paid. Every expected refusal is caught,
counted (`code.<CODE>`) and logged with the prompt the screen would show; an
unexpected one stops the race (the race loop logs it) and the table goes back
to its own evening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tablelock_client import (
    ErpUnavailable,
    LockHandle,
    OrderLocked,
    PaymentLocked,
    PresettleLocked,
    TablelockError,
)

from .terminals import (
    BY_SKU,
    DESSERTS,
    DRINKS,
    REASONS,
    RICE,
    SimulatedTerminal,
    add_dishes,
    money,
    names,
    said,
    token_of,
)

if TYPE_CHECKING:
    from .simulation import Store, Table

log = logging.getLogger("tablelock.demo")

BARTENDER = "Li Wei (bar)"


@dataclass(frozen=True, slots=True)
class Race:
    name: str
    title: str
    play: Callable[[Store, random.Random, Table], Awaitable[None]]
    first_at: float  # store seconds after the start (+0-2 s, seeded)
    every: tuple[float, float]  # store seconds between two runs
    needs_main: bool = True  # the whole race needs the front desk online
    needs_phone: bool = True


def _ids(table: Table) -> tuple[str, str]:
    assert table.order_id is not None
    return table.order_id, table.table_id


async def _pay_then(store: Store, table: Table) -> None:
    """The party pays: on the phone if it can, else at the counter."""
    if not table.paid and await store.pay_by_phone(table) != "paid":
        await store.pay_at_counter(table)


async def _stale_payment(store: Store, table: Table, held: LockHandle, who: str,
                         payer: SimulatedTerminal) -> None:
    """A payment made with a lock that is no longer current: refused, for a refund. A phone's
    goes through the payment provider, which is told so."""
    if payer.role == "h5":
        if await store.through_provider(table, held, f"LATE-{held.order_id}-{held.token}",
                                        "WeChat Pay"):
            log.warning("%s's payment with an old lock went through", who)
        return
    try:
        await held.complete_payment(f"LATE-{held.order_id}-{held.token}")
    except TablelockError as exc:
        store.stats.refused(exc)
        log.info("%s pays anyway with its old lock: %s — recorded as payment.rejected, "
                 "to refund", who, said(exc))
        return
    log.warning("%s's payment with an old lock went through", who)
    store.paid(table, held.order_id)


async def counter_edits_while_customer_pays(store: Store, rng: random.Random,
                                            table: Table) -> None:
    """SCENARIOS 2: the front desk holds the order lock; the phone's pay is ORDER_LOCKED."""
    oid, tid = _ids(table)
    main, phone = store.main, table.phone
    assert phone is not None
    async with main.c.lock(oid, "order") as cart:
        log.info("%s opens %s's cart to change a dish (order lock, token %s)", main.name, tid,
                 token_of(cart))
        await store.sleep(1, 2, rng)
        try:
            stray = await phone.c.acquire(oid, "payment")
        except OrderLocked as exc:
            store.stats.refused(exc)
            log.info("%s phone: pay → %s", tid, said(exc))
        else:
            log.info("%s phone: pay was not refused (is strong link off?)", tid)
            await stray.release()
        if rng.random() < 0.5:
            await store.add_at(store.bar, table, [rng.choice(DRINKS)],
                               " (dishes may be added under the order lock)")
        await store.sleep(1.5, 3, rng)
        order = store.book.order(oid)
        edit: Callable[[dict[str, Any]], None]
        if order is not None and len(order["items"]) > 1:
            what = (f"takes {names([BY_SKU[order['items'][0]['sku']]])} off the bill "
                    "(the kitchen ran out)")
            edit = lambda o: o["items"].pop(0)  # noqa: E731
        else:
            what = "adds a rice"
            edit = lambda o: add_dishes(o, [RICE])  # noqa: E731
        placed = await store.book.publish(main, oid, "modify", edit, token=cart.token)
        log.info("%s %s and places the order (落单): v%d, %s; the order lock is released",
                 main.name, what, placed.version, money(placed.amount_cents))
    await store.sleep(0.5, 1.5, rng)
    await _pay_then(store, table)


async def two_cashiers(store: Store, rng: random.Random, table: Table) -> None:
    """SCENARIOS 1/3: the front desk is at the bill; cashier 2 gets PAYMENT_LOCKED, backs off."""
    oid, tid = _ids(table)
    main, other = store.main, store.cashier2
    async with main.c.lock(oid, "payment") as bill:
        order = bill.order
        log.info("%s opens %s's bill: %s (payment lock, token %s)", main.name, tid,
                 money(order.amount_cents if order else 0), token_of(bill))
        await store.sleep(0.5, 1.5, rng)
        try:
            stray = await other.c.acquire(oid, "payment")
        except PaymentLocked as exc:
            store.stats.refused(exc)
            log.info("%s opens the same bill: %s [can force: %s] — answers “no” and backs off",
                     other.name, said(exc), exc.can_force)
        else:
            log.info("%s opened the same bill unopposed (is strong link off?)", other.name)
            await stray.release()
        await store.sleep(1, 2.5, rng)
        await store.complete(table, bill, main, "card")
    await _pay_then(store, table)


async def cashier_forces(store: Store, rng: random.Random, table: Table) -> None:
    """SCENARIOS 5: a stalled checkout (the front desk's or the phone's) is forced by the bar."""
    oid, tid = _ids(table)
    phone, bar = table.phone, store.bar
    assert phone is not None
    if rng.random() < 0.5:
        victim, payer = f"{tid} phone", phone
        held = await phone.c.acquire(oid, "payment")
        log.info("%s: takes the payment lock (token %s) and stalls in the payment app", victim,
                 token_of(held))
    else:
        victim, payer = store.main.name, store.main
        held = await store.main.c.acquire(oid, "payment")
        log.info("%s opens %s's bill (payment lock, token %s) and is called away", victim, tid,
                 token_of(held))
    try:
        await store.sleep(2, 3.5, rng)
        try:
            taken = await bar.c.acquire(oid, "payment")
        except PaymentLocked as exc:
            store.stats.refused(exc)
            log.info("%s: checkout → %s [can force: %s] — the bartender confirms “continue”",
                     bar.name, said(exc), exc.can_force)
            taken = await bar.c.acquire(oid, "payment", force=True, operator=BARTENDER,
                                        reason=REASONS["bar_pays"])
        try:
            log.info("%s forces its way in: %s's payment lock (token %s) is revoked, the bar "
                     "holds token %s", bar.name, victim, token_of(held), token_of(taken))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await held.lost.wait()
            if rng.random() < 0.4:
                await _stale_payment(store, table, held, victim, payer)
            await store.sleep(1, 2, rng)
            if not table.paid:
                await store.complete(table, taken, bar, "card")
        finally:
            await taken.release()
    finally:
        await held.release()
    await _pay_then(store, table)


async def phone_lock_lapses(store: Store, rng: random.Random, table: Table) -> None:
    """SCENARIOS 4: the phone goes to the payment app and never comes back: lock.expired."""
    oid, tid = _ids(table)
    phone, main = table.phone, store.main
    assert phone is not None
    async with store.using_main():  # the phone's lock pulls the order from the front desk
        held = await phone.c.acquire(oid, "payment")
    if held.lock is None:
        log.info("%s phone: no lock to lapse (strong link is off)", tid)
        await store.phone_pays(table, held)
        return
    ttl_s = (held.lock.expires_at - held.lock.acquired_at) / 1000
    log.info("%s phone: takes the payment lock (token %s, %.0f s) for %s, opens the payment app… "
             "and never comes back", tid, held.token, ttl_s,
             money(held.order.amount_cents if held.order else 0))
    try:
        async with asyncio.timeout(ttl_s + 5):  # the broker's clock: not scaled
            await held.lost.wait()
        if held.lost_reason == "expired":
            log.info("%s: the phone's payment lock lapsed after %.0f s: the counter may change "
                     "the order again", tid, ttl_s)
        else:
            log.info("%s: the phone's payment lock ended (%s)", tid, held.lost_reason)
    except TimeoutError:
        log.warning("%s: no lock.expired %.0f s after the phone's lock was taken", tid,
                    ttl_s + 5)
    async with store.using_main():
        await store.add_at(main, table, [rng.choice(DESSERTS)], " after the lapse")
        if rng.random() < 0.5:
            await _stale_payment(store, table, held, f"{tid} phone", phone)
        await store.sleep(1, 2, rng)
        if not table.paid:
            log.info("%s phone: the guest reloads the order and pays again", tid)
        await _pay_then(store, table)


async def accept_while_paying(store: Store, rng: random.Random, table: Table) -> None:
    """SCENARIOS 6: a scanned dish is auto-accepted while the phone pays: ACCEPT_BLOCKED."""
    oid, tid = _ids(table)
    phone = table.phone
    assert phone is not None
    held = await phone.c.acquire(oid, "payment")
    try:
        log.info("%s phone: pays %s (payment lock, token %s) in the payment app", tid,
                 money(held.order.amount_cents if held.order else 0), token_of(held))
        await store.sleep(0.5, 1, rng)
        dish = rng.choice(DESSERTS)
        log.info("%s: a friend scans %s on another phone", tid, names([dish]))
        accepting = asyncio.create_task(store.auto_accept(table, [dish], patience=15))
        try:
            await store.sleep(2, 3.5, rng)
            if rng.random() < 0.5:
                await held.release()
                log.info("%s phone: the guest cancels the payment, so that the %s can be "
                         "accepted", tid, names([dish]))
                await asyncio.wait([accepting])
                await store.sleep(0.5, 1, rng)
            else:
                await store.complete(table, held, phone, "WeChat Pay")
                await asyncio.wait([accepting])  # its next try finds the order paid
        finally:
            accepting.cancel()
            await asyncio.wait([accepting])
    finally:
        await held.release()
    await _pay_then(store, table)


async def dish_after_prebill(store: Store, rng: random.Random, table: Table) -> None:
    """SCENARIOS 10: a pre-bill is printed, then a drink: PRESETTLE_LOCKED, forced in."""
    oid, tid = _ids(table)
    main, bar = store.main, store.bar
    drink = rng.choice(DRINKS)
    async with main.c.lock(oid, "presettle") as prebill:
        order = prebill.order
        log.info("%s prints %s's pre-bill (预结): %s at v%d — presettle lock, the amount is "
                 "frozen", main.name, tid, money(order.amount_cents if order else 0),
                 order.version if order else 0)
        await store.sleep(1.5, 3, rng)
        try:
            await store.book.publish(bar, oid, "add_items", lambda o: add_dishes(o, [drink]))
            log.info("%s added %s to %s unopposed (is strong link off?)", bar.name,
                     names([drink]), tid)
        except PresettleLocked as exc:
            store.stats.refused(exc)
            log.info("%s adds %s to %s: %s [can force: %s]", bar.name, names([drink]), tid,
                     said(exc), exc.can_force)
            await store.sleep(0.5, 1, rng)
            forced = await store.book.publish(
                bar, oid, "add_items", lambda o: add_dishes(o, [drink]), force=True,
                operator=BARTENDER, reason=REASONS["drink_after_prebill"])
            store.stats.bump("dishes")
            log.info("%s forces the drink in: the pre-bill is void, %s is now v%d, %s",
                     bar.name, oid, forced.version, money(forced.amount_cents))
    await store.sleep(1, 2, rng)
    if rng.random() < 0.5:
        await _pay_then(store, table)
        return
    again = await store.print_prebill(table)
    try:
        await store.pay_at_counter(table, main)
    finally:
        if again is not None:
            await again.release()
    await _pay_then(store, table)


async def erp_goes_offline(store: Store, rng: random.Random, table: Table) -> None:
    """SCENARIOS 9: the front desk drops off for ~10 s; the phone's pay is ERP_UNAVAILABLE."""
    oid, tid = _ids(table)
    phone, main = table.phone, store.main
    assert phone is not None
    outage = rng.uniform(9, 11)
    loop = asyncio.get_running_loop()
    await store.main_outage_begin()
    started = loop.time()
    log.info("%s loses its network: the ERP main is offline for ~%.0f s", main.name, outage)
    try:
        await store.sleep(0.5, 1.5, rng)
        try:
            held = await phone.c.acquire(oid, "payment")
        except ErpUnavailable as exc:
            store.stats.refused(exc)
            log.info("%s phone: pay → %s — the guest walks to the front desk", tid, said(exc))
        else:
            log.info("%s phone: got the payment lock without the front desk (strong link off?)",
                     tid)
            await store.phone_pays(table, held)
        if not table.paid:
            await store.sleep(2, 4, rng)
            await store.pay_at_counter(table, store.cashier2)
        await store.pace.sleep(outage - (loop.time() - started) * store.pace.speed)
    finally:
        task = asyncio.current_task()
        if task is None or not task.cancelling():
            await store.main_outage_end()
            log.info("%s is back online and answers order.fetch again", main.name)
    await _pay_then(store, table)


RACES: tuple[Race, ...] = (
    Race("lapse", "an H5 payment lock lapses after its TTL", phone_lock_lapses, 5,
         (30, 70), needs_main=False),
    Race("two_cashiers", "two cashiers open the same bill", two_cashiers, 8, (30, 70),
         needs_phone=False),
    Race("accept", "a scanned dish is auto-accepted while the order is being paid",
         accept_while_paying, 11, (30, 70)),
    Race("order_lock", "the customer pays while the counter edits the cart",
         counter_edits_while_customer_pays, 14, (30, 70)),
    Race("force", "a cashier forces past a stalled checkout", cashier_forces, 17, (30, 70)),
    Race("prebill", "a dish after the pre-bill is printed", dish_after_prebill, 20, (30, 70),
         needs_phone=False),
    Race("erp_offline", "the ERP goes offline during an H5 checkout", erp_goes_offline, 24,
         (60, 120), needs_main=False),
)
