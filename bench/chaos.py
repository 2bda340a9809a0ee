"""Soak and chaos run: simulated stores on two brokers sharing one Redis, with faults.

    python -m bench.chaos [--minutes 2] [--seed 1] [--stores 5] [--tables 8] [--rate 20]

Starts its own redis-server (append-only, fsync always, so a restart keeps every
write) and two `tablelock serve --backend redis://...` processes on free ports
of 127.0.0.1. Each store has an erp_main (answers `order.fetch` from the
store's order book), an erp_secondary, a manager and one phone (h5) per table;
they are spread over both brokers and reconnect on their own, with backoff, to
either broker when their socket closes: `resume` when they can, else
`subscribe` with `since`, taking the snapshot on `recovered: false`.

A seeded, steady stream of actions runs for `--minutes`: order, payment and
presettle locks taken, renewed, released and forced; publishes with growing
versions (racing each other); h5 payment locks that pull the order from the
ERP; payments with unique `payment_ref`s and retries of the same ref. At seeded
times: broker B is SIGKILLed and restarted on its port, Redis is SIGKILLed and
restarted on its append-only file, and a storm of clients drop their sockets
at once. Broker A is never killed, so its memory is measured over the whole run.

Checked and printed at the end (exit 1 when one broke, 2 when the run could not
complete; logs are kept in a temporary directory on failure):
  (a) one holder per order and kind, replaying the union of every numbered event
      any observer saw in seq order; fencing tokens strictly increase per order;
      a payment succeeds only with the current payment token; every token granted
      in a reply is in the event stream; no lock is released `holder_disconnected`
      while the harness had its holder connected;
  (b) at most one successful payment per order: replies, `order.paid` events and
      the audit log (`payment.completed`) agree; a retried ref is the same payment;
  (c) once traffic stops, every subscriber's mirror (snapshot + events) equals a
      fresh snapshot taken on each broker; `since` recovery lands on the snapshot;
      the online terminals in store snapshots are the ones actually connected;
  (d) memory per connection flat: RSS / connections at the broker's usual number of
      connections, median of the last third of its samples within 25% of the first
      third, after warm-up (broker A lives through the whole run);
  (e) events arrive once, in seq order, identical on every connection;
  (f) the history of every payment-lock request (lock.acquire, lock.release of the
      payment lock, payment.complete, order.get, order.publish: client, times sent
      and answered, request, reply; no reply or `outcome: unknown` is indeterminate)
      is linearizable per order against the model of bench/linearizability.py (the
      history stays in the logs as history.jsonl: `python -m bench.linearizability`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tablelock.auth import Tokens

from .history import History

ROOT = Path(__file__).resolve().parent.parent
SECRET = "chaos-run-secret-0123456789abcdef0123"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
H5_TTL_MS = 5_000
STORE_CONFIG = {"h5_payment_lock_ttl_ms": H5_TTL_MS, "erp_lock_ttl_ms": 10_000,
                "disconnect_grace_ms": 5_000, "erp_fetch_timeout_ms": 2_000}
MEMORY_GROWTH_LIMIT = 0.25
# The harness's clock against the server's, for (f): a lock lives at least its shortest
# TTL or grace after its request left, less this.
CLOCK_SLACK_S = 0.5
# (f) gives up on an order after this many configurations of its search (then it fails):
# about a minute of search, for a history with a dozen unanswered requests on one order.
LINEARIZABILITY_BUDGET = 500_000
UNKNOWN = -1  # a lock kind whose holder the analysis cannot know (before coverage, after a hole)
Frame = dict[str, Any]

# --- child processes ----------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _die_with_parent() -> None:
    """Runs in the child before exec: it gets SIGKILL when this process dies, however."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None,
           ) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    _CHILDREN.append(proc)
    return proc


def _kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)


atexit.register(_kill_children)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http(method: str, port: int, path: str, token: str | None = None, body: Any = None,
               timeout: float = 5.0) -> tuple[int, Any]:
    """A tiny HTTP/1.1 client on 127.0.0.1 (no threads, no dependencies)."""
    async def go() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data = b"" if body is None else json.dumps(body).encode()
            head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                    "Connection: close", f"Content-Length: {len(data)}"]
            if token:
                head.append(f"Authorization: Bearer {token}")
            if data:
                head.append("Content-Type: application/json")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        header, _, payload = raw.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in header.lower():
            payload = _dechunk(payload)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")
    return await asyncio.wait_for(go(), timeout)


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


