"""What the load generator is pointed at: tablelock (memory or Redis, one or more processes)
and the baselines of bench/baselines/, each started on the server core. `raw-websockets` is the
limit issue 6 measured against; `uvicorn-direct` is the ceiling of tablelock's own stack."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .http import get_ok
from .procs import SERVER_CORE, Child, free_port, python, start_redis, tcp_ready

TABLELOCK = "tablelock"
RAW = "raw-websockets"
UVICORN_DIRECT = "uvicorn-direct"
SOCKETIO = "python-socketio"
STARLETTE = ("starlette/websockets-sansio", "starlette/websockets", "starlette/wsproto")
BASELINES = (RAW, UVICORN_DIRECT, *STARLETTE, SOCKETIO)
ALL_TARGETS = (TABLELOCK, *BASELINES)
_TICK = os.sysconf("SC_CLK_TCK")


def user_sys_s(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds so far, from /proc (0, 0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def dialect_of(target: str) -> str:
    return "socketio" if target == SOCKETIO else "tablelock"


@dataclass
class Servers:
    """The server side of one run: broker processes (summed), and redis-server if any."""

    brokers: list[Child] = field(default_factory=list)
    redis: Child | None = None
    urls: list[str] = field(default_factory=list)

    def cpu_s(self) -> float:
        return sum(b.cpu_s() for b in self.brokers)

    def user_sys_s(self) -> tuple[float, float]:
        """Server CPU seconds split: in user space, and in the kernel (syscalls, faults)."""
        split = [user_sys_s(b.pid) for b in self.brokers]
        return sum(u for u, _ in split), sum(s for _, s in split)

    def rss_kib(self) -> int:
        return sum(b.rss_kib() for b in self.brokers)

    def redis_cpu_s(self) -> float:
        return self.redis.cpu_s() if self.redis else 0.0

    def alive(self) -> bool:
        return all(b.alive() for b in self.brokers)

    def stop(self) -> None:
        for child in [*self.brokers, *([self.redis] if self.redis else [])]:
            with contextlib.suppress(Exception):
                child.stop()


def start(target: str, secret: str, workdir: Path, redis: bool = False,
          brokers: int = 1) -> Servers:
    servers = Servers()
    try:
        if redis:
            servers.redis, redis_port = start_redis(workdir / "redis")
        for n in range(brokers):
            port = free_port()
            if target == TABLELOCK:
                backend = f"redis://127.0.0.1:{redis_port}" if redis else "memory"
                cmd = [python(), "-m", "tablelock", "serve", "--port", str(port),
                       "--backend", backend]
            elif target == RAW:
                cmd = [python(), "-m", "bench.baselines.raw_ws", "--port", str(port)]
            elif target == UVICORN_DIRECT:
                cmd = [python(), "-m", "bench.baselines.uvicorn_direct", "--port", str(port)]
            elif target == SOCKETIO:
                cmd = [python(), "-m", "bench.baselines.socketio_app", "--port", str(port)]
            elif target in STARLETTE:
                cmd = [python(), "-m", "bench.baselines.starlette_ws", "--port", str(port),
                       "--ws", target.split("/", 1)[1]]
            else:
                raise ValueError(f"unknown target {target!r}")
            if target != TABLELOCK:
                cmd += ["--secret", secret]
            # the server's log (tablelock logs every connection) goes to a file, not our stderr
            child = Child(f"{target}#{n}", cmd, SERVER_CORE, env={"TABLELOCK_SECRET": secret},
                          log=workdir / f"server-{n}.log")
            servers.brokers.append(child)
            if target == TABLELOCK:
                child.wait_ready(lambda port=port: get_ok(f"http://127.0.0.1:{port}/readyz"))
            else:
                child.wait_ready(tcp_ready(port))
            servers.urls.append(f"ws://127.0.0.1:{port}")
    except BaseException:
        servers.stop()
        raise
    return servers
