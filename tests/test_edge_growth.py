"""Amplification, growth, scoping and cost at the internet edge (docs/security.md).

Each test performs the attack against real broker processes (and a real redis-server where
the backend matters) and asserts both the outcome and the bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Store
from .support import BrokerProcess, WsClient, unique

BrokerFactory = Callable[..., BrokerProcess]


def started(factory: BrokerFactory, backend: str, **env: object) -> BrokerProcess:
    """A dedicated broker whose TABLELOCK_<NAME> settings are the given ones."""
    return factory(backend=backend,
                   env={f"TABLELOCK_{k.upper()}": str(v) for k, v in env.items()}).start()


# --- 1. lock.contended is coalesced per holder, lock and requester ------------------------

async def test_refused_requests_repeated_tell_the_holder_once_per_window(
        broker_factory: BrokerFactory, backend_url: str) -> None:
    window_s = 1.5
    broker = started(broker_factory, backend_url, contended_window_ms=int(window_s * 1000))
    store = Store(broker)
    try:
        erp = await store.erp("erp")
        await store.publish(erp, order_id="o", table_id="t1")
        assert (await erp.request("lock.acquire", order_id="o", kind="order"))["ok"]
        phone = await store.connect("h5", "phone", table="t1")
        other = await store.connect("h5", "other-phone", table="t1")

        began = time.monotonic()
        replies = await asyncio.gather(*(
            phone.request("lock.acquire", order_id="o", kind="payment") for _ in range(300)))
        assert {r["error"]["code"] for r in replies} == {"ORDER_LOCKED"}
        # Another requester is other news: the holder hears of it too.
        assert not (await other.request("lock.acquire", order_id="o", kind="payment"))["ok"]
        await erp.request("ping")  # whatever was sent to the ERP before this has arrived
        elapsed = time.monotonic() - began
        notices = [f for f in erp.frames if f.get("event") == "lock.contended"]
        by_phone = [n for n in notices if n["by"]["terminal_id"] == "phone"]
        assert 1 <= len(by_phone) <= 1 + int(elapsed / window_s), (len(by_phone), elapsed)
        assert [n["by"]["terminal_id"] for n in notices].count("other-phone") == 1

        # Once the window has passed, the same requester is news again.
        await asyncio.sleep(window_s)
        count = len(by_phone)
        assert not (await phone.request("lock.acquire", order_id="o", kind="payment"))["ok"]
        await erp.event("lock.contended", where=lambda e: e["by"]["terminal_id"] == "phone")
        assert erp.close_code is None  # never closed as a slow consumer
        assert len([f for f in erp.frames if f.get("event") == "lock.contended"
                    and f["by"]["terminal_id"] == "phone"]) == count + 1
    finally:
        await store.close()