class RedisProc:
    """redis-server with an append-only file synced on every write: a SIGKILL loses nothing."""

    def __init__(self, workdir: Path, logdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.log = logdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = _spawn([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                            "--save", "", "--dir", str(self.dir), "--appendonly", "yes",
                            "--appendfsync", "always"], self.log)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited (see {self.log})")
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 1)
                try:
                    writer.write(b"PING\r\n")
                    answer = await asyncio.wait_for(reader.readline(), 1)
                finally:
                    writer.close()
                if answer.startswith(b"+PONG"):
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"redis-server did not come up on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class BrokerProc:
    """`tablelock serve --backend redis://...` on a fixed port; killed and started again."""

    def __init__(self, name: str, backend: str, logdir: Path) -> None:
        self.name = name
        self.backend = backend
        self.logdir = logdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.up = False
        self.up_since = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log(self) -> Path:
        return self.logdir / f"broker-{self.name}-{self.incarnation}.log"

    def spawn(self) -> None:
        self.incarnation += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("TABLELOCK_")}
        env["TABLELOCK_SECRET"] = SECRET
        self.proc = _spawn([sys.executable, "-m", "tablelock", "serve", "--host", "127.0.0.1",
                            "--port", str(self.port), "--backend", self.backend], self.log, env)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"broker {self.name} exited (see {self.log})")
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await http("GET", self.port, "/readyz", timeout=1)
                if status == 200:
                    self.up = True
                    self.up_since = time.monotonic()
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"broker {self.name} did not become ready (see {self.log})")

    def kill(self) -> None:
        self.up = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def rss_kb(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None


# --- what an observer saw --------------------------------------------------------------------

class Ev(NamedTuple):
    """The parts of a numbered event the analysis needs."""

    name: str
    order_id: str | None
    kind: str | None
    token: int | None
    holder: str | None
    reason: str | None
    version: int | None
    status: str | None
    pay_token: int | None
    pay_ref: str | None
    ts: int


def compact(frame: Frame) -> Ev:
    lock = frame.get("lock") or {}
    order = frame.get("order") or {}
    payment = frame.get("payment") or {}
    return Ev(frame["event"], lock.get("order_id") or order.get("order_id"), lock.get("kind"),
              lock.get("token"), (lock.get("holder") or {}).get("terminal_id"),
              frame.get("reason"), order.get("version"), order.get("status"),
              payment.get("token"), payment.get("payment_ref"), int(frame.get("ts") or 0))


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def lock_view(lock: Frame) -> str:
    """A lock as compared: everything but `expires_at`, which renewals move silently."""
    return canonical({k: v for k, v in lock.items() if k != "expires_at"})


class View(NamedTuple):
    orders: dict[str, str]
    locks: dict[tuple[str, str], str]
    terminals: frozenset[str]


class Mirror:
    """One subscriber's copy of a channel's state: its snapshot, then its events."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.store_scope = channel.startswith("store:")
        self.seq: int | None = None  # None: not synchronised yet
        self.orders: dict[str, str] = {}
        self.locks: dict[tuple[str, str], str] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.terminals: set[str] = set()

    def load(self, snapshot: Frame, seq: int) -> None:
        self.seq = seq
        if self.store_scope:
            orders = snapshot.get("orders") or []
            self.terminals = {t["terminal_id"] for t in snapshot.get("terminals") or []}
        else:
            orders = [snapshot["order"]] if snapshot.get("order") else []
        self.orders = {o["order_id"]: canonical(o) for o in orders}
        self.locks, self.tokens = {}, {}
        for lock in snapshot.get("locks") or []:
            key = (lock["order_id"], lock["kind"])
            self.locks[key] = lock_view(lock)
            self.tokens[key] = lock["token"]

    def apply(self, frame: Frame) -> str | None:
        """Apply the next event; a description of anything that does not fit, else None."""
        self.seq = frame["seq"]
        name = frame["event"]
        lock = frame.get("lock")
        if name == "lock.acquired" and lock:
            key = (lock["order_id"], lock["kind"])
            clash = key in self.locks
            self.locks[key] = lock_view(lock)
            old = self.tokens.get(key)
            self.tokens[key] = lock["token"]
            if clash:
                return f"{self.channel}#{self.seq}: {key} granted ({lock['token']}) over {old}"
        elif name in ("lock.released", "lock.expired", "lock.forced") and lock:
            key = (lock["order_id"], lock["kind"])
            current = self.tokens.pop(key, None)
            self.locks.pop(key, None)
            if current != lock["token"]:
                return (f"{self.channel}#{self.seq}: {name} of token {lock['token']} while "
                        f"{current} was held")
        elif name in ("order.updated", "order.paid"):
            order = frame["order"]
            if self.store_scope and order["status"] != "open":
                self.orders.pop(order["order_id"], None)
            else:
                self.orders[order["order_id"]] = canonical(order)
        elif name == "terminal.online":
            self.terminals.add(frame["terminal"]["terminal_id"])
        elif name == "terminal.offline":
            self.terminals.discard(frame["terminal"]["terminal_id"])
        return None

    def view(self) -> View:
        return View(dict(self.orders), dict(self.locks), frozenset(self.terminals))


def snapshot_view(channel: str, snapshot: Frame) -> View:
    mirror = Mirror(channel)
    mirror.load(snapshot, 0)
    return mirror.view()


def view_diff(mine: View, truth: View) -> str:
    parts = []
    for oid in sorted(set(mine.orders) | set(truth.orders)):
        if mine.orders.get(oid) != truth.orders.get(oid):
            parts.append(f"order {oid}: {mine.orders.get(oid)} != {truth.orders.get(oid)}")
    for key in sorted(set(mine.locks) | set(truth.locks)):
        if mine.locks.get(key) != truth.locks.get(key):
            parts.append(f"lock {key}: {mine.locks.get(key)} != {truth.locks.get(key)}")
    if mine.terminals != truth.terminals:
        parts.append(f"terminals +{sorted(mine.terminals - truth.terminals)} "
                     f"-{sorted(truth.terminals - mine.terminals)}")
    return "; ".join(parts)[:600]


# --- the store's own system (its ERP's order book) -----------------------------------------

DISHES = [("rice", 300), ("noodles", 1200), ("dumplings", 900), ("tea", 400), ("soup", 800),
          ("fish", 3800), ("tofu", 1100), ("greens", 700)]


class StoreSim:
    """One restaurant's ERP database, shared by its two ERP terminals."""

    def __init__(self, store_id: str, tables: int, rng: random.Random) -> None:
        self.store_id = store_id
        self.rng = rng
        self.tables = [f"t{j}" for j in range(tables)]
        self.book: dict[str, Frame] = {}
        self.current: dict[str, str] = {}
        self.unpublished: set[str] = set()
        self.to_close: set[str] = set()
        self.paid: set[str] = set()
        self._ids = itertools.count(1)
        for table in self.tables:
            self.new_order(table)

    def new_order(self, table: str) -> str:
        order_id = f"{table}-{next(self._ids)}"
        items = [self._item() for _ in range(self.rng.randint(1, 3))]
        self.book[order_id] = {"order_id": order_id, "table_id": table, "version": 1,
                               "amount_cents": _amount(items), "items": items, "status": "open"}
        self.current[table] = order_id
        self.unpublished.add(order_id)
        return order_id

    def _item(self) -> Frame:
        sku, price = self.rng.choice(DISHES)
        return {"sku": sku, "qty": self.rng.randint(1, 3), "price": price}

    def open_orders(self) -> list[str]:
        return [oid for oid in (self.current[t] for t in self.tables)
                if self.book[oid]["status"] == "open"]

    def evolve(self, order_id: str, change: str) -> Frame:
        """The next version of an order, as an ERP terminal would publish it."""
        order = json.loads(json.dumps(self.book[order_id]))
        items = order["items"]
        if change == "add_items" or not items:
            if len(items) < 12:
                items.append(self._item())
            else:
                items[-1]["qty"] += 1
        elif self.rng.random() < 0.3 and len(items) > 1:
            items.pop(self.rng.randrange(len(items)))
        else:
            self.rng.choice(items)["qty"] = self.rng.randint(1, 4)
        order["amount_cents"] = _amount(items)
        order["version"] += 1
        return order

    def learn(self, order: Frame) -> None:
        """The broker's copy (a reply or an event): the book follows it when it is newer."""
        known = self.book.get(order["order_id"])
        if known is None:
            return
        if order["version"] > known["version"]:
            self.book[order["order_id"]] = json.loads(json.dumps(order))
        if order["status"] == "paid":
            self.mark_paid(order["order_id"])
        elif order["status"] == "closed":
            self.to_close.discard(order["order_id"])
        self.unpublished.discard(order["order_id"])

    def mark_paid(self, order_id: str) -> None:
        if order_id in self.paid or order_id not in self.book:
            return
        self.paid.add(order_id)
        order = self.book[order_id]
        if order["status"] == "open":
            order["status"] = "paid"
        self.to_close.add(order_id)
        if self.current.get(order["table_id"]) == order_id:
            self.new_order(order["table_id"])


def _amount(items: list[Frame]) -> int:
    return sum(int(i["qty"]) * int(i["price"]) for i in items)


# --- the run's record --------------------------------------------------------------------------

@dataclass
class Pay:
    """A payment.complete the terminal must see through to a definite answer."""

    store_id: str
    order_id: str
    token: int
    version: int
    amount: int
    ref: str
    attempts: int = 0


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


@dataclass
class Link:
    """One WebSocket connection of a terminal."""

    ws: ClientConnection
    broker: int
    pending: dict[int, tuple[asyncio.Future[Frame], Callable[[Frame], None] | None]] = field(
        default_factory=dict)
    ready: bool = False
    closed: bool = False
    resumed: bool = False
    broken: bool = False  # a gap was seen: nothing more is read from it
    opened: float = field(default_factory=time.monotonic)
    online: bool = False  # hello answered and subscriptions made: counted as connected
    reader: asyncio.Task[None] | None = None


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
        self.stores: list[StoreSim] = []
        self.terms: list[Term] = []
        self.events: dict[str, dict[int, tuple[int, Ev]]] = defaultdict(dict)
        self.grants: list[tuple[str, str, str, int, str]] = []  # store, order, kind, token, holder
        self.paid_ok: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.chaos_log: list[str] = []
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

    def trace(self, term: Term, link: Link, direction: str, frame: Frame) -> None:
        if self.trace_file is not None:
            broker = self.brokers[link.broker]
            self.trace_file.write(json.dumps({
                "t": round(self.elapsed(), 3), "wall": round(time.time() * 1000),
                "term": f"{term.store.store_id}/{term.sub}",
                "broker": f"{broker.name}#{broker.incarnation}", direction: frame}) + "\n")

    def note_grant(self, term: Term, reply: Frame) -> None:
        lock = reply.get("lock")
        if lock:
            self.grants.append((term.store.store_id, lock["order_id"], lock["kind"],
                                lock["token"], lock["holder"]["terminal_id"]))


# --- a terminal ------------------------------------------------------------------------------

class Term:
    """One simulated screen: its own socket (one at a time), mirrors and habits."""

    def __init__(self, run: Run, store: StoreSim, role: str, sub: str, home: int,
                 table: str | None = None) -> None:
        self.run = run
        self.store = store
        self.role = role
        self.sub = sub
        self.home = home
        self.table = table
        self.rng = random.Random(run.rng.getrandbits(64))
        self.token = run.mint(store.store_id, role, sub, table)
        self.link: Link | None = None
        self.session_id: str | None = None
        self.no_resume = False
        self.mirrors: dict[str, Mirror] = {}
        self.held: dict[tuple[str, str], int] = {}
        self.uncertain: list[Pay] = []
        self.order_id: str | None = None  # h5: the order of its table it follows
        self.busy = False
        self.ever_connected = False
        self.counted = True  # in the reconnect figures (the final checkers are not)
        self.online: list[list[float]] = []  # [hello answered, socket gone] in epoch ms
        self._ids = itertools.count(1)
        self._loop: asyncio.Task[None] | None = None

    @property
    def store_channel(self) -> str:
        return f"store:{self.store.store_id}"

    def order_channel(self, order_id: str) -> str:
        return f"order:{self.store.store_id}:{order_id}"

    @property
    def ready(self) -> bool:
        return self.link is not None and self.link.ready and not self.link.closed

    @property
    def synced(self) -> bool:
        return self.ready and all(m.seq is not None for m in self.mirrors.values())

    # --- the connection --------------------------------------------------------------------

    def start(self) -> None:
        self._loop = self.run.spawn(self.keep_connected())

    async def keep_connected(self) -> None:
        attempt = 0
        while not self.run.stopping:
            broker = self.home if attempt == 0 else self.rng.randrange(len(self.run.brokers))
            try:
                link = await self._connect(broker)
                attempt = 0
                assert link.reader is not None
                await asyncio.shield(link.reader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.run.stats.connect_failures[type(exc).__name__] += 1
                attempt += 1
            finally:
                self._drop_link()
            if self.run.stopping:
                return
            delay = min(3.0, 0.1 * 2 ** min(attempt, 5)) * (0.5 + self.rng.random())
            await asyncio.sleep(delay)

    def _drop_link(self) -> None:
        link = self.link
        if link is not None:
            link.ready = False
            if not link.closed:
                with contextlib.suppress(Exception):
                    link.ws.transport.abort()
        self.link = None

    def abort(self, resume: bool = True) -> None:
        """Drop the socket at once, as a lost network would; the loop reconnects."""
        if not resume:
            self.no_resume = True
        link = self.link
        if link is not None and not link.closed:
            link.ws.transport.abort()

    async def close_gracefully(self) -> None:
        link = self.link
        if link is not None and not link.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.ws.close(), 2)

    async def _connect(self, broker: int) -> Link:
        url = self.run.brokers[broker].url
        ws = await connect(url, subprotocols=[Subprotocol("tablelock.v1")], compression=None,
                           open_timeout=5, close_timeout=1, max_size=2**22)
        link = Link(ws, broker)
        self.link = link
        link.reader = asyncio.create_task(self._read(link))
        resume = self.session_id if self.session_id and not self.no_resume else None
        self.no_resume = False
        hello: Frame = {"token": self.token, "protocol": 1, "locale": "en",
                        "client": {"name": "chaos", "version": "1"}}
        if resume:
            hello["resume"] = resume
            # What this client has read: frames that died in flight with the old socket are
            # replayed too (docs/protocol.md, "Seq numbering and recovery").
            hello["seen"] = {channel: mirror.seq for channel, mirror in self.mirrors.items()
                             if mirror.seq is not None}
        reply = await self._call(link, "hello", hello, timeout=5)
        if reply is None or not reply.get("ok"):
            code = "LOST" if reply is None else reply["error"]["code"]
            raise ConnectionError(f"hello {code}")
        self.session_id = reply["session_id"]
        link.resumed = bool(reply["resumed"])
        if link.resumed:
            self.run.stats.resumed += 1
            again = set(reply.get("resubscribe") or [])
            channels = [c for c, m in self.mirrors.items() if c in again or m.seq is None]
        else:
            channels = list(self.mirrors)
        for _ in range(4):  # and any channel a screen started to follow meanwhile
            for channel in channels:
                if channel not in self.mirrors:
                    continue
                sub = await self._subscribe(link, channel)
                if sub is None or not sub.get("ok"):
                    raise ConnectionError("subscribe " + ("LOST" if sub is None
                                                          else sub["error"]["code"]))
            channels = [c for c, m in self.mirrors.items() if m.seq is None]
            if not channels:
                break
        else:
            raise ConnectionError("subscriptions did not settle")
        link.ready = True  # no await since the check above: nothing slipped in between
        link.online = True
        self.online.append([time.time() * 1000, math.inf])
        if self.counted:
            self.run.stats.connects += 1
            if self.ever_connected:
                self.run.stats.reconnects += 1
        self.ever_connected = True
        return link

    async def _subscribe(self, link: Link, channel: str) -> Frame | None:
        mirror = self.mirrors.get(channel)
        params: Frame = {"channel": channel}
        since = mirror.seq if mirror is not None else None
        if since is not None:
            params["since"] = since

        def install(reply: Frame) -> None:  # runs in the reader, before any later frame
            target = self.mirrors.get(channel)
            if not reply.get("ok") or target is None:
                return
            self._install(target, reply, since)

        return await self._call(link, "subscribe", params, timeout=5, on_reply=install)

    def _install(self, mirror: Mirror, reply: Frame, since: int | None) -> None:
        seq, snapshot = reply["seq"], reply["snapshot"]
        if since is None or mirror.seq is None:
            mirror.load(snapshot, seq)
            return
        if not reply.get("recovered"):
            self.run.stats.snapshot_fallbacks += 1
            mirror.load(snapshot, seq)
            return
        self.run.stats.since_recovered += 1
        for frame in reply.get("missed") or []:
            self.run.record_event(frame)
            assert mirror.seq is not None
            if frame["seq"] <= mirror.seq:
                continue
            if frame["seq"] != mirror.seq + 1:
                self.run.checks["recovery"].fail(
                    f"{mirror.channel}: missed jumps from {mirror.seq} to {frame['seq']}")
                mirror.load(snapshot, seq)
                return
            mirror.apply(frame)
        truth = snapshot_view(mirror.channel, snapshot)
        if mirror.seq != seq:
            self.run.checks["recovery"].fail(
                f"{mirror.channel}: since={since} recovered to seq {mirror.seq}, snapshot at {seq}")
        else:
            diff = view_diff(mirror.view(), truth)
            if diff:
                self.run.checks["recovery"].fail(f"{self.sub} {mirror.channel}@{seq}: {diff}")
        mirror.load(snapshot, seq)

    async def _call(self, link: Link, type_: str, params: Frame, timeout: float = 5.0,
                    on_reply: Callable[[Frame], None] | None = None) -> Frame | None:
        """One request on this link: its reply, or None when the link died or it timed out."""
        if link.closed:
            return None
        request_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        link.pending[request_id] = (future, on_reply)
        try:
            message = {"id": request_id, "type": type_, **params}
            self.run.trace(self, link, "out", message)
            await link.ws.send(json.dumps(message))
            return await asyncio.wait_for(future, timeout)
        except (websockets.ConnectionClosed, ConnectionError, TimeoutError, OSError):
            return None
        finally:
            link.pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by the reader while the send failed: seen

    async def req(self, type_: str, timeout: float = 5.0, **params: Any) -> Frame | None:
        """A request on the current connection, tallied by outcome."""
        link = self.link
        if link is None or not link.ready:
            self.run.stats.requests[(type_, "OFFLINE")] += 1
            return None
        sent = time.monotonic()  # (not elapsed(): its origin moves once setup is done)
        reply = await self._call(link, type_, params, timeout)
        self.run.history.record(self.store.store_id, self.sub, type_, params, sent,
                                time.monotonic(), reply)
        code = "LOST" if reply is None else "OK" if reply.get("ok") else reply["error"]["code"]
        self.run.stats.requests[(type_, code)] += 1
        return reply

    async def _read(self, link: Link) -> None:
        try:
            async for raw in link.ws:
                if link.broken:
                    continue
                frame = json.loads(raw)
                self.run.trace(self, link, "in", frame)
                kind = frame.get("type")
                try:
                    if kind == "event":
                        self._on_event(link, frame)
                    elif kind == "rpc":
                        self._on_rpc(link, frame)
                    else:
                        entry = link.pending.pop(frame.get("id"), None)
                        if entry is not None:
                            future, on_reply = entry
                            if on_reply is not None:
                                on_reply(frame)
                            if not future.done():
                                future.set_result(frame)
                except Exception as exc:  # a bug of this script: shown, never hidden
                    if len(self.run.stats.reader_errors) < 5:
                        self.run.stats.reader_errors.append(f"{type(exc).__name__}: {exc}")
        except websockets.ConnectionClosed:
            pass
        finally:
            if link.online and self.online and self.online[-1][1] == math.inf:
                self.online[-1][1] = time.time() * 1000
            link.closed = True
            link.ready = False
            for future, _ in link.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("closed"))
            link.pending.clear()

    def _on_event(self, link: Link, frame: Frame) -> None:
        if frame.get("direct"):
            if frame["event"] == "lock.contended":
                self.run.stats.contended += 1
            else:
                self._forget_lock(frame.get("lock"))
            return
        self.run.record_event(frame)
        mirror = self.mirrors.get(frame["channel"])
        if mirror is None or mirror.seq is None:
            return
        seq = frame["seq"]
        if seq <= mirror.seq:
            self.run.checks["delivery"].fail(
                f"t={self.run.elapsed():.1f}s {self.store.store_id}/{self.sub} "
                f"{frame['channel']}: seq {seq} after {mirror.seq} "
                f"({'resumed' if link.resumed else 'fresh'} connection)")
            return
        if seq != mirror.seq + 1:
            broker = self.run.brokers[link.broker]
            self.run.checks["delivery"].fail(
                f"t={self.run.elapsed():.1f}s {self.store.store_id}/{self.sub} "
                f"{frame['channel']}: gap {mirror.seq} -> {seq} on broker "
                f"{broker.name}#{broker.incarnation}, "
                f"{'resumed' if link.resumed else 'fresh'} connection "
                f"{time.monotonic() - link.opened:.1f}s old")
            self.run.stats.gap_resyncs += 1
            if link.resumed:
                self.run.stats.gaps_after_resume += 1
            link.broken = True
            self.abort(resume=False)  # a gap: the client must take a snapshot again
            return
        oddity = mirror.apply(frame)
        if oddity:
            self.run.checks["views"].fail(f"{self.sub}: {oddity}")
        self._learn(frame)

    def _learn(self, frame: Frame) -> None:
        """What a screen does with an event beyond its mirror."""
        name = frame["event"]
        if name in ("lock.released", "lock.expired", "lock.forced"):
            self._forget_lock(frame.get("lock"))
        elif name == "order.paid":
            order = frame["order"]
            for kind in ("order", "payment", "presettle"):
                self.held.pop((order["order_id"], kind), None)
            if self.role in ("erp_main", "erp_secondary"):
                self.store.mark_paid(order["order_id"])
        elif name == "order.updated" and self.role in ("erp_main", "erp_secondary"):
            self.store.learn(frame["order"])

    def _forget_lock(self, lock: Frame | None) -> None:
        if lock and lock["holder"]["terminal_id"] == self.sub:
            key = (lock["order_id"], lock["kind"])
            if self.held.get(key) == lock["token"]:
                del self.held[key]

    def _on_rpc(self, link: Link, frame: Frame) -> None:
        """order.fetch: the erp_main answers from the store's book."""
        params = frame.get("params") or {}
        order_id = params.get("order_id") or self.store.current.get(params.get("table_id", ""))
        order = self.store.book.get(order_id or "")
        if order is None:
            answer: Frame = {"ok": False, "error": {"code": "NOT_FOUND", "message": "no order"}}
        else:
            answer = {"ok": True, "result": {"order": order}}
        text = json.dumps({"type": "rpc.result", "rid": frame["rid"], **answer})
        self.run.spawn(self._send_quietly(link, text))

    @staticmethod
    async def _send_quietly(link: Link, text: str) -> None:
        with contextlib.suppress(Exception):
            await link.ws.send(text)

    # --- habits ------------------------------------------------------------------------------

    async def step(self) -> None:
        self.busy = True
        try:
            if self.uncertain:
                await self.complete(self.uncertain[0])
            elif self.role == "h5":
                await self.h5_step()
            elif self.role == "manager":
                await self.manager_step()
            else:
                await self.erp_step()
        except Exception as exc:
            if len(self.run.stats.reader_errors) < 5:
                self.run.stats.reader_errors.append(f"step {type(exc).__name__}: {exc}")
        finally:
            self.busy = False

    async def h5_step(self) -> None:
        r = self.rng.random()
        mirror = self.mirrors.get(self.order_channel(self.order_id or ""))
        shown = json.loads(next(iter(mirror.orders.values()))) if mirror and mirror.orders else {}
        if self.order_id is None or r < 0.15 or (shown.get("status", "open") != "open"
                                                  and r < 0.6):
            self.run.stats.ops["h5.scan"] += 1
            await self.h5_scan(fresh=self.rng.random() < 0.4)
        elif r < 0.9:
            self.run.stats.ops["h5.pay"] += 1
            await self.h5_pay()
        else:
            self.run.stats.ops["h5.check"] += 1
            await self.req("check", order_id=self.order_id, action="pay")

    async def h5_scan(self, fresh: bool) -> None:
        reply = await self.req("order.get", timeout=8, table_id=self.table, fresh=fresh)
        if reply is not None and reply.get("ok") and reply.get("order"):
            order_id = reply["order"]["order_id"]
            if order_id != self.order_id:
                await self.follow(order_id)

    async def follow(self, order_id: str) -> None:
        """Watch another order of the table: subscribe to it, leave the old one."""
        old = self.order_id
        self.order_id = order_id
        channel = self.order_channel(order_id)
        self.mirrors[channel] = Mirror(channel)
        if old is not None:
            old_channel = self.order_channel(old)
            self.mirrors.pop(old_channel, None)
            await self.req("unsubscribe", channel=old_channel)
        link = self.link
        if link is None or not link.ready:
            return  # subscribed when the connection comes back
        reply = await self._subscribe(link, channel)
        if reply is None or not reply.get("ok"):
            self.abort(resume=False)  # come back and subscribe everything again

    async def h5_pay(self) -> None:
        assert self.order_id is not None
        order_id = self.order_id
        reply = await self.req("lock.acquire", timeout=8, order_id=order_id, kind="payment")
        if reply is None or not reply.get("ok"):
            if reply is not None and reply["error"]["code"] == "ORDER_PAID":
                await self.h5_scan(fresh=True)
            return
        self.run.note_grant(self, reply)
        lock, order = reply["lock"], reply["order"]
        self.held[(order_id, "payment")] = lock["token"]
        if self.rng.random() < 0.15:  # the customer closes the payment page
            await self.release(order_id, "payment", lock["token"])
            return
        if self.rng.random() < 0.08:  # ... or takes too long in the payment app
            await asyncio.sleep(H5_TTL_MS / 1000 + self.rng.uniform(0.3, 1.5))
        else:
            await asyncio.sleep(self.rng.uniform(0.1, 1.2))
        await self.pay(order_id, lock["token"], order["version"], order["amount_cents"])

    async def pay(self, order_id: str, token: int, version: int, amount: int) -> None:
        payment = Pay(self.store.store_id, order_id, token, version, amount,
                      f"{self.store.store_id}-{self.sub}-{next(self.run.refs)}")
        self.uncertain.append(payment)
        await self.complete(payment)

    async def record_payment(self, p: Pay) -> Frame | None:
        """payment.complete as this terminal may send it: an ERP or manager itself; a phone's
        through the platform's payment service (HTTP, role `service`), as the provider would."""
        if self.role != "h5":
            return await self.req("payment.complete", order_id=p.order_id, token=p.token,
                                  version=p.version, amount_cents=p.amount, payment_ref=p.ref)
        link = self.link
        broker = self.run.brokers[link.broker if link is not None else self.home]
        body = {"token": p.token, "version": p.version, "amount_cents": p.amount,
                "payment_ref": p.ref}
        sent = time.monotonic()
        try:
            status, answer = await http(
                "POST", broker.port, f"/v1/stores/{p.store_id}/orders/{p.order_id}/payment",
                self.run.mint(p.store_id, "service", "payment-service"), body)
        except (OSError, TimeoutError, ValueError, IndexError):
            status, answer = 0, None  # the broker is down: the service tries again later
        reply: Frame | None = None
        if isinstance(answer, dict) and status != 503:
            reply = {"ok": status == 200, **answer}
        self.run.history.record(p.store_id, "payment-service", "payment.complete",
                                {"order_id": p.order_id, "token": p.token,
                                 "payment_ref": p.ref}, sent, time.monotonic(), reply)
        code = "LOST" if reply is None else "OK" if reply["ok"] else reply["error"]["code"]
        self.run.stats.requests[("payment.service", code)] += 1
        return reply

    async def complete(self, p: Pay) -> None:
        """payment.complete until a definite answer: a lost reply is retried with its ref."""
        p.attempts += 1
        reply = await self.record_payment(p)
        if reply is None or (not reply.get("ok") and reply["error"]["code"] in (
                "UNAVAILABLE", "RATE_LIMITED")):
            if p.attempts >= 12 and not self.run.final:
                self.uncertain.remove(p)
                self.run.stats.payments_unresolved += 1
            return
        self.uncertain.remove(p)
        if not reply.get("ok"):
            self.run.stats.payments_rejected[reply["error"]["code"]] += 1
            return
        self._paid(p, reply, retry=p.attempts > 1)
        if self.rng.random() < 0.3:  # the network dropped the answer: the same ref again
            again = await self.record_payment(p)
            if again is not None and (again.get("ok") or again["error"]["code"] not in (
                    "UNAVAILABLE", "RATE_LIMITED")):
                self._paid(p, again, retry=True)

    def _paid(self, p: Pay, reply: Frame, retry: bool) -> None:
        check = self.run.checks["payments"]
        if not reply.get("ok"):
            check.fail(f"{p.store_id}/{p.order_id}: retry of successful ref {p.ref} answered "
                       f"{reply['error']['code']}")
            return
        got = reply["payment"]["payment_ref"]
        if got != p.ref:
            check.fail(f"{p.store_id}/{p.order_id}: payment {p.ref} answered with {got}")
        if retry:
            self.run.stats.payment_retries_ok += 1
        else:
            self.run.stats.payments_ok += 1
        self.run.paid_ok[(p.store_id, p.order_id)].add(p.ref)
        for kind in ("order", "payment", "presettle"):
            self.held.pop((p.order_id, kind), None)
        self.store.mark_paid(p.order_id)

    async def erp_step(self) -> None:
        store = self.store
        if store.unpublished and self.rng.random() < 0.8:
            self.run.stats.ops["erp.create"] += 1
            await self.publish_new(self.rng.choice(sorted(store.unpublished)))
            return
        if store.to_close and self.rng.random() < 0.5:
            self.run.stats.ops["erp.close"] += 1
            await self.close_order(self.rng.choice(sorted(store.to_close)))
            return
        open_orders = store.open_orders()
        if not open_orders:
            return
        order_id = self.rng.choice(open_orders)
        op = self.rng.choices(["edit", "add_items", "presettle", "pay", "release", "renew",
                               "get"], [22, 18, 10, 16, 12, 14, 8])[0]
        self.run.stats.ops[f"erp.{op}"] += 1
        if op == "edit":
            granted = await self.acquire(order_id, "order")
            if granted is None:
                return
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))
            token = granted["lock"]["token"]
            await self.publish(store.evolve(order_id, "modify"), "modify", token=token)
            if self.rng.random() < 0.75:
                await self.release(order_id, "order", token)
        elif op == "add_items":
            await self.publish(store.evolve(order_id, "add_items"), "add_items")
        elif op == "presettle":
            await self.acquire(order_id, "presettle")
        elif op == "pay":
            granted = await self.acquire(order_id, "payment")
            if granted is None:
                return
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))
            lock, order = granted["lock"], granted["order"]
            if self.rng.random() < 0.1:
                await self.release(order_id, "payment", lock["token"])
            else:
                await self.pay(order_id, lock["token"], order["version"], order["amount_cents"])
        elif op in ("release", "renew"):
            if not self.held:
                return
            (held_order, kind), token = self.rng.choice(sorted(self.held.items()))
            if op == "release":
                await self.release(held_order, kind, token)
            else:
                reply = await self.req("lock.renew", order_id=held_order, kind=kind, token=token)
                if reply is not None and not reply.get("ok") and reply["error"]["code"] in (
                        "FENCED", "LOCK_EXPIRED", "NOT_HOLDER", "ORDER_PAID"):
                    self.held.pop((held_order, kind), None)
        else:
            reply = await self.req("order.get", order_id=order_id)
            if reply is not None and reply.get("ok") and reply.get("order"):
                store.learn(reply["order"])

    async def acquire(self, order_id: str, kind: str) -> Frame | None:
        reply = await self.req("lock.acquire", order_id=order_id, kind=kind)
        if (reply is not None and not reply.get("ok") and reply["error"].get("can_force")
                and self.rng.random() < 0.3):
            self.run.stats.ops["erp.force"] += 1
            reply = await self.req("lock.acquire", order_id=order_id, kind=kind, force=True,
                                   operator=self.sub, reason="chaos takeover")
        if reply is None:
            return None
        if not reply.get("ok"):
            code = reply["error"]["code"]
            if code == "NOT_FOUND":
                self.store.unpublished.add(order_id)
            elif code == "ORDER_PAID":
                self.store.mark_paid(order_id)
            return None
        self.run.note_grant(self, reply)
        self.held[(order_id, kind)] = reply["lock"]["token"]
        for lock in reply.get("released") or []:
            self._forget_lock(lock)
        if reply.get("order"):
            self.store.learn(reply["order"])
        return reply

    async def release(self, order_id: str, kind: str, token: int) -> None:
        reply = await self.req("lock.release", order_id=order_id, kind=kind, token=token)
        if reply is not None and (reply.get("ok") or reply["error"]["code"] in (
                "FENCED", "LOCK_EXPIRED", "NOT_HOLDER", "ORDER_PAID")
                ) and self.held.get((order_id, kind)) == token:
            del self.held[(order_id, kind)]

    async def publish(self, order: Frame, change: str, token: int | None = None) -> None:
        params: Frame = {"order": order, "change": change}
        if token is not None:
            params["token"] = token
        reply = await self.req("order.publish", **params)
        if (reply is not None and not reply.get("ok") and reply["error"].get("can_force")
                and token is None and self.rng.random() < 0.25):
            self.run.stats.ops["erp.force_publish"] += 1
            reply = await self.req("order.publish", force=True, operator=self.sub,
                                   reason="chaos forced publish", **params)
        if reply is None:
            return
        if reply.get("ok"):
            self.store.learn(reply["order"])
            return
        code = reply["error"]["code"]
        if code == "STALE_VERSION":  # someone published this version first: read it again
            fresh = await self.req("order.get", order_id=order["order_id"])
            if fresh is not None and fresh.get("ok") and fresh.get("order"):
                self.store.learn(fresh["order"])
        elif code == "ORDER_PAID":
            self.store.mark_paid(order["order_id"])

    async def publish_new(self, order_id: str) -> None:
        order = self.store.book[order_id]
        reply = await self.req("order.publish", order=order, change="modify")
        if reply is not None and (reply.get("ok") or reply["error"]["code"] in (
                "STALE_VERSION", "ORDER_PAID")):
            self.store.unpublished.discard(order_id)  # there (maybe pulled by a phone first)

    async def close_order(self, order_id: str) -> None:
        order = dict(self.store.book[order_id], status="closed")
        order["version"] += 1
        reply = await self.req("order.publish", order=order, change="status")
        if reply is None:
            return
        if reply.get("ok"):
            self.store.book[order_id] = order
            self.store.to_close.discard(order_id)
        elif reply["error"]["code"] == "STALE_VERSION":
            fresh = await self.req("order.get", order_id=order_id)
            if fresh is not None and fresh.get("ok") and fresh.get("order"):
                if fresh["order"]["status"] == "closed":
                    self.store.to_close.discard(order_id)
                self.store.learn(fresh["order"])
        elif reply["error"]["code"] == "NOT_FOUND":
            self.store.to_close.discard(order_id)

    async def manager_step(self) -> None:
        mirror = self.mirrors.get(self.store_channel)
        if mirror is None or not mirror.tokens or self.rng.random() < 0.3:
            self.run.stats.ops["manager.check"] += 1
            open_orders = self.store.open_orders()
            if open_orders:
                await self.req("check", order_id=self.rng.choice(open_orders),
                               action=self.rng.choice(["edit", "pay", "presettle"]))
            return
        self.run.stats.ops["manager.force_release"] += 1
        order_id, kind = self.rng.choice(sorted(mirror.tokens))
        await self.req("lock.release", order_id=order_id, kind=kind, force=True,
                       operator="manager", reason="chaos: stuck screen")


