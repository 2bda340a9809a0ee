"""The in-memory backend's write-ahead file (`serve --data PATH`): SQLite in WAL mode.

The memory backend stays the state and the rules' home; this file only keeps what must
outlive the process: order records (locks, fencing counters, versions, payments), store
configs and the audit log with its handled flags. Presence, channel seqs and histories are
not kept: after a restart every terminal is offline and every channel starts from the clock.

A commit with `synchronous=FULL` waits for an fsync (0.6 to 6 ms on the virtual disk this was
measured on): done on the event loop, it would stall every connection. So writes are queued, one
thread commits them in batches (a group commit: what queued during one fsync goes in the next),
and whatever depends on them (replies, reads, published events) waits until the batch that
holds them is on disk. Nothing acknowledged is lost; a write the process dies before syncing
was never acknowledged, nor shown to anyone.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ..model import OrderRecord, StoreConfig
from .base import EventSink, Unavailable

log = logging.getLogger("tablelock.durable")

Synchronous = Literal["FULL", "NORMAL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS record (
    store_id TEXT NOT NULL, order_id TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (store_id, order_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS config (store_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    store_id TEXT NOT NULL, id INTEGER NOT NULL, body BLOB NOT NULL,
    unhandled INTEGER NOT NULL, PRIMARY KEY (store_id, id)) WITHOUT ROWID;
"""

_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(OrderRecord)
_config_decoder = msgspec.msgpack.Decoder(StoreConfig)


class _AuditTime(msgspec.Struct):
    ts: int


_audit_time_decoder = msgspec.json.Decoder(_AuditTime)

# One queued statement: (sql, parameters).
Statement = tuple[str, tuple[Any, ...]]


@dataclass
class Saved:
    """What the file held at start-up."""

    records: dict[tuple[str, str], OrderRecord]  # (store_id, order_id) -> record
    configs: dict[str, StoreConfig]
    # store -> [(id, raw entry, unhandled)], oldest first: the newest `audit_size` entries of
    # each store and every unhandled one.
    audit: dict[str, list[tuple[int, bytes, bool]]]
    last_audit_id: int
    # The latest time the file records (a token, a grant, an audit entry): the clock starts
    # past it, so that tokens keep increasing even if the wall clock went back.
    latest_ms: int


@dataclass
class _Batch:
    statements: list[Statement] = field(default_factory=list)
    effects: list[Callable[[], None]] = field(default_factory=list)
    synced: asyncio.Future[None] | None = None


