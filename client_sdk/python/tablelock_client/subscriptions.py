"""Subscriptions: the mirrors of the channels this client follows, and the raw event feed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .connection import Frame
from .errors import Disconnected, TablelockError
from .mirror import Change, ChangeSink, ChangeStream, Mirror, OrderMirror, StoreMirror
from .model import StoreConfig, convert
from .requests import Requests
from .session import Session

log = logging.getLogger("tablelock_client")

M = TypeVar("M", bound=Mirror)


class Subscriptions:
    """Keeps one mirror per subscribed channel live across reconnects and seq gaps.

    `on_lock_event` gets every event that reaches the client, replayed ones
    included, so that the held locks learn how they ended.
    """

    def __init__(self, session: Session, requests: Requests,
                 on_lock_event: Callable[[Frame], None]) -> None:
        self.session = session
        self.requests = requests
        self.on_lock_event = on_lock_event
        self.mirrors: dict[str, Mirror] = {}
        self.event_sinks: set[ChangeSink] = set()
        self._event_callbacks: list[Callable[[Frame], None]] = []

    # --- subscribe ----------------------------------------------------------------------------

    def channel_of_order(self, order_id: str) -> str:
        return f"order:{self.session.store_id}:{order_id}"

    @property
    def store_channel(self) -> str:
        return f"store:{self.session.store_id}"

    async def subscribe(self, channel: str) -> Mirror:
        existing = self.mirrors.get(channel)
        if existing is not None:
            return existing
        kind = StoreMirror if channel.startswith("store:") else OrderMirror
        return await self.subscribe_as(channel, kind)

    async def subscribe_as(self, channel: str, kind: type[M]) -> M:
        """The mirror of `channel`, of the given kind (a new one if another kind was kept)."""
        existing = self.mirrors.get(channel)
        if isinstance(existing, kind):
            return existing
        if self.session.closed or not self.session.connected:
            raise Disconnected("not connected to the broker")
        mirror = kind(channel, self._resync)
        self.mirrors[channel] = mirror  # before the request: its events must find it
        gen = mirror.begin_sync()
        try:
            reply = await self.requests.request("subscribe", channel=channel)
        except BaseException:
            if self.mirrors.get(channel) is mirror:
                del self.mirrors[channel]
            raise
        if isinstance(mirror, StoreMirror):
            mirror.config = self.session.config
        mirror.apply_subscribe(gen, reply, None)
        return mirror

    async def unsubscribe(self, channel: str) -> None:
        mirror = self.mirrors.pop(channel, None)
        if mirror is not None:
            mirror.shut()
        if self.session.connected:
            await self.requests.request("unsubscribe", channel=channel)

    async def _sync(self, mirror: Mirror, gen: int, since: int | None) -> None:
        params: dict[str, Any] = {"channel": mirror.channel}
        if since is not None:  # a position: the seq and the epoch it was numbered in
            params.update(since=since, epoch=mirror.epoch)
        try:
            reply = await self.session.request("subscribe", params)
        except Disconnected:
            return  # the next connection starts over
        except TablelockError as exc:
            log.warning("re-subscribing to %s: %s", mirror.channel, exc)
            return
        if isinstance(mirror, StoreMirror):
            mirror.config = self.session.config
        for frame in mirror.apply_subscribe(gen, reply, since) or ():
            self.on_lock_event(frame)

    def _resync(self, mirror: Mirror) -> None:
        """A seq gap: take a new snapshot (subscribe without since)."""
        if self.session.connected and self.mirrors.get(mirror.channel) is mirror:
            self.session.spawn(self._sync(mirror, mirror.begin_sync(), None))

    # --- the raw event feed -------------------------------------------------------------------

    def on_event(self, callback: Callable[[Frame], None]) -> Callable[[], None]:
        self._event_callbacks.append(callback)
        return lambda: (self._event_callbacks.remove(callback)
                        if callback in self._event_callbacks else None)

    def events(self) -> ChangeStream:
        return ChangeStream(self.event_sinks)

    def event_received(self, frame: Frame) -> None:
        """An event frame from the broker: to its mirror, the held locks, then the listeners."""
        channel = frame.get("channel")
        if channel:
            mirror = self.mirrors.get(channel)
            if mirror is not None:
                mirror.feed(frame)
            if frame.get("event") == "config.updated" and frame.get("config"):
                self.session.config = convert(frame["config"], StoreConfig)
        self.on_lock_event(frame)
        change = Change(channel or "", str(frame.get("event", "")), frame.get("seq"), frame)
        for callback in list(self._event_callbacks):
            try:
                callback(frame)
            except Exception:
                log.exception("event callback failed")
        for sink in list(self.event_sinks):
            sink.put(change)

    # --- following the connection (a SessionPart) ----------------------------------------------

    def connection_up(self) -> Callable[[], Awaitable[None]]:
        # Mark the mirrors before the reader runs on: replayed events wait for the snapshot.
        gens = {mirror: mirror.begin_sync() for mirror in self.mirrors.values()}
        return lambda: self._resubscribe(gens)

    def connection_down(self) -> None:
        for mirror in self.mirrors.values():
            mirror.mark_stale()

    async def _resubscribe(self, gens: dict[Mirror, int]) -> None:
        """Re-subscribe every channel at its position (`since` and `epoch`): the one way
        back, on whichever broker this is. Our own last seq, not what a broker counted
        as delivered (what was queued on the dead socket is recovered too); another
        epoch (the numbering started over) is answered with a snapshot."""
        await asyncio.gather(*(self._sync(mirror, gen, mirror.seq if mirror.synced else None)
                               for mirror, gen in gens.items()))

    def shut(self) -> None:
        for mirror in self.mirrors.values():
            mirror.shut()
        for sink in list(self.event_sinks):
            sink.put(None)
