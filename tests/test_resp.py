"""tablelock.backends.resp against a real redis-server: replies, auto-pipelining, scripts,
pub/sub, and the failure kinds a commit path relies on (NotSent vs MaybeApplied)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tablelock.backends.redis_link import RedisLink, key_slot
from tablelock.backends.resp import (
    MaybeApplied,
    NotSent,
    PubSubConnection,
    Reconnecting,
    ReplyError,
    RespConnection,
    Script,
    _Protocol,
)

from .redis_support import REDIS_CLI, REDIS_SERVER, RedisServer, create_cluster


@pytest.fixture
async def conn(redis: RedisServer) -> AsyncIterator[RespConnection]:
    connection = await RespConnection.open("127.0.0.1", redis.port, timeout=5)
    yield connection
    connection.close()


def cli(redis: RedisServer, *args: str) -> str:
    return subprocess.run([REDIS_CLI, "-p", str(redis.port), *args], capture_output=True,
                          text=True, timeout=5, check=True).stdout


def calls(redis: RedisServer, command: str) -> int:
    for line in cli(redis, "info", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def pause(redis: RedisServer) -> None:
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)


def resume(redis: RedisServer) -> None:
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGCONT)


async def test_replies_of_each_type(conn: RespConnection) -> None:
    assert await conn.execute("SET", "k", "v") == b"OK"
    assert await conn.execute("GET", "k") == b"v"
    assert await conn.execute("GET", "missing") is None
    assert await conn.execute("HSET", "h", "a", 1, "b", 2.5) == 2
    assert await conn.execute("HGETALL", "h") == [b"a", b"1", b"b", b"2.5"]


async def test_an_error_reply_fails_that_call_only(conn: RespConnection) -> None:
    await conn.execute("SET", "s", "text")
    failing = conn.execute("INCR", "s")
    after = conn.execute("GET", "s")
    with pytest.raises(ReplyError, match="not an integer"):
        await failing
    assert await after == b"text"
    assert conn.is_connected


async def test_resp3_and_auth(redis: RedisServer) -> None:
    cli(redis, "config", "set", "requirepass", "s3cret")
    with pytest.raises(ReplyError, match=r"WRONGPASS|invalid"):
        await RespConnection.open("127.0.0.1", redis.port, password="wrong")
    conn = await RespConnection.open("127.0.0.1", redis.port, password="s3cret", protocol=3,
                                     db=2)
    try:
        await conn.execute("HSET", "h", "a", "1")
        assert await conn.execute("HGETALL", "h") == {b"a": b"1"}  # a RESP3 map
        info = await conn.execute("CLIENT", "INFO")
        assert "db=2" in (info.decode() if isinstance(info, bytes) else info)
    finally:
        conn.close()


def count_writes(conn: RespConnection) -> list[int]:
    """Wrap the transport's write to count the writes (the socket is real)."""
    protocol = conn._protocol
    assert protocol is not None and protocol.transport is not None
    transport = protocol.transport
    writes = [0]
    write = transport.write

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(transport, name)

        def write(self, data: Any) -> None:
            writes[0] += 1
            write(data)

    protocol.transport = Counting()  # type: ignore[assignment]
    return writes


async def pipelined_writes(conn: RespConnection) -> int:
    writes = count_writes(conn)
    replies = await asyncio.gather(*(conn.execute("INCR", "n") for _ in range(100)))
    assert sorted(replies) == list(range(1, 101))
    return writes[0]


async def test_commands_of_one_loop_iteration_go_out_in_one_write(
        conn: RespConnection) -> None:
    assert await pipelined_writes(conn) == 1