# --- the run ----------------------------------------------------------------------------------

class Fatal(Exception):
    """The run itself could not go on (a process that would not start)."""


async def setup(run: Run) -> None:
    run.redis.spawn()
    await run.redis.wait_ready()
    for broker in run.brokers:
        broker.spawn()
    await asyncio.gather(*(b.wait_ready() for b in run.brokers))
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
    staff: list[Term] = []
    for i, store in enumerate(run.stores):
        for n, (role, sub) in enumerate([("erp_main", "erp-main"), ("erp_secondary", "erp-2"),
                                         ("manager", "manager")]):
            term = Term(run, store, role, sub, home=(i + n) % 2)
            term.mirrors[term.store_channel] = Mirror(term.store_channel)
            staff.append(term)
    run.terms.extend(staff)
    for term in staff:
        term.start()
    await wait_for(lambda: all(t.synced for t in staff), 30, "staff terminals to connect")
    for store in run.stores:  # the day's first orders
        erp = next(t for t in staff if t.store is store and t.role == "erp_main")
        for order_id in sorted(store.unpublished):
            await erp.publish_new(order_id)
    phones: list[Term] = []
    for i, store in enumerate(run.stores):
        for j, table in enumerate(store.tables):
            phone = Term(run, store, "h5", f"phone-{table}", home=(i + j) % 2, table=table)
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
    by_store: dict[str, dict[str, list[Term]]] = defaultdict(lambda: defaultdict(list))
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


