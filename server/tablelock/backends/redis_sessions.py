"""Stream epochs and resumable sessions in Redis, readable by every broker.

Epoch: one per store, a field of the store's seq hash, where every channel of the store is
numbered (made and read by redis_lua's `epoch_of`). Redis that lost the hash (restarted
without persistence, a failover that lost writes) lost the epoch with it, and the first
reader writes a new one: a client's (seq, epoch) of the old numbering then no longer matches.

Session: a small hash per session id, under the store's hash tag (one Cluster slot with
the store), replaced whole by one script (KEEP_SESSION), with a TTL: the disconnect grace
once detached, a day while a connection holds
it (refreshed at every subscribe and unsubscribe). A broker killed outright never writes
the detach: the session keeps the positions of its last subscribe, older than what was
delivered, so a resume replays duplicates (clients drop a seq they had), never a gap.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .base import StoredSession

HOLDER_FIELD = "holder"
CHANNEL_FIELD = "c:"  # + channel: "<seq> <epoch>"
# How long a session held by a connection is kept when its broker dies without a word.
ATTACHED_TTL_MS = 86_400_000


def session_key(prefix: str, store_id: str, session_id: str) -> str:
    return f"{prefix}{{store:{store_id}}}:sess:{session_id}"


Call = Callable[..., Awaitable[Any]]  # RedisLink.execute: (routing key, *command)


def session_fields(session: StoredSession) -> list[str]:
    """The session as the flat field/value list KEEP_SESSION (redis_lua) stores."""
    fields = [HOLDER_FIELD, session.holder]
    for channel, (seq, epoch) in session.positions.items():
        fields += [CHANNEL_FIELD + channel, f"{seq} {epoch}"]
    return fields


def session_ttl_ms(ttl_ms: int | None) -> int:
    return ttl_ms if ttl_ms is not None else ATTACHED_TTL_MS


async def find_session(call: Call, key: str) -> StoredSession | None:
    flat: list[bytes] = await call(key, "HGETALL", key)
    raw = dict(zip(flat[::2], flat[1::2], strict=True))
    holder = raw.get(HOLDER_FIELD.encode())
    if holder is None:
        return None
    positions: dict[str, tuple[int, str]] = {}
    for name, value in raw.items():
        field = name.decode()
        if field.startswith(CHANNEL_FIELD):
            seq, _, epoch = value.decode().partition(" ")
            positions[field[len(CHANNEL_FIELD):]] = (int(seq), epoch)
    return StoredSession(holder.decode(), positions)
