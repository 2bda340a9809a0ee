"""Traffic has stopped: finish what is in flight, resolve uncertain payments, reconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .run import Run


async def settle(run: Run) -> None:
    """Traffic has stopped: finish what is in flight, resolve uncertain payments, reconnect."""
    run.final = True
    await wait_quietly(lambda: not any(t.busy for t in run.terms), 20)
    await wait_quietly(lambda: all(b.up for b in run.brokers), 20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(t.uncertain for t in run.terms):
        for term in run.terms:
            if term.uncertain and term.ready and not term.busy:
                term.busy = True
                run.spawn(term.step())
        await asyncio.sleep(0.3)
    for term in run.terms:
        run.stats.payments_unresolved += len(term.uncertain)
    await wait_quietly(lambda: all(t.synced for t in run.terms), 30)
    await asyncio.sleep(2.0)


async def wait_quietly(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True

