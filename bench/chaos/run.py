"""The run's shared record: its processes, stores and screens, every numbered event any
observer saw, the grants and payments answered, the faults landed, and the checks' verdicts."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tablelock.auth import Tokens

from ..history import History
from .mirror import Ev, canonical, compact
from .processes import BrokerProc, NginxProc, RedisProc
from .settings import SECRET, Frame
from .store import StoreSim

if TYPE_CHECKING:
    from .connection import Connection, Link
    from .screen import Screen


class Fatal(Exception):
    """The run itself could not go on (a process that would not start)."""


@dataclass
class Check:
    name: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    detail: str = ""
    skipped: bool = False

    def fail(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < 8:
            self.examples.append(example)



class Stats:
    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.skipped_busy = 0
        self.skipped_offline = 0
        self.connects = 0
        self.reconnects = 0
        self.resumed = 0
        self.connect_failures: Counter[str] = Counter()
        self.since_recovered = 0
        self.snapshot_fallbacks = 0
        self.migrations = 0
        self.gap_resyncs = 0
        self.gaps_after_resume = 0
        self.payments_ok = 0
        self.payment_retries_ok = 0
        self.payments_rejected: Counter[str] = Counter()
        self.payments_unresolved = 0
        self.contended = 0
        self.reader_errors: list[str] = []



class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed: int = args.seed
        self.rng = random.Random(self.seed)
        self.duration = float(args.minutes) * 60.0
        self.tokens = Tokens([SECRET])
        self.stats = Stats()
        self.checks = {key: Check(name) for key, name in [
            ("holders", "(a) one holder per order and lock kind"),
            ("fencing", "(a) fencing tokens strictly increase per order"),
            ("paid_token", "(a) payments only with the current payment token"),
            ("grants", "(a) every granted token is in the event stream"),
            ("grace", "(a) no holder_disconnected while the holder was connected"),
            ("payments", "(b) at most one successful payment per order"),
            ("views", "(c) every subscriber's view equals the final state"),
            ("recovery", "(c) `since` recovery lands on the snapshot"),
            ("presence", "(c) online terminals in snapshots = those connected"),
            ("memory", "(d) memory per connection flat"),
            ("delivery", "(e) events once, in seq order, identical everywhere"),
            ("linearizable", "(f) payment-lock history linearizable, order by order"),
        ]}
        self.history = History()  # every payment-lock request, for (f)
        self.tmp = Path(tempfile.mkdtemp(prefix="tablelock-chaos-"))
        self.redis = RedisProc(self.tmp / "redis", self.tmp)
        self.brokers = [BrokerProc("A", self.redis.url, self.tmp),
                        BrokerProc("B", self.redis.url, self.tmp)]
        # nginx in front, round-robin (None: each screen picks a broker itself).
        self.front = NginxProc(self.brokers, self.tmp / "nginx") if args.front == "nginx" \
            else None
        # A Redis pause waiting for the next write a screen sends (faults.pause_redis).
        self.pause_armed: asyncio.Future[str] | None = None
        self.stores: list[StoreSim] = []
        self.terms: list[Screen] = []
        self.events: dict[str, dict[int, tuple[int, Ev]]] = defaultdict(dict)
        self.grants: list[tuple[str, str, str, int, str]] = []  # store, order, kind, token, holder
        self.paid_ok: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.chaos_log: list[str] = []
        self.faults: Counter[str] = Counter()  # landed, by kind
        self.pauses: list[tuple[float, float]] = []  # monotonic SIGSTOP and SIGCONT times
        self.kills: list[float] = []  # epoch ms of each SIGKILL of a broker
        # (broker, incarnation) -> (seconds up, RSS KiB, connections, peak connections so far)
        self.samples: dict[tuple[str, int], list[tuple[float, int, int, int]]] = defaultdict(
            list)
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.traffic_end = 0.0
        self.final = False
        self.stopping = False
        self.refs = itertools.count(1)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.trace_file = open(self.tmp / "trace.jsonl", "w") if args.trace else None  # noqa: SIM115

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def at(self, epoch_ms: float) -> float:
        """An epoch time in ms as seconds into the run."""
        return epoch_ms / 1000 - self.t0_wall

    def spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def mint(self, store: str, role: str, sub: str, table: str | None = None) -> str:
        return self.tokens.mint(store=store, role=role, sub=sub, table=table,
                                ttl_s=int(self.duration) + 3 * 3600, name=sub)

    def record_event(self, frame: Frame) -> None:
        """Every numbered event any observer saw: the same seq must mean the same event."""
        channel, seq = frame["channel"], frame["seq"]
        digest = hash(canonical(frame))
        seen = self.events[channel].get(seq)
        if seen is None:
            self.events[channel][seq] = (digest, compact(frame))
        elif seen[0] != digest:
            self.checks["delivery"].fail(f"{channel}#{seq} differs between connections: "
                                         f"{seen[1]} vs {compact(frame)}")

    def trace(self, term: Connection, link: Link, direction: str, frame: Frame) -> None:
        if self.trace_file is not None:
            self.trace_file.write(json.dumps({
                "t": round(self.elapsed(), 3), "wall": round(time.time() * 1000),
                "term": f"{term.store.store_id}/{term.sub}",
                "broker": self.broker_name(link.broker), direction: frame}) + "\n")

    def broker_name(self, index: int | None) -> str:
        """A link's broker as the logs name it (through nginx the harness cannot know it)."""
        if index is None:
            return "via nginx"
        broker = self.brokers[index]
        return f"{broker.name}#{broker.incarnation}"

    def write_sent(self, what: str) -> None:
        """A screen just sent a write: an armed Redis pause lands now."""
        armed = self.pause_armed
        if armed is not None and not armed.done():
            armed.set_result(what)

    def note_grant(self, term: Screen, reply: Frame) -> None:
        lock = reply.get("lock")
        if lock:
            self.grants.append((term.store.store_id, lock["order_id"], lock["kind"],
                                lock["token"], lock["holder"]["terminal_id"]))

