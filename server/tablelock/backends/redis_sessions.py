"""Stream epochs and resumable sessions in Redis, readable by every broker.

Epoch: one per store, a field of the store's seq hash, where every channel of the store is
numbered. Redis that lost the hash (restarted without persistence, a failover that lost
writes) lost the epoch with it, and the first reader writes a new one: a client's
(seq, epoch) of the old numbering then no longer matches.

Session: a small hash per session id, under the store's hash tag (one Cluster slot with
the store), with a TTL: the disconnect grace once detached, a day while a connection holds
it (refreshed at every subscribe and unsubscribe). A broker killed outright never writes
the detach: the session keeps the positions of its last subscribe, older than what was
delivered, so a resume replays duplicates (clients drop a seq they had), never a gap.
"""

from __future__ import annotations

import secrets
from typing import Any

from .base import StoredSession

EPOCH_FIELD = "epoch"  # not a channel name: those are store:... and order:...
HOLDER_FIELD = "holder"
CHANNEL_FIELD = "c:"  # + channel: "<seq> <epoch>"
# How long a session held by a connection is kept when its broker dies without a word.
ATTACHED_TTL_MS = 86_400_000


def session_key(prefix: str, store_id: str, session_id: str) -> str:
    return f"{prefix}{{store:{store_id}}}:sess:{session_id}"


async def stream_epoch(client: Any, seq_key: str) -> str:
    """The store's epoch, made if Redis has none (a new or a lost seq hash)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hsetnx(seq_key, EPOCH_FIELD, secrets.token_hex(4))
        pipe.hget(seq_key, EPOCH_FIELD)
        _, epoch = await pipe.execute()
    return epoch.decode() if isinstance(epoch, bytes) else str(epoch)


async def keep_session(client: Any, key: str, session: StoredSession, ttl_ms: int | None,
                       atomic: bool = True) -> None:
    """Replace the session. `atomic`: in one MULTI, so that a resume reading it meanwhile
    never finds it gone (a Cluster pipeline cannot: there a resume may miss it, rarely)."""
    fields = {HOLDER_FIELD: session.holder}
    for channel, (seq, epoch) in session.positions.items():
        fields[CHANNEL_FIELD + channel] = f"{seq} {epoch}"
    async with client.pipeline(transaction=atomic) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, ttl_ms if ttl_ms is not None else ATTACHED_TTL_MS)
        await pipe.execute()


async def find_session(client: Any, key: str) -> StoredSession | None:
    raw: dict[bytes, bytes] = await client.hgetall(key)
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
