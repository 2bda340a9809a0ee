"""The chaos run's processes and the faults it lands on them: redis-server on an
`appendfsync always` AOF (SIGKILLed, or paused with SIGSTOP and SIGCONT), two brokers
(SIGKILLed and restarted on their ports), and nginx in front of both, round-robin, with the
shipped docs/deploy/nginx.conf. Every child dies with this process (bench/procs.py)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..procs import (
    NGINX,
    ROOT,
    die_with_parent,
    free_port,
    nginx_main_config,
    redis_command,
    redis_ready,
)
from .http_client import http
from .settings import SECRET

NGINX_SITE = ROOT / "docs" / "deploy" / "nginx.conf"

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None,
           ) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                preexec_fn=die_with_parent if sys.platform == "linux" else None)
    _CHILDREN.append(proc)
    return proc


def kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)


atexit.register(kill_children)


class RedisProc:
    """redis-server with an append-only file synced on every write: a SIGKILL loses nothing."""

    def __init__(self, workdir: Path, logdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.log = logdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = _spawn(redis_command(self.port, self.dir, appendonly=True,
                                         appendfsync="always"), self.log)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        probe = redis_ready(self.port)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited (see {self.log})")
            if await asyncio.to_thread(probe):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"redis-server did not come up on {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop_signal(self, sig: signal.Signals) -> None:
        """SIGSTOP (the process stalls: its sockets stay open, nothing is answered) or
        SIGCONT."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


class BrokerProc:
    """`tablelock serve --backend redis://...` on a fixed port; killed and started again."""

    def __init__(self, name: str, backend: str, logdir: Path) -> None:
        self.name = name
        self.backend = backend
        self.logdir = logdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.up = False
        self.up_since = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log(self) -> Path:
        return self.logdir / f"broker-{self.name}-{self.incarnation}.log"

    def spawn(self) -> None:
        self.incarnation += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("TABLELOCK_")}
        env["TABLELOCK_SECRET"] = SECRET
        self.proc = _spawn([sys.executable, "-m", "tablelock", "serve", "--host", "127.0.0.1",
                            "--port", str(self.port), "--backend", self.backend], self.log, env)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"broker {self.name} exited (see {self.log})")
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await http("GET", self.port, "/readyz", timeout=1)
                if status == 200:
                    self.up = True
                    self.up_since = time.monotonic()
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"broker {self.name} did not become ready (see {self.log})")

    def kill(self) -> None:
        self.up = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def rss_kb(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    async def connections(self) -> int | None:
        """Its open authenticated connections, from its own /metrics (None: no answer)."""
        try:
            status, text = await http("GET", self.port, "/metrics", timeout=2)
        except (OSError, TimeoutError, ValueError, IndexError):
            return None
        if status != 200 or not isinstance(text, str):
            return None
        return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("tablelock_connections{")))


class NginxProc:
    """nginx with the shipped site config, pointed at the two brokers and a free port of
    127.0.0.1 (nothing else changed), under a main config of the run's own."""

    def __init__(self, brokers: list[BrokerProc], workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.brokers = brokers
        self.log = workdir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _config(self) -> Path:
        site = NGINX_SITE.read_text()
        for old, new in [("10.0.0.11:8080", f"127.0.0.1:{self.brokers[0].port}"),
                         ("10.0.0.12:8080", f"127.0.0.1:{self.brokers[1].port}"),
                         ("listen 80;", f"listen 127.0.0.1:{self.port};")]:
            if site.count(old) != 1:
                raise RuntimeError(f"{NGINX_SITE} no longer has one {old!r}")
            site = site.replace(old, new)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "site.conf").write_text(site)
        # Up to ~400 sockets per direction in a reconnect storm: room for them.
        return nginx_main_config(self.dir, self.dir / "site.conf", worker_connections=4096)

    def spawn(self) -> None:
        if not Path(NGINX).exists():
            raise RuntimeError(f"{NGINX} is not installed (or run with --front direct)")
        self.proc = _spawn([NGINX, "-p", str(self.dir), "-c", str(self._config()),
                            "-g", "daemon off;"], self.dir / "nginx.out")

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited (see {self.log})")
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await http("GET", self.port, "/healthz", timeout=1)
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"nginx did not serve /healthz (see {self.log})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: let its workers finish
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
