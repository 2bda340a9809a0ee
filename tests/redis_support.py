"""Real `redis-server` processes for tests, each on its own free port, killed afterwards.

The command line and the readiness probe are bench/procs.py's, shared with the benchmark and
the chaos run."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.procs import REDIS_SERVER, free_port, redis_command, redis_ready, wait_until

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False,
                 cluster: bool = False, appendfsync: str = "always") -> None:
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.workdir = workdir
        self.appendonly = appendonly
        self.cluster = cluster
        self.appendfsync = appendfsync  # always | everysec: when the AOF is fsynced
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = redis_command(self.port, self.workdir, self.appendonly, self.appendfsync)
        if self.cluster:
            cmd += ["--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{self.port}.conf",
                    "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(redis_ready(self.port), 10, f"redis-server on {self.port} answering PING")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def create_cluster(nodes: list[RedisServer]) -> None:
    """Join three empty cluster-enabled servers into one cluster of three masters."""
    addresses = [f"127.0.0.1:{node.port}" for node in nodes]
    subprocess.run([REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run([REDIS_CLI, "-p", str(nodes[0].port), "cluster", "info"],
                             capture_output=True, text=True, timeout=5).stdout
        if "cluster_state:ok" in out:
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis Cluster did not become ready")


Action = Callable[[], Awaitable[None]]


class RedisProxy:
    """A TCP proxy in front of a redis-server that lands a fault on one chosen command.

    `arm` names the bytes a command must contain (say an order id and an event name, which
    only that order's commit carries). When such a command passes, `action` runs: with
    `after=False` before the command goes on to Redis; with `after=True` once Redis's reply
    to it is back, and that reply is then withheld with every later one on the connection,
    as when Redis dies or stalls after running a command and before its reply reaches the
    client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._armed: tuple[tuple[bytes, ...], Action, bool, asyncio.Event] | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._actions: set[asyncio.Future[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def arm(self, marks: tuple[bytes, ...], action: Action, after: bool) -> asyncio.Event:
        """Fault the next command holding every one of `marks`; the event is set once the
        action has run."""
        fired = asyncio.Event()
        self._armed = (marks, action, after, fired)
        return fired

    async def closed(self) -> None:
        """Until every connection open now has ended (both of its ends closed)."""
        if self._sessions:
            await asyncio.wait(set(self._sessions), timeout=10)

    async def _run(self, action: Action, fired: asyncio.Event) -> None:
        """Run an action to its end even if the connection that met it closes meanwhile
        (a SIGKILL closes it at once)."""
        async def run() -> None:
            await action()
            fired.set()
        task = asyncio.ensure_future(run())
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)
        await asyncio.shield(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = asyncio.current_task()
        assert session is not None
        self._sessions.add(session)  # type: ignore[arg-type]
        try:
            await self._pump(reader, writer)
        finally:
            self._sessions.discard(session)  # type: ignore[arg-type]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        on_reply: list[tuple[Action, asyncio.Event]] = []

        async def requests() -> None:
            while data := await reader.read(1 << 16):
                armed = self._armed
                if armed is not None and all(mark in data for mark in armed[0]):
                    self._armed = None
                    _, action, after, fired = armed
                    if after:
                        on_reply.append((action, fired))
                    else:
                        await self._run(action, fired)
                up_writer.write(data)
                await up_writer.drain()

        async def replies() -> None:
            muted = False
            while data := await up_reader.read(1 << 16):
                if on_reply:
                    action, fired = on_reply.pop()
                    await self._run(action, fired)
                    # The reply is lost, and so is every later one on this connection: a
                    # stream cannot skip a reply and go on (a pipelined client would match
                    # the next reply to the wrong command), so the client sees it stall.
                    muted = True
                if not muted:
                    writer.write(data)
                    await writer.drain()

        pumps = [asyncio.ensure_future(requests()), asyncio.ensure_future(replies())]
        with contextlib.suppress(Exception):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for stream in (writer, up_writer):
            stream.close()
        for stream in (writer, up_writer):  # closed() means closed: the FIN is on its way
            with contextlib.suppress(Exception):
                await stream.wait_closed()


def replicate(replica: RedisServer, master: RedisServer) -> None:
    """Make `replica` replicate `master`, and wait until its link is up."""
    subprocess.run([REDIS_CLI, "-p", str(replica.port), "replicaof", "127.0.0.1",
                    str(master.port)], check=True, stdout=subprocess.DEVNULL, timeout=5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run([REDIS_CLI, "-p", str(replica.port), "info", "replication"],
                             capture_output=True, text=True, timeout=5).stdout
        if "master_link_status:up" in out:
            return
        time.sleep(0.05)
    raise RuntimeError("the replica did not catch up with its master")


class SentinelServer:
    """A redis-server in sentinel mode watching one master, quick to fail it over."""

    def __init__(self, workdir: Path, master_port: int, name: str = "tl") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.master_port = master_port
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"sentinel-{self.port}.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\n"
                        f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1\n"
                        f"sentinel down-after-milliseconds {self.name} 1000\n"
                        f"sentinel failover-timeout {self.name} 5000\n")
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.current_master() != self.master_port:
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel did not start")
            time.sleep(0.05)
        return self

    def current_master(self) -> int | None:
        """The port of the master the sentinel names now."""
        try:
            out = subprocess.run([REDIS_CLI, "-p", str(self.port), "sentinel",
                                  "get-master-addr-by-name", self.name],
                                 capture_output=True, text=True, timeout=5).stdout.split()
        except subprocess.TimeoutExpired:
            return None
        return int(out[1]) if len(out) == 2 and out[1].isdigit() else None

    def knows_replica(self, port: int) -> bool:
        out = subprocess.run([REDIS_CLI, "-p", str(self.port), "sentinel", "replicas",
                              self.name], capture_output=True, text=True, timeout=5).stdout
        return str(port) in out.split()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
