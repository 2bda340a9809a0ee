"""Presence on Redis: which terminals are connected through which broker, the order
authority, and a phone's linger before it is said gone."""

from __future__ import annotations

import asyncio
import contextlib

from ..model import Event, Terminal, holder_key
from ..protocol import encode, event_body
from ..rules import has_grace, is_first_authority, presence_lingers
from .base import Unavailable
from .redis_core import RedisCore, as_text, hash_fields, terminal_decoder


class RedisPresence(RedisCore):
    """Presence on Redis: this broker's connections, said to Redis one terminal at a time."""

    async def terminal_up(self, terminal: Terminal, authority: bool = False) -> None:
        key = (terminal.store_id, holder_key(terminal))
        lingering = self._lingering.pop(key, None)
        if lingering is not None:  # a phone back within its linger: Redis never saw it go
            lingering.cancel()
        _, count, was_authority = self._local.get(key, (terminal, 0, False))
        self._local[key] = (terminal, count + 1, authority or was_authority)
        await self._listen_to_store(terminal.store_id, +1)
        await self._sync_presence(key, terminal)

    async def terminal_down(self, terminal: Terminal) -> None:
        key = (terminal.store_id, holder_key(terminal))
        entry = self._local.get(key)
        if entry is None:
            return
        if entry[1] > 1:
            self._local[key] = (entry[0], entry[1] - 1, entry[2])
        elif presence_lingers(terminal.role) and self._linger_s > 0:
            # As in the memory backend: a phone is said gone only after the linger, so that
            # one reconnecting in a loop cannot flush the store channel's history.
            self._local[key] = (entry[0], 0, entry[2])
            self._lingering[key] = asyncio.get_running_loop().call_later(
                self._linger_s, self._linger_ended, key, terminal)
            await self._listen_to_store(terminal.store_id, -1)
            return
        else:
            del self._local[key]
        try:
            await self._sync_presence(key, terminal)
        finally:
            await self._listen_to_store(terminal.store_id, -1)

    async def online_terminals(self, store_id: str) -> list[Terminal]:
        key = self.keys(store_id).terms
        values = await self._call(key, "HVALS", key)
        return [terminal_decoder.decode(v) for v in values]

    async def authority(self, store_id: str) -> str | None:
        """The broker holding the store's order authority: an erp_main first, ours first."""
        key = self.keys(store_id).auths
        fields = hash_fields(await self._call(key, "HGETALL", key))
        best: tuple[bool, bool, str] | None = None
        for name, role in fields.items():
            broker = as_text(name).rsplit("|", 1)[-1]
            rank = (is_first_authority(as_text(role)), broker == self.broker_id, broker)
            if best is None or rank > best:
                best = rank
        return best[2] if best else None

    def _linger_ended(self, key: tuple[str, str], terminal: Terminal) -> None:
        self._lingering.pop(key, None)
        entry = self._local.get(key)
        if entry is None or entry[1] > 0:
            return
        del self._local[key]
        task = asyncio.get_running_loop().create_task(self._say_gone(key, terminal))
        self._linger_tasks.add(task)
        task.add_done_callback(self._linger_tasks.discard)

    async def _say_gone(self, key: tuple[str, str], terminal: Terminal) -> None:
        with contextlib.suppress(Unavailable):  # said again once Redis is back (_presence_unsent)
            await self._sync_presence(key, terminal)

    async def _sync_presence(self, key: tuple[str, str], terminal: Terminal) -> None:
        """Tell Redis how many connections this broker has for the terminal *now*. One at a
        time per terminal, so that a goodbye's count can't land after the next hello's; one
        that fails is said again after Redis returns (see _resync)."""
        lock = self._presence_locks.get(key)
        if lock is None:
            lock = self._presence_locks[key] = asyncio.Lock()
        async with lock:
            entry = self._local.get(key)
            count, authority = (entry[1], entry[2]) if entry else (0, False)
            try:
                await self._announce(terminal, count, authority)
            except Unavailable:
                self._presence_unsent[key] = terminal
                raise
            self._presence_unsent.pop(key, None)
        if key not in self._local and not lock.locked():
            self._presence_locks.pop(key, None)

    async def _announce(self, terminal: Terminal, count: int, authority: bool,
                        broker_id: str | None = None, since: int | None = None) -> None:
        keys = self.keys(terminal.store_id)
        holder = holder_key(terminal)
        now = await self.now()
        online = event_body(Event("terminal.online", now, terminal=terminal))
        offline = event_body(Event("terminal.offline", now, terminal=terminal))
        before, after = await self._guard(self._evalsha("PRESENCE",
            keys=[keys.state, keys.terms, keys.conns, keys.auths, keys.seqs, keys.hist_store,
                  keys.holders + holder],
            args=[holder, broker_id or self.broker_id, count, encode(terminal),
                  terminal.role, "1" if authority else "0", keys.store_channel, online,
                  keys.store_events, self._history_size, "" if since is None else since,
                  "1" if has_grace(terminal.role) else "0", offline, self._publish_command]))
        if has_grace(terminal.role) and (before == 0) != (after == 0):
            self._states.pop(terminal.store_id, None)
            await self._retick_store(terminal.store_id)

    async def _reannounce(self) -> None:
        """Say every local connection again, and what Redis missed (idempotent)."""
        terminals = {key: entry[0] for key, entry in self._local.items()}
        terminals.update(self._presence_unsent)
        for key, terminal in terminals.items():
            with contextlib.suppress(Unavailable):
                await self._sync_presence(key, terminal)
