"""(d) memory per connection flat: each broker's RSS and connections sampled through the
run, first third against last third of each broker's life."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

from .run import Run
from .settings import MEMORY_GROWTH_LIMIT


async def sample_memory(run: Run) -> None:
    interval = 2.0 if run.duration <= 300 else 10.0
    while not run.stopping:
        for index, broker in enumerate(run.brokers):
            rss = broker.rss_kb() if broker.up else None
            if run.front is None:
                conns: int | None = sum(1 for t in run.terms if t.link is not None
                                        and t.link.ready and t.link.broker == index)
            else:  # through nginx only the broker knows whose sockets it holds
                conns = await broker.connections() if rss is not None else None
            if rss is not None and conns:
                series = run.samples[(broker.name, broker.incarnation)]
                peak = max(conns, series[-1][3] if series else 0)
                series.append((time.monotonic() - broker.up_since, rss, conns, peak))
        await asyncio.sleep(interval)


def check_memory(run: Run) -> str:
    """(d): RSS per connection, first third against last third of each broker's life.

    Like is compared with like: only the samples taken at the broker's usual number of
    connections (the most common count, give or take one), so that a crowd passing through
    (broker B's clients while B is down) neither hides growth nor looks like it. With too
    few such samples, RSS is divided by the peak connections so far instead: memory taken
    for a crowd that left is not given back to the system.
    """
    check = run.checks["memory"]
    warm = max(20.0, 0.05 * run.duration)
    parts = []
    judged = 0
    for (name, incarnation), samples in sorted(run.samples.items()):
        usable = [s for s in samples if s[0] >= warm]
        label = f"{name}#{incarnation}"
        if len(usable) < 6:
            parts.append(f"{label}: {len(usable)} samples after warm-up, not judged")
            continue
        judged += 1
        usual = Counter(s[2] for s in usable).most_common(1)[0][0]
        steady = [s for s in usable if abs(s[2] - usual) <= 1]
        if len(steady) >= 6:
            series = [(rss / conns, rss) for _, rss, conns, _ in steady]
            basis = f"at ~{usual} conns"
        else:
            series = [(rss / peak, rss) for _, rss, _, peak in usable]
            basis = "per peak conns"
        third = len(series) // 3
        first = statistics.median(x for x, _ in series[:third])
        last = statistics.median(x for x, _ in series[-third:])
        growth = last / first - 1
        rss_first = statistics.median(r for _, r in series[:third]) / 1024
        rss_last = statistics.median(r for _, r in series[-third:]) / 1024
        parts.append(f"{label}: {first:.0f} -> {last:.0f} KiB/conn ({growth:+.0%}) {basis}, "
                     f"RSS {rss_first:.0f} -> {rss_last:.0f} MiB")
        if growth > MEMORY_GROWTH_LIMIT:
            check.fail(f"broker {label}: memory per connection grew {growth:+.0%}")
    if judged == 0:
        check.skipped = True
    return "; ".join(parts)