def chaos_schedule(run: Run) -> list[tuple[float, str]]:
    """Seeded times of the faults: spread over 15%..85% of the run, in a shuffled order."""
    rng = random.Random(run.rng.getrandbits(64))
    minutes = run.duration / 60
    wanted = set(run.args.chaos.split(",")) if run.args.chaos else set()
    kinds = [kind for kind, every in (("broker", 8), ("redis", 10), ("storm", 6))
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
            broker = run.brokers[1]
            dropped = sum(1 for t in run.terms if t.link is not None and t.link.broker == 1)
            run.kills.append(time.time() * 1000)
            broker.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            spawned = time.monotonic()
            broker.spawn()
            await broker.wait_ready()
            run.chaos_log.append(f"t={started:6.1f}s SIGKILL broker B ({dropped} sockets), "
                                 f"back after {run.elapsed() - started:.1f}s (start "
                                 f"{time.monotonic() - spawned:.1f}s)")
        elif kind == "redis":
            run.redis.kill()
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # a restart on its AOF takes seconds
            run.redis.spawn()
            await run.redis.wait_ready()
            run.chaos_log.append(f"t={started:6.1f}s SIGKILL redis-server, back on its AOF "
                                 f"after {run.elapsed() - started:.1f}s")
        else:
            victims = [t for t in run.terms if t.ready]
            victims = rng.sample(victims, math.ceil(len(victims) * rng.uniform(0.5, 1.0)))
            for term in victims:
                term.abort()
            run.chaos_log.append(f"t={started:6.1f}s reconnect storm: {len(victims)} sockets "
                                 f"dropped at once")


async def rebalance(run: Run) -> None:
    """Clients that fell over to the other broker go home some time after it is back."""
    rng = random.Random(run.rng.getrandbits(64))
    while not run.final:
        await asyncio.sleep(2.0)
        for term in run.terms:
            link = term.link
            home = run.brokers[term.home]
            if (link is not None and link.ready and link.broker != term.home and home.up
                    and time.monotonic() - home.up_since > 3 and rng.random() < 0.25
                    and not run.final):
                run.stats.migrations += 1
                run.spawn(term.close_gracefully())


async def sample_memory(run: Run) -> None:
    interval = 2.0 if run.duration <= 300 else 10.0
    while not run.stopping:
        for index, broker in enumerate(run.brokers):
            rss = broker.rss_kb() if broker.up else None
            conns = sum(1 for t in run.terms if t.link is not None and t.link.ready
                        and t.link.broker == index)
            if rss is not None and conns > 0:
                series = run.samples[(broker.name, broker.incarnation)]
                peak = max(conns, series[-1][3] if series else 0)
                series.append((time.monotonic() - broker.up_since, rss, conns, peak))
        await asyncio.sleep(interval)


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


# --- the checks ---------------------------------------------------------------------------------

async def compare_views(run: Run) -> tuple[int, int]:
    """(c): every mirror against a fresh snapshot of its channel, taken on both brokers."""
    check = run.checks["views"]
    for term in run.terms:
        if not term.synced:
            check.fail(f"{term.store.store_id}/{term.sub} never got back in sync "
                       f"(connected: {term.ready})")
    by_channel: dict[str, list[tuple[Term, Mirror]]] = defaultdict(list)
    for term in run.terms:
        if term.synced:
            for channel, mirror in term.mirrors.items():
                by_channel[channel].append((term, mirror))
    checkers: list[Term] = []
    for index in range(len(run.brokers)):
        checker = Term(run, run.stores[0], "manager", "chaos-checker", home=index)
        checker.counted = False
        await checker._connect(index)
        checkers.append(checker)
    compared = 0
    for channel, holders in sorted(by_channel.items()):
        store_id = channel.split(":")[1]
        for attempt in range(8):
            truths = []
            for checker in checkers:
                token = run.mint(store_id, "manager", "chaos-checker")
                truths.append(await fresh_snapshot(checker, token, channel))
            (seq, truth), (seq_b, truth_b) = truths
            if seq == seq_b and truth != truth_b:
                check.fail(f"{channel}@{seq}: brokers A and B disagree: "
                           f"{view_diff(truth, truth_b)}")
            if channel.startswith("store:") and attempt == 0:
                connected = {t.sub for t in run.terms if t.store.store_id == store_id
                             and t.ready} | {"chaos-checker"}
                if truth.terminals != connected:
                    run.checks["presence"].fail(
                        f"{channel}@{seq}: shown online but not connected "
                        f"{sorted(truth.terminals - connected)}; connected but shown offline "
                        f"{sorted(connected - truth.terminals)}")
            await wait_quietly(lambda s=seq, h=holders: all(
                m.seq is not None and m.seq >= s for _, m in h), 10)
            if any(m.seq is not None and m.seq > seq for _, m in holders) and attempt < 7:
                continue  # the channel moved on meanwhile (an expiry): look again
            for term, mirror in holders:
                compared += 1
                if mirror.seq != seq:
                    check.fail(f"{term.sub} {channel}: at seq {mirror.seq}, broker at {seq}")
                    continue
                diff = view_diff(mirror.view(), truth)
                if diff:
                    check.fail(f"{term.sub} {channel}@{seq}: {diff}")
            break
    for checker in checkers:
        await checker.close_gracefully()
    return compared, len(by_channel)


async def fresh_snapshot(checker: Term, token: str, channel: str) -> tuple[int, View]:
    """A fresh subscribe on a connection of the channel's store: (seq, state)."""
    store_id = channel.split(":")[1]
    link = checker.link
    if link is None or checker.store.store_id != store_id or link.closed:
        await checker.close_gracefully()
        checker.store = next(s for s in checker.run.stores if s.store_id == store_id)
        checker.token = token
        checker.session_id = None
        checker.mirrors = {}
        link = await checker._connect(checker.home)
    reply = await checker._call(link, "subscribe", {"channel": channel}, timeout=10)
    if reply is None or not reply.get("ok"):
        raise Fatal(f"checker could not subscribe to {channel}: {reply}")
    await checker._call(link, "unsubscribe", {"channel": channel}, timeout=10)
    return reply["seq"], snapshot_view(channel, reply["snapshot"])


def analyse_streams(run: Run) -> dict[str, int]:
    """(a), (b) and (e) on the union of every numbered event any observer saw, in seq order."""
    holders, fencing, paid_token = (run.checks[k] for k in ("holders", "fencing", "paid_token"))
    payments = run.checks["payments"]
    totals: Counter[str] = Counter()
    holes_in: dict[str, int] = {}
    acquired: dict[tuple[str, str], dict[int, tuple[str, str | None]]] = defaultdict(dict)
    for channel, numbered in sorted(run.events.items()):
        scope = "store" if channel.startswith("store:") else "order"
        store_id = channel.split(":")[1]
        current: dict[tuple[str, str], int | None] = defaultdict(lambda: UNKNOWN)
        top: dict[str, int] = {}
        versions: dict[str, int] = {}
        paid: dict[str, str | None] = {}
        previous: int | None = None
        holes = 0
        for seq in sorted(numbered):
            ev = numbered[seq][1]
            if previous is not None and seq != previous + 1:
                holes += 1
                current = defaultdict(lambda: UNKNOWN)
            previous = seq
            if scope == "store":
                totals[ev.name] += 1
            oid = ev.order_id or ""
            if ev.name == "lock.acquired" and ev.kind and ev.token is not None:
                key = (oid, ev.kind)
                held = current[key]
                if held not in (None, UNKNOWN):
                    holders.fail(f"{channel}#{seq}: {oid}/{ev.kind} token {ev.token} granted "
                                 f"to {ev.holder} while token {held} was held")
                if oid in top and ev.token <= top[oid]:
                    fencing.fail(f"{channel}#{seq}: {oid} token {ev.token} after {top[oid]}")
                top[oid] = max(top.get(oid, 0), ev.token)
                current[key] = ev.token
                if scope == "store":
                    acquired[(store_id, oid)][ev.token] = (ev.kind, ev.holder)
            elif ev.name in ("lock.released", "lock.expired", "lock.forced") and ev.kind:
                key = (oid, ev.kind)
                held = current[key]
                if held is None or (held != UNKNOWN and held != ev.token):
                    holders.fail(f"{channel}#{seq}: {ev.name} {oid}/{ev.kind} token "
                                 f"{ev.token}, but the current one is {held}")
                current[key] = None
            elif ev.name == "order.paid":
                held = current[(oid, "payment")]
                if held is None or (held != UNKNOWN and held != ev.pay_token):
                    paid_token.fail(f"{channel}#{seq}: {oid} paid with token {ev.pay_token}, "
                                    f"current payment lock {held}")
                if oid in paid:
                    payments.fail(f"{channel}#{seq}: {oid} paid twice: {paid[oid]} and "
                                  f"{ev.pay_ref}")
                paid[oid] = ev.pay_ref
                if ev.version is not None and oid in versions and ev.version < versions[oid]:
                    fencing.fail(f"{channel}#{seq}: {oid} paid at version {ev.version} "
                                 f"below {versions[oid]}")
            if ev.name == "order.updated" and ev.version is not None:
                if oid in versions and ev.version <= versions[oid]:
                    fencing.fail(f"{channel}#{seq}: {oid} version {ev.version} after "
                                 f"{versions[oid]}")
                versions[oid] = ev.version
        holes_in[channel] = holes
        totals["holes"] += holes
        totals["channels"] += 1
        totals["events"] += len(numbered)
    # every grant answered to a client is the grant the observers saw
    grants = run.checks["grants"]
    seen_tokens: dict[tuple[str, str, int], str] = {}
    for store_id, oid, kind, token, holder in run.grants:
        key3 = (store_id, oid, token)
        if seen_tokens.setdefault(key3, holder) != holder:
            holders.fail(f"{store_id}/{oid}: token {token} answered to {seen_tokens[key3]} "
                         f"and to {holder}")
        if holes_in.get(f"store:{store_id}", 0):
            continue
        event = acquired.get((store_id, oid), {}).get(token)
        if event is None:
            grants.fail(f"{store_id}/{oid}/{kind}: token {token} of {holder} has no "
                        f"lock.acquired on the store channel")
        elif event != (kind, holder):
            grants.fail(f"{store_id}/{oid}: token {token} granted as {(kind, holder)}, "
                        f"event says {event}")
    totals["grant_replies"] = len({(s, o, t) for s, o, _, t, _ in run.grants})
    return dict(totals)


def check_grace(run: Run) -> int:
    """A lock released `holder_disconnected` at `ts` says its holder had no connection since
    `ts - grace`; the harness knows when each terminal was connected. Slack: 2 s after the
    claimed disconnect (a dead broker's terminals count as gone from its last heartbeat) and
    0.5 s before the release."""
    check = run.checks["grace"]
    grace = STORE_CONFIG["disconnect_grace_ms"]
    terms = {(t.store.store_id, t.sub): t for t in run.terms}

    def connected(term: Term) -> list[tuple[float, float]]:
        # A killed broker's terminals count as gone from its last heartbeat, which a busy
        # machine may delay: a socket that a SIGKILL closed counts until 3 s before it.
        spans = []
        for a, b in term.online:
            if any(k <= b <= k + 2000 for k in run.kills):
                b = min(b, max(k for k in run.kills if k <= b) - 3000)
            spans.append((a, b))
        return spans

    seen = 0
    for channel, numbered in run.events.items():
        if not channel.startswith("store:"):
            continue
        store_id = channel.split(":")[1]
        for seq, (_, ev) in sorted(numbered.items()):
            if ev.name != "lock.released" or ev.reason != "holder_disconnected":
                continue
            seen += 1
            term = terms.get((store_id, ev.holder or ""))
            if term is None:
                continue
            low, high = ev.ts - grace + 2000, ev.ts - 500
            overlap = [(a, b) for a, b in connected(term) if a <= high and b >= low]
            if overlap:
                a, b = overlap[0]
                check.fail(f"{channel}#{seq}: {ev.order_id}/{ev.kind} token {ev.token} of "
                           f"{ev.holder} released holder_disconnected at t="
                           f"{run.at(ev.ts):.1f}s; the holder was connected from "
                           f"t={run.at(a):.1f}s to "
                           + ("the end" if b == math.inf else f"t={run.at(b):.1f}s"))
    return seen


async def check_payments(run: Run) -> str:
    """(b): replies, events and the audit log name the same single payment per order."""
    check = run.checks["payments"]
    for (store_id, oid), refs in run.paid_ok.items():
        if len(refs) > 1:
            check.fail(f"{store_id}/{oid}: {len(refs)} payments succeeded: {sorted(refs)}")
    events_paid: dict[tuple[str, str], tuple[str | None, int]] = {}
    for channel, numbered in run.events.items():
        if channel.startswith("store:"):
            store_id = channel.split(":")[1]
            for _, ev in numbered.values():
                if ev.name == "order.paid":
                    events_paid[(store_id, ev.order_id or "")] = (ev.pay_ref, ev.ts)
    for (store_id, oid), refs in run.paid_ok.items():
        got = events_paid.get((store_id, oid))
        if got is not None and got[0] not in refs:
            check.fail(f"{store_id}/{oid}: paid with {sorted(refs)}, order.paid says {got[0]}")
    audited = outside = 0
    for store in run.stores:
        token = run.mint(store.store_id, "manager", "chaos-auditor")
        status, body = await http("GET", run.brokers[0].port,
                                  f"/v1/stores/{store.store_id}/audit?kind=payment.completed"
                                  f"&limit=1000", token, timeout=10)
        if status != 200:
            check.fail(f"{store.store_id}: audit answered {status}: {body}")
            continue
        entries = body["entries"]
        audited += len(entries)
        per_order: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            per_order[entry["order_id"]].append(entry["detail"].get("payment_ref"))
        for oid, refs in per_order.items():
            if len(refs) > 1:
                check.fail(f"{store.store_id}/{oid}: {len(refs)} payment.completed audit "
                           f"entries: {refs}")
            ours = run.paid_ok.get((store.store_id, oid))
            if ours and refs[0] not in ours:
                check.fail(f"{store.store_id}/{oid}: audit says {refs[0]}, replies {ours}")
            seen = events_paid.get((store.store_id, oid))
            if seen is not None and seen[0] != refs[0]:
                check.fail(f"{store.store_id}/{oid}: audit says {refs[0]}, event {seen[0]}")
        oldest = min((e["ts"] for e in entries), default=None)
        truncated = len(entries) >= 1000
        for (store_id, oid), (ref, ts) in events_paid.items():
            if store_id != store.store_id:
                continue
            if truncated and oldest is not None and ts < oldest:
                outside += 1
                continue
            if oid not in per_order:
                check.fail(f"{store_id}/{oid}: order.paid ({ref}) without a payment.completed "
                           f"audit entry")
    unconfirmed = sum(1 for key in events_paid if key not in run.paid_ok)
    return (f"{len(events_paid)} orders paid, {audited} audit entries"
            + (f" ({outside} older than the audit window)" if outside else "")
            + f", {unconfirmed} paid without a reply seen")


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


# --- the report ---------------------------------------------------------------------------------

def check_linearizable(run: Run) -> None:
    """(f): every payment-lock request and its reply fit one order of the requests per order
    that respects real time and the lock rules (bench/linearizability.py)."""
    check = run.checks["linearizable"]
    started = time.monotonic()
    shortest_ms = min(H5_TTL_MS, STORE_CONFIG["erp_lock_ttl_ms"],
                      STORE_CONFIG["disconnect_grace_ms"])
    ops = run.history.operations
    result = run.history.check(shortest_ms / 1000 - CLOCK_SLACK_S, LINEARIZABILITY_BUDGET)
    run.history.save(run.tmp / "history.jsonl")
    for part in result.failures:
        last = part.longest[-1] if part.longest else None
        check.fail(f"{part.order_id}: no linearization of its {part.operations} requests; "
                   f"the longest valid prefix ends with {last}")
    for part in result.unknown:
        check.fail(f"{part.order_id}: the search gave up after {part.configurations} "
                   f"configurations ({part.operations} requests)")
    unanswered = sum(op.indeterminate for op in ops)
    searched = sum(p.configurations for p in result.partitions)
    biggest = max((p.operations for p in result.partitions), default=0)
    check.detail = (f"{len(ops)} requests ({unanswered} without a definite answer) on "
                    f"{len(result.partitions)} orders (largest {biggest}), {searched} "
                    f"configurations searched in {time.monotonic() - started:.1f}s")


def report(run: Run, totals: dict[str, int], views: tuple[int, int], pay_detail: str,
           mem_detail: str) -> bool:
    s = run.stats
    args = run.args
    ops = sum(s.ops.values())
    requests = sum(s.requests.values())
    codes: Counter[str] = Counter()
    for (_, code), n in s.requests.items():
        codes[code] += n
    traffic_s = args.minutes * 60
    forced = totals.get("lock.forced", 0)
    expired = totals.get("lock.expired", 0)
    released: Counter[str] = Counter()
    for channel, numbered in run.events.items():
        if channel.startswith("store:"):
            for _, ev in numbered.values():
                if ev.name == "lock.released":
                    released[ev.reason or "?"] += 1
    width = 78
    print("=" * width)
    print(f"tablelock soak and chaos run   seed {run.seed}   {args.minutes:g} min of traffic   "
          f"{args.stores} stores x {args.tables} tables")
    print(f"brokers A :{run.brokers[0].port}  B :{run.brokers[1].port}   redis :{run.redis.port} "
          f"(appendonly)   {len(run.terms)} terminals")
    print("-" * width)
    rows = [
        ("duration", f"{traffic_s:.0f}s of traffic, {run.elapsed():.0f}s in all"),
        ("operations", f"{ops} ({ops / traffic_s:.1f}/s), {s.skipped_busy} skipped (busy), "
                       f"{s.skipped_offline} skipped (offline)"),
        ("requests", f"{requests}: " + ", ".join(f"{c} {n}" for c, n in codes.most_common(9))),
        ("grants", f"{totals.get('lock.acquired', 0)} lock.acquired, "
                   f"{totals.get('grant_replies', 0)} distinct tokens answered"),
        ("forces", f"{forced} lock.forced ({s.ops['erp.force']} forced acquires, "
                   f"{s.ops['erp.force_publish']} forced publishes, "
                   f"{s.ops['manager.force_release']} manager releases)"),
        ("expiries", f"{expired} lock.expired; released: "
                     + ", ".join(f"{r} {n}" for r, n in sorted(released.items()))),
        ("payments", f"{totals.get('order.paid', 0)} orders paid; replies: {s.payments_ok} ok, "
                     f"{s.payment_retries_ok} ok again for a retried ref, "
                     f"{sum(s.payments_rejected.values())} refused ("
                     + ", ".join(f"{c} {n}" for c, n in s.payments_rejected.most_common())
                     + f"), {s.payments_unresolved} never answered"),
        ("reconnects", f"{s.reconnects} ({s.resumed} resumed, {s.since_recovered} channels "
                       f"recovered by since, {s.snapshot_fallbacks} by snapshot, "
                       f"{s.migrations} moved home, {s.gap_resyncs} after a gap); "
                       f"failed attempts: {sum(s.connect_failures.values())}"),
        ("events", f"{totals.get('events', 0)} distinct on {totals.get('channels', 0)} "
                   f"channels, {totals.get('holes', 0)} holes nobody saw, "
                   f"{s.contended} lock.contended"),
        ("chaos", f"{len(run.chaos_log)} events"),
    ]
    for name, text in rows:
        print(f"{name:<12}{text}")
    for line in run.chaos_log:
        print(f"{'':<12}{line}")
    if s.reader_errors:
        print(f"{'errors':<12}" + " | ".join(s.reader_errors))
    print("-" * width)
    details = {
        "holders": f"{totals.get('lock.acquired', 0)} grants replayed in seq order",
        "fencing": f"{totals.get('channels', 0)} channels",
        "paid_token": f"{totals.get('order.paid', 0)} order.paid events",
        "grants": f"{totals.get('grant_replies', 0)} tokens from replies",
        "grace": f"{totals.get('holder_disconnected', 0)} holder_disconnected releases "
                 f"against the terminals' connection times",
        "presence": f"{len(run.stores)} store snapshots against the harness's connections",
        "payments": pay_detail,
        "views": f"{views[0]} mirrors on {views[1]} channels vs fresh snapshots on A and B",
        "recovery": f"{s.since_recovered} recoveries compared",
        "delivery": f"{totals.get('events', 0)} events; seq gaps: {s.gaps_after_resume} on "
                    f"resumed connections, {s.gap_resyncs - s.gaps_after_resume} on others",
        "memory": mem_detail,
    }
    ok = True
    for key, check in run.checks.items():
        verdict = "SKIP" if check.skipped else "PASS" if check.count == 0 else "FAIL"
        ok = ok and verdict != "FAIL"
        detail = details.get(key, check.detail) + (
            f"; {check.count} violations" if check.count else "")
        print(f"{verdict}  {check.name}")
        print(f"      {detail}")
        for example in check.examples:
            print(f"      ! {example}")
    print("-" * width)
    print("RESULT: " + ("PASS" if ok else f"FAIL (logs kept in {run.tmp})"))
    print("=" * width, flush=True)
    return ok


# --- main ---------------------------------------------------------------------------------------

async def main_async(run: Run) -> bool:
    await setup(run)
    run.t0 = time.monotonic()
    run.t0_wall = time.time()
    run.traffic_end = run.t0 + run.duration
    background = [run.spawn(chaos(run)), run.spawn(rebalance(run)),
                  run.spawn(sample_memory(run))]
    await traffic(run)
    chaos_task = background[0]
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(chaos_task), 40)
    await settle(run)
    views = await compare_views(run)
    totals = analyse_streams(run)
    totals["holder_disconnected"] = check_grace(run)
    pay_detail = await check_payments(run)
    check_linearizable(run)
    run.stopping = True
    mem_detail = check_memory(run)
    return report(run, totals, views, pay_detail, mem_detail)


