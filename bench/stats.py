"""What one load-generator process counts during a run, and how events are timed.

Fan-out latency is the time from sending a `lock.acquire` until a subscriber holds the
`lock.acquired` event for that grant. An event names its lock's order and fencing token; the
actor records its send time under that token once the reply says which token it got. An
event that arrives before the reply waits in `early` until then.
"""

from __future__ import annotations

import time
from typing import Any

from .codec import LockRef, Msg
from .hist import Hist


class Track:
    """One actor-driven order: send time per granted token, and events that came first."""

    __slots__ = ("early", "sent")

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.early: list[tuple[int, float]] = []


class Stats:
    def __init__(self) -> None:
        self.tracks: dict[str, Track] = {}
        self.clock_offset_ms = 0.0  # broker clock minus time.time(), for expiry lateness
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.events = 0
        self.pairs = 0
        self.errors: dict[str, int] = {}
        self.reply = Hist()
        self.fanout = Hist()
        self.expiry = Hist()
        self.expired = 0
        self.early_expiries = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    # --- events ---------------------------------------------------------------------------

    def on_event(self, msg: Msg, now: float) -> None:
        self.events += 1
        name = msg.event
        if name == "lock.acquired":
            lock = msg.lock
            if lock is not None:
                self._acquired_seen(lock, now)
        elif name == "lock.expired" and msg.lock is not None:
            self._expired_seen(msg.lock)

    def _acquired_seen(self, lock: LockRef, now: float) -> None:
        track = self.tracks.get(lock.order_id)
        if track is None:
            return
        sent = track.sent.get(lock.token)
        if sent is not None:
            self.fanout.add(now - sent)
        elif len(track.early) < 4096:
            track.early.append((lock.token, now))

    def granted(self, order_id: str, token: int, sent: float) -> None:
        """The actor's acquire was answered with `token`: time the events that came first."""
        track = self.tracks[order_id]
        track.sent[token] = sent
        if len(track.sent) > 8:
            del track.sent[next(iter(track.sent))]
        if track.early:
            keep = []
            for early_token, seen in track.early:
                if early_token == token:
                    self.fanout.add(seen - sent)
                elif early_token > token:
                    keep.append((early_token, seen))
            track.early = keep

    def _expired_seen(self, lock: LockRef) -> None:
        late_ms = time.time() * 1000 + self.clock_offset_ms - lock.expires_at
        self.expired += 1
        if late_ms < 0:
            self.early_expiries += 1
        self.expiry.add(max(late_ms, 0.0) / 1000)

    def to_json(self) -> dict[str, Any]:
        return {"frames": self.frames, "events": self.events, "pairs": self.pairs,
                "errors": self.errors, "reply": self.reply.to_json(),
                "fanout": self.fanout.to_json(), "expiry": self.expiry.to_json(),
                "expired": self.expired, "early_expiries": self.early_expiries}
