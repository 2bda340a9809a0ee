"""Real `redis-server` processes for tests, each on its own free port, killed afterwards."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .support import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
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
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--dir", str(self.workdir),
               "--appendonly", "yes" if self.appendonly else "no",
               "--appendfsync", self.appendfsync]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{self.port}.conf",
                    "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on {self.port}")

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
