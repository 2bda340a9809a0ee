"""The demo's simulated store against a real broker: it plays every race, pays nothing twice,
and its phones pay through the simulated payment provider.

A manager terminal follows the store channel from the start, as the dashboard
would; `simulate` runs in the test's loop at three times the speed for 20 s
(a minute of the store), then stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Iterator

import pytest
from tablelock_demo.simulation import simulate

from .support import TOKENS, BrokerProcess, WsClient, ahttp, mint, unique

RUN_S = 20.0
SPEED = 3.0
SEED = int(os.environ.get("TABLELOCK_DEMO_SEED", "7"))  # try others by hand


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def demo_broker() -> Iterator[BrokerProcess]:
    proc = BrokerProcess().start()
    yield proc
    proc.stop()


@pytest.mark.timeout(60)
async def test_the_simulated_store_plays_every_race(demo_broker: BrokerProcess) -> None:
    store = unique("demo")
    manager = await WsClient.connect(demo_broker.url, mint(store, "manager", "watcher"))
    subscribed = await manager.request("subscribe", channel=f"store:{store}")
    assert subscribed["ok"], subscribed
    collected = Collect()
    loggers = [logging.getLogger(name) for name in ("tablelock.demo", "tablelock_client")]
    for logger in loggers:
        logger.addHandler(collected)
    stats: dict[str, int] = {}
    stop = asyncio.Event()
    try:
        running = asyncio.create_task(simulate(demo_broker.url, TOKENS, store, seed=SEED,
                                               speed=SPEED, stop=stop, stats=stats))
        await asyncio.sleep(RUN_S)
        assert not running.done(), "simulate returned before it was told to stop"
        stop.set()
        await asyncio.wait_for(running, 10)  # returns, and raises nothing
    finally:
        for logger in loggers:
            logger.removeHandler(collected)
    await asyncio.sleep(0.2)  # the last events of the shutdown
    events = manager.drain_events()
    await manager.close()

    errors = [r for r in collected.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert stats.get("errors", 0) == 0, stats

    names = Counter(e["event"] for e in events)
    created = {e["order"]["order_id"] for e in events if e["event"] == "order.updated"}
    paid = [e["order"]["order_id"] for e in events if e["event"] == "order.paid"]
    assert len(created) >= 12, (len(created), stats)
    assert len(paid) >= 6, (paid, stats)
    assert len(paid) == len(set(paid))
    # A phone never records a payment: the payment provider's service does, with its token.
    payers = Counter(e["payment"]["by"]["role"] for e in events if e["event"] == "order.paid")
    assert payers["h5"] == 0 and payers["service"] >= 1, payers
    assert names["lock.forced"] >= 1, names  # a cashier forced past a lock; a forced publish
    assert names["lock.expired"] >= 1, names  # a phone's payment lock lapsed
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the store channel skipped"

    # Direct events and refusals, as the simulated terminals saw them.
    assert stats.get("event.lock.contended", 0) >= 1, stats
    for code in ("ACCEPT_BLOCKED", "ERP_UNAVAILABLE", "ORDER_LOCKED", "PAYMENT_LOCKED",
                 "PRESETTLE_LOCKED"):
        assert stats.get(f"code.{code}", 0) >= 1, (code, stats)
    for race in ("lapse", "two_cashiers", "accept", "order_lock", "force", "prebill",
                 "erp_offline"):
        assert stats.get(f"race.{race}", 0) >= 1, (race, stats)

    # Never two payments for one order, and every payment the channel told of is audited.
    status, body = await ahttp("GET", f"{demo_broker.http}/v1/stores/{store}/audit"
                               "?kind=payment.completed&limit=1000",
                               mint(store, "manager", "auditor"))
    assert status == 200, body
    audited = [entry["order_id"] for entry in body["entries"]]
    assert len(audited) == len(set(audited)), Counter(audited).most_common(3)
    assert set(audited) == set(paid)
    assert stats.get("payments", 0) <= len(paid), (stats, len(paid))