class Journal:
    """Queued writes to one SQLite file, committed in batches by one thread."""

    def __init__(self, path: str, synchronous: Synchronous = "FULL") -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # One broker per file: two would each hold their own state and overwrite each other.
        # The lock is taken now and held until the process ends (the OS drops it on a kill).
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise RuntimeError(f"data file {path}: {exc} (is another broker using it?)") from exc
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tablelock-data")
        self._next = _Batch()
        self._writing: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None

    # --- start-up -----------------------------------------------------------------------

    def load(self, audit_size: int) -> Saved:
        """Read everything back, and drop the audit entries no longer listed."""
        db = self._db
        records = {(store_id, order_id): _record_decoder.decode(body)
                   for store_id, order_id, body in db.execute(
                       "SELECT store_id, order_id, body FROM record")}
        configs = {store: _config_decoder.decode(body) for store, body in db.execute(
            "SELECT store_id, body FROM config")}
        audit: dict[str, list[tuple[int, bytes, bool]]] = {}
        latest = max((rec.fence for rec in records.values()), default=0)
        db.execute("BEGIN")
        for (store_id,) in db.execute("SELECT DISTINCT store_id FROM audit").fetchall():
            oldest_listed = db.execute(
                "SELECT id FROM audit WHERE store_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                (store_id, audit_size - 1)).fetchone()
            if oldest_listed is not None:
                db.execute("DELETE FROM audit WHERE store_id = ? AND id < ? AND NOT unhandled",
                           (store_id, oldest_listed[0]))
            kept = db.execute("SELECT id, body, unhandled FROM audit WHERE store_id = ? "
                              "ORDER BY id", (store_id,)).fetchall()
            audit[store_id] = [(i, body, bool(unhandled)) for i, body, unhandled in kept]
            latest = max(latest, _audit_time_decoder.decode(kept[-1][1]).ts)
        db.execute("COMMIT")
        (last_audit_id,) = db.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()
        return Saved(records, configs, audit, last_audit_id, latest)

    # --- writes ---------------------------------------------------------------------------

    def put_record(self, store_id: str, order_id: str, record: OrderRecord | None) -> None:
        if record is None:
            self._queue("DELETE FROM record WHERE store_id = ? AND order_id = ?",
                        (store_id, order_id))
        else:
            self._queue("INSERT OR REPLACE INTO record VALUES (?, ?, ?)",
                        (store_id, order_id, _record_encoder.encode(record)))

    def put_config(self, store_id: str, config: StoreConfig) -> None:
        self._queue("INSERT OR REPLACE INTO config VALUES (?, ?)",
                    (store_id, _record_encoder.encode(config)))

    def add_audit(self, store_id: str, entry_id: int, raw: bytes, unhandled: bool) -> None:
        self._queue("INSERT OR REPLACE INTO audit VALUES (?, ?, ?, ?)",
                    (store_id, entry_id, raw, unhandled))

    def evict_audit(self, store_id: str, entry_id: int) -> None:
        """The entry left the bounded log: its row goes too, unless it is still unhandled."""
        self._queue("DELETE FROM audit WHERE store_id = ? AND id = ? AND NOT unhandled",
                    (store_id, entry_id))

    def mark_handled(self, store_id: str, entry_id: int) -> None:
        self._queue("UPDATE audit SET unhandled = 0 WHERE store_id = ? AND id = ?",
                    (store_id, entry_id))

    def _queue(self, sql: str, params: tuple[Any, ...]) -> None:
        self._next.statements.append((sql, params))
        if self._writing is None:
            self._writing = asyncio.get_running_loop().create_task(self._write())

    def check(self) -> None:
        """Refuse to change anything once a write failed: memory is then ahead of the file,
        and only a restart (which reads the file) makes the two agree again."""
        if self.failed is not None:
            raise Unavailable(f"the data file could not be written: {self.failed}")

    # --- what waits for the writes ----------------------------------------------------

    def after_sync(self, effect: Callable[[], None]) -> None:
        """Run `effect` once everything queued so far is on disk (at once if it is)."""
        if self._writing is None:
            effect()
        else:
            self._next.effects.append(effect)

    async def synced(self) -> None:
        """Until everything queued so far is on disk."""
        if self._writing is None:
            self.check()
            return
        batch = self._next
        if batch.synced is None:
            batch.synced = asyncio.get_running_loop().create_future()
        await asyncio.shield(batch.synced)

    async def _write(self) -> None:
        """Commit batch after batch until none is left: what queues during a commit goes in
        the next one."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch, self._next = self._next, _Batch()
                error: BaseException | None = None
                if self.failed is None and batch.statements:
                    try:
                        await loop.run_in_executor(self._thread, self._commit, batch.statements)
                    except (sqlite3.Error, OSError) as exc:
                        log.critical("the data file %s could not be written: %s", self.path, exc)
                        self.failed = exc
                if self.failed is not None:
                    error = Unavailable(f"the data file could not be written: {self.failed}")
                else:
                    for effect in batch.effects:
                        effect()
                if batch.synced is not None and not batch.synced.done():
                    if error is None:
                        batch.synced.set_result(None)
                    else:
                        batch.synced.set_exception(error)
                if not (self._next.statements or self._next.effects or self._next.synced):
                    return
        finally:
            self._writing = None

    def _commit(self, statements: list[Statement]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for sql, params in statements:
                db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._writing is not None:
            await asyncio.shield(self._writing)
        self._thread.shutdown()
        self._db.close()


class AfterSync:
    """The sink as the backend sees it with a journal: every event goes out only once the
    writes that produced it are on disk, in the order it was given."""

    def __init__(self, sink: EventSink, journal: Journal) -> None:
        self._sink = sink
        self._journal = journal

    def publish(self, channel: str, seq: int, frame: bytes, table_id: str | None) -> None:
        self._journal.after_sync(lambda: self._sink.publish(channel, seq, frame, table_id))

    def direct(self, store_id: str, holder: str, frame: bytes,
               unless_on: tuple[str, ...], coalesce: str = "") -> None:
        self._journal.after_sync(
            lambda: self._sink.direct(store_id, holder, frame, unless_on, coalesce))

    def has_subscribers(self, channel: str) -> bool:
        return self._sink.has_subscribers(channel)

    def lost(self, channel: str) -> None:
        self._journal.after_sync(lambda: self._sink.lost(channel))