async def shutdown(run: Run) -> None:
    run.stopping = True
    run.final = True
    for term in run.terms:
        term.abort()
    tasks = [t for t in run.tasks if not t.done()]
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)


async def run_all(args: argparse.Namespace) -> int:
    run = Run(args)
    ok = False
    try:
        budget = args.minutes * 60 + 100  # setup, settling and checks take seconds
        ok = await asyncio.wait_for(main_async(run), budget)
        if run.stats.reader_errors:  # the harness itself failed: its verdicts mean nothing
            print("chaos run could not complete: errors in the harness: "
                  + " | ".join(run.stats.reader_errors), flush=True)
            ok = False
            return 2
        return 0 if ok else 1
    except (Fatal, RuntimeError, TimeoutError) as exc:
        print(f"chaos run could not complete: {type(exc).__name__}: {exc} "
              f"(logs in {run.tmp})", flush=True)
        return 2
    finally:
        await shutdown(run)
        for broker in run.brokers:
            broker.kill()
        run.redis.kill()
        _kill_children()
        if run.trace_file is not None:
            run.trace_file.close()
        shutil.rmtree(run.redis.dir, ignore_errors=True)  # the AOF; the logs stay on failure
        if ok and not args.keep:
            shutil.rmtree(run.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="traffic time (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stores", type=int, default=5)
    parser.add_argument("--tables", type=int, default=8, help="tables (one phone each) per store")
    parser.add_argument("--rate", type=float, default=20.0, help="actions per second in all")
    parser.add_argument("--chaos", default="broker,redis,storm",
                        help="faults to inject, comma-separated: broker (SIGKILL and restart "
                             "broker B), redis (SIGKILL and restart Redis on its AOF), storm "
                             "(many sockets dropped at once); empty for none")
    parser.add_argument("--keep", action="store_true", help="keep the logs even on success")
    parser.add_argument("--trace", action="store_true",
                        help="write every frame to trace.jsonl in the logs directory")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_kill_children(), sys.exit(143)))
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    sys.exit(main())
