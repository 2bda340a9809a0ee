"""The faults, at seeded times: broker B SIGKILLed and restarted on its port, Redis SIGKILLed
and restarted on its AOF, Redis paused (SIGSTOP, then SIGCONT) right after a screen sent a
write, and reconnect storms. Also, without nginx, screens that fell over going home."""

from __future__ import annotations

import asyncio
import math
import random
import signal
import time

from .run import Run
from .screen import Screen
from .settings import PAUSE_S

# Minutes between two faults of a kind (at least one of each kind asked for in any run).
EVERY_MINUTES = {"broker": 8.0, "redis": 10.0, "storm": 6.0, "pause": 0.5}


def chaos_schedule(run: Run) -> list[tuple[float, str]]:
    """Seeded times of the faults: spread over 15%..85% of the run, in a shuffled order."""
    rng = random.Random(run.rng.getrandbits(64))
    minutes = run.duration / 60
    wanted = set(run.args.chaos.split(",")) if run.args.chaos else set()
    kinds = [kind for kind, every in EVERY_MINUTES.items()
             if kind in wanted for _ in range(max(1, round(minutes / every)))]
    rng.shuffle(kinds)
    if not kinds:
        return []
    slot = 0.7 * run.duration / len(kinds)
    return [(0.15 * run.duration + slot * (n + 0.5) + rng.uniform(-slot / 4, slot / 4), kind)
            for n, kind in enumerate(kinds)]


async def chaos(run: Run) -> None:
    rng = random.Random(run.rng.getrandbits(64))
    for at, kind in chaos_schedule(run):
        await asyncio.sleep(max(0.0, run.t0 + at - time.monotonic()))
        if time.monotonic() >= run.traffic_end:
            return
        started = run.elapsed()
        if kind == "broker":
            line = await kill_broker(run, rng)
        elif kind == "redis":
            line = await kill_redis(run, rng)
        elif kind == "pause":
            line = await pause_redis(run)
        else:
            line = storm(run, rng)
        if line:
            run.faults[kind] += 1
            run.chaos_log.append(f"t={started:6.1f}s {line}")


async def kill_broker(run: Run, rng: random.Random) -> str:
    broker = run.brokers[1]
    if run.front is None:
        dropped: int | None = sum(1 for t in run.terms
                                  if t.link is not None and t.link.broker == 1)
    else:
        dropped = await broker.connections()
    started = time.monotonic()
    run.kills.append(time.time() * 1000)
    broker.kill()
    await asyncio.sleep(rng.uniform(0.5, 3.0))
    spawned = time.monotonic()
    broker.spawn()
    await broker.wait_ready()
    return (f"SIGKILL broker B ({dropped} sockets), back after "
            f"{time.monotonic() - started:.1f}s (start {time.monotonic() - spawned:.1f}s)")


async def kill_redis(run: Run, rng: random.Random) -> str:
    started = time.monotonic()
    run.redis.kill()
    await asyncio.sleep(rng.uniform(1.0, 4.0))  # a restart on its AOF takes seconds
    run.redis.spawn()
    await run.redis.wait_ready()
    return f"SIGKILL redis-server, back on its AOF after {time.monotonic() - started:.1f}s"


async def pause_redis(run: Run) -> str:
    """SIGSTOP redis-server as soon as a screen has sent a write (the broker's commit of it
    is then on its way to a stalled Redis, or just ran), SIGCONT after PAUSE_S: longer than
    the brokers' Redis socket timeout, so the commit's reply is lost to them."""
    run.pause_armed = asyncio.get_running_loop().create_future()
    try:
        what = await asyncio.wait_for(asyncio.shield(run.pause_armed), 10)
    except TimeoutError:
        return ""  # no write within 10 s (everyone offline): no pause
    finally:
        run.pause_armed = None
    stopped = time.monotonic()
    run.redis.stop_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_S)
    finally:
        run.redis.stop_signal(signal.SIGCONT)
    run.pauses.append((stopped, time.monotonic()))
    return f"SIGSTOP redis-server right after {what} was sent, SIGCONT {PAUSE_S:g}s later"


def storm(run: Run, rng: random.Random) -> str:
    victims = [t for t in run.terms if t.ready]
    victims = rng.sample(victims, math.ceil(len(victims) * rng.uniform(0.5, 1.0)))
    for term in victims:
        term.abort()
    return f"reconnect storm: {len(victims)} sockets dropped at once"


async def rebalance(run: Run) -> None:
    """Clients that fell over to broker A come back to B some time after it is back: when
    they pick their broker, they go home; through nginx, a tenth of them reconnect every 2 s
    (round-robin sends about half to B) while B holds under a third of the sockets."""
    rng = random.Random(run.rng.getrandbits(64))
    while not run.final:
        await asyncio.sleep(2.0)
        if run.front is None:
            movers = [term for term in run.terms if _away_from_home(run, term)
                      and rng.random() < 0.25]
        else:
            movers = await _crowded_on_a(run, rng)
        for term in movers:
            if not run.final:
                run.stats.migrations += 1
                run.spawn(term.close_gracefully())


def _away_from_home(run: Run, term: Screen) -> bool:
    link = term.link
    home = run.brokers[term.home]
    return (link is not None and link.ready and link.broker != term.home and home.up
            and time.monotonic() - home.up_since > 3)


async def _crowded_on_a(run: Run, rng: random.Random) -> list[Screen]:
    b = run.brokers[1]
    if not b.up or time.monotonic() - b.up_since <= 3:
        return []
    ready = [term for term in run.terms if term.ready]
    on_b = await b.connections()
    if on_b is None or on_b * 3 >= len(ready):
        return []
    return rng.sample(ready, max(1, len(ready) // 10))