async def test_the_pipelining_check_catches_a_write_per_command(
        conn: RespConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    def write_at_once(self: _Protocol, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
    monkeypatch.setattr(_Protocol, "queue", write_at_once)
    assert await pipelined_writes(conn) == 100


async def test_evalsha_loads_the_script_once_after_a_flush(
        redis: RedisServer, conn: RespConnection) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await conn.evalsha(script, ["c"], [5]) == 5
    cli(redis, "script", "flush")
    assert await conn.evalsha(script, ["c"], [2]) == 7
    assert await conn.evalsha(script, ["c"], [1]) == 8
    assert calls(redis, "script|load") == 2  # once at first, once after the flush
    with pytest.raises(ReplyError, match="ERR"):
        await conn.evalsha(Script("return redis.call('NOSUCHCOMMAND')"))


async def test_a_written_command_without_reply_may_have_been_applied(
        redis: RedisServer, conn: RespConnection) -> None:
    pause(redis)
    written = conn.execute("INCR", "applied")
    await asyncio.sleep(0)  # the flush runs: the command is on the socket now
    await asyncio.sleep(0)
    queued = conn.execute("INCR", "applied")  # still in the write buffer
    conn.close()
    with pytest.raises(MaybeApplied):
        await written
    with pytest.raises(NotSent):
        await queued
    resume(redis)
    fresh = await RespConnection.open("127.0.0.1", redis.port)
    try:
        assert await fresh.execute("GET", "applied") == b"1"  # it was applied; queued was not
    finally:
        fresh.close()


async def test_killed_redis_fails_pending_calls_as_maybe_applied_then_not_sent(
        redis: RedisServer, conn: RespConnection) -> None:
    pause(redis)
    pending = [conn.execute("INCR", "x") for _ in range(3)]
    await asyncio.sleep(0.05)
    redis.stop()  # SIGKILL
    for call in pending:
        with pytest.raises(MaybeApplied):
            await call
    assert not conn.is_connected
    with pytest.raises(NotSent):
        await conn.execute("PING")
    with pytest.raises(NotSent):
        await RespConnection.open("127.0.0.1", redis.port, timeout=1)


async def test_an_overdue_reply_times_out_as_maybe_applied(redis: RedisServer) -> None:
    conn = await RespConnection.open("127.0.0.1", redis.port, timeout=0.3)
    try:
        pause(redis)
        with pytest.raises(MaybeApplied, match="no reply within"):
            await asyncio.wait_for(conn.execute("PING"), 5)
        with pytest.raises(NotSent):
            await conn.execute("PING")
    finally:
        conn.close()


async def test_a_cancelled_caller_does_not_shift_the_replies(conn: RespConnection) -> None:
    await conn.execute("SET", "a", "1")
    await conn.execute("SET", "b", "2")
    first = asyncio.ensure_future(conn.execute("GET", "a"))
    second = conn.execute("GET", "b")
    first.cancel()
    assert await second == b"2"
    assert await conn.execute("GET", "a") == b"1"


async def test_subscribe_delivers_to_each_channels_handler(
        redis: RedisServer, conn: RespConnection) -> None:
    got: dict[bytes, list[bytes]] = {b"a": [], b"b": [], b"s": []}
    both = asyncio.Event()

    def on(channel: bytes, data: bytes) -> None:
        got[channel].append(data)
        if all(got.values()):
            both.set()

    sub = await PubSubConnection.open("127.0.0.1", redis.port)
    try:
        await sub.subscribe(["a"], on)
        await sub.subscribe(["b"], on)
        await sub.ssubscribe(["s"], on)
        assert sub.channels == {b"a", b"b", b"s"}
        assert await conn.execute("PUBLISH", "a", "one") == 1
        assert await conn.execute("PUBLISH", "b", "two") == 1
        assert await conn.execute("SPUBLISH", "s", "three") == 1
        await asyncio.wait_for(both.wait(), 5)
        assert got == {b"a": [b"one"], b"b": [b"two"], b"s": [b"three"]}
        await sub.ping()
        await sub.unsubscribe(["a"])
        await sub.sunsubscribe(["s"])
        assert sub.channels == {b"b"}
        assert await conn.execute("PUBLISH", "a", "gone") == 0
        assert await conn.execute("SPUBLISH", "s", "gone") == 0
    finally:
        sub.close()


async def test_pubsub_loss_is_reported_once(redis: RedisServer) -> None:
    lost: list[BaseException] = []
    noticed = asyncio.Event()

    def on_lost(cause: BaseException) -> None:
        lost.append(cause)
        noticed.set()

    sub = await PubSubConnection.open("127.0.0.1", redis.port, on_lost=on_lost)
    await sub.subscribe(["a"], lambda _c, _d: None)
    redis.stop()
    await asyncio.wait_for(noticed.wait(), 5)
    assert len(lost) == 1 and not sub.is_connected
    with pytest.raises(NotSent):
        await sub.subscribe(["b"], lambda _c, _d: None)


async def test_a_paused_redis_fails_a_subscribe_as_maybe_applied(redis: RedisServer) -> None:
    sub = await PubSubConnection.open("127.0.0.1", redis.port)
    try:
        pause(redis)
        with pytest.raises(MaybeApplied):
            await sub.subscribe(["a"], lambda _c, _d: None, timeout=0.3)
        assert not sub.is_connected
    finally:
        sub.close()


async def test_a_failing_handler_does_not_drop_the_subscription(
        redis: RedisServer, conn: RespConnection) -> None:
    got: list[bytes] = []
    second = asyncio.Event()

    def on(_channel: bytes, data: bytes) -> None:
        if data == b"bad":
            raise ValueError("cannot decode")
        got.append(data)
        second.set()

    sub = await PubSubConnection.open("127.0.0.1", redis.port)
    try:
        await sub.subscribe(["a"], on)
        await conn.execute("PUBLISH", "a", "bad")
        await conn.execute("PUBLISH", "a", "good")
        await asyncio.wait_for(second.wait(), 5)
        assert got == [b"good"] and sub.is_connected
    finally:
        sub.close()


async def test_a_resp3_false_is_a_reply_not_a_wait(redis: RedisServer) -> None:
    conn = await RespConnection.open("127.0.0.1", redis.port, protocol=3)
    try:
        assert await conn.evalsha(Script("return false")) is None  # Lua false is RESP nil
        assert await conn.execute("EVAL", "redis.setresp(3); return false", 0) is False
        assert await conn.execute("PING") == b"PONG"
    finally:
        conn.close()


async def test_sharded_pubsub_on_a_cluster_goes_to_the_slots_owner(tmp_path: Path) -> None:
    """On Redis Cluster only the node owning a channel's slot takes its SSUBSCRIBE; the others
    answer MOVED, which fails that subscribe alone and leaves the connection in service."""
    nodes = [RedisServer(tmp_path / f"node{n}", cluster=True).start() for n in range(3)]
    subs: list[PubSubConnection] = []
    try:
        create_cluster(nodes)
        channel = "{store-1}:order:1"
        got = asyncio.Event()
        owners = []
        for node in nodes:
            sub = await PubSubConnection.open("127.0.0.1", node.port)
            subs.append(sub)
            try:
                await sub.ssubscribe([channel], lambda _c, _d: got.set())
                owners.append(node)
            except ReplyError as exc:
                assert str(exc).startswith("MOVED")
                assert sub.channels == set()
                await sub.ping()
        assert len(owners) == 1
        publisher = await RespConnection.open("127.0.0.1", owners[0].port)
        try:
            assert await publisher.execute("SPUBLISH", channel, "x") == 1
            await asyncio.wait_for(got.wait(), 5)
        finally:
            publisher.close()
    finally:
        for sub in subs:
            sub.close()
        for node in nodes:
            node.stop()


async def test_reconnecting_opens_one_new_connection_after_a_loss(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "a").start()
    opened = 0

    async def opener() -> RespConnection:
        nonlocal opened
        opened += 1
        return await RespConnection.open("127.0.0.1", server.port, timeout=1)

    client = Reconnecting(opener)
    try:
        first = await client.connection()
        assert await first.execute("SET", "k", "1") == b"OK"
        pause(server)
        in_flight = first.execute("GET", "k")
        await asyncio.sleep(0.05)  # written, unanswered
        server.stop()
        with pytest.raises(MaybeApplied):
            await in_flight
        with pytest.raises(NotSent):  # nothing listens: no connection can be had
            await client.connection()
        server = RedisServer(tmp_path / "b", port=server.port).start()
        again = await asyncio.gather(*(client.connection() for _ in range(5)))
        assert all(conn is again[0] for conn in again) and again[0] is not first
        assert await again[0].execute("PING") == b"PONG"
        assert opened == 3  # the first, the one refused, and one for all five callers
    finally:
        client.close()
        server.stop()


async def test_a_command_after_the_server_closed_is_not_sent(
        conn: RespConnection, redis: RedisServer) -> None:
    """The server closed the connection and the loop has not seen it yet: a command queued
    now must fail NotSent (it cannot run), not MaybeApplied (which makes a commit resolve)."""
    own_id = await conn.execute("CLIENT", "ID")
    # Killed from another process while this loop is blocked: the close reaches the kernel,
    # not our callbacks, before the command is queued.
    subprocess.run([REDIS_CLI, "-p", str(redis.port), "CLIENT", "KILL", "ID", str(own_id)],
                   check=True, capture_output=True)
    time.sleep(0.05)
    with pytest.raises(NotSent):
        await conn.execute("SET", "late", "1")
    checker = await RespConnection.open("127.0.0.1", redis.port)
    assert await checker.execute("EXISTS", "late") == 0
    checker.close()


async def test_link_over_a_unix_socket_selects_the_db(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = subprocess.Popen([REDIS_SERVER, "--port", "0", "--unixsocket", str(path),
                               "--save", "", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        link = RedisLink(f"unix://{path}?db=2")
        assert await link.execute("k", "SET", "k", "v") == b"OK"
        other = await RespConnection.open(unix_path=str(path), db=2)
        assert await other.execute("GET", "k") == b"v"
        other.close()
        link.close()
    finally:
        server.kill()
        server.wait()


def test_key_slot_is_redis_cluster_hash_slot() -> None:
    # Values from the Redis Cluster specification and CLUSTER KEYSLOT.
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == 3443
    assert key_slot("a{}b") == 13694  # an empty tag: the whole key counts
    assert key_slot("tl:{store:s1}:o:1") == key_slot("store:s1")
