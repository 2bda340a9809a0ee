"""The stores' day: processes started, stores configured, staff and phones connected and the
first orders published; then a seeded, steady stream of actions, one at a time per screen."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable

from .erp import ErpScreen
from .http_client import http
from .manager import ManagerScreen
from .mirror import Mirror
from .phone import PhoneScreen
from .run import Fatal, Run
from .screen import Screen
from .settings import STORE_CONFIG
from .store import StoreSim


async def setup(run: Run) -> None:
    run.redis.spawn()
    await run.redis.wait_ready()
    for broker in run.brokers:
        broker.spawn()
    await asyncio.gather(*(b.wait_ready() for b in run.brokers))
    if run.front is not None:
        run.front.spawn()
        await run.front.wait_ready()
    args = run.args
    for i in range(args.stores):
        store = StoreSim(f"s{i}", args.tables, random.Random(run.rng.getrandbits(64)))
        run.stores.append(store)
        manager_token = run.mint(store.store_id, "manager", "boss")
        for _ in range(50):  # a broker that just became ready may still answer 503 once
            status, body = await http("PUT", run.brokers[0].port,
                                      f"/v1/stores/{store.store_id}/config", manager_token,
                                      STORE_CONFIG)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise Fatal(f"PUT config answered {status}: {body}")
    staff: list[Screen] = []
    mains: list[ErpScreen] = []
    for i, store in enumerate(run.stores):
        main = ErpScreen(run, store, "erp_main", "erp-main", home=i % 2)
        mains.append(main)
        second = ErpScreen(run, store, "erp_secondary", "erp-2", home=(i + 1) % 2)
        team: list[Screen] = [main, second, ManagerScreen(run, store, "manager", "manager",
                                                          home=i % 2)]
        for term in team:
            term.mirrors[term.store_channel] = Mirror(term.store_channel)
            staff.append(term)
    run.terms.extend(staff)
    for term in staff:
        term.start()
    await wait_for(lambda: all(t.synced for t in staff), 30, "staff terminals to connect")
    for main in mains:  # the day's first orders
        for order_id in sorted(main.store.unpublished):
            await main.publish_new(order_id)
    phones: list[PhoneScreen] = []
    for i, store in enumerate(run.stores):
        for j, table in enumerate(store.tables):
            phone = PhoneScreen(run, store, f"phone-{table}", home=(i + j) % 2, table=table)
            phone.order_id = store.current[table]
            channel = phone.order_channel(phone.order_id)
            phone.mirrors[channel] = Mirror(channel)
            phones.append(phone)
    run.terms.extend(phones)
    for phone in phones:
        phone.start()
    await wait_for(lambda: all(t.synced for t in run.terms), 30, "phones to connect")


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise Fatal(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def traffic(run: Run) -> None:
    rng = random.Random(run.rng.getrandbits(64))
    by_store: dict[str, dict[str, list[Screen]]] = defaultdict(lambda: defaultdict(list))
    for term in run.terms:
        by_store[term.store.store_id][term.role].append(term)
    stores = sorted(by_store)
    next_at = time.monotonic()
    while time.monotonic() < run.traffic_end:
        next_at += rng.expovariate(run.args.rate)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        roles = by_store[rng.choice(stores)]
        r = rng.random()
        if r < 0.08:
            term = roles["manager"][0]
        elif r < 0.5:
            term = rng.choice(roles["erp_main"] + roles["erp_secondary"])
        else:
            term = rng.choice(roles["h5"])
        if term.busy:
            run.stats.skipped_busy += 1
        elif not term.ready:
            run.stats.skipped_offline += 1
        else:
            term.busy = True  # one action at a time per screen, from this moment
            run.spawn(term.step())

