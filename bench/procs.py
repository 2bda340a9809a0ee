"""Child processes: brokers, baselines, redis-server and load generators, pinned with taskset,
measured through /proc (RSS, CPU seconds), and always cleaned up.

The server side gets core 0 and the load generator core 1 (redis-server shares core 1 with
the load generator). With fewer than two cores, nothing is pinned.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
_TASKSET = shutil.which("taskset")
PINNED = _TASKSET is not None and (os.cpu_count() or 1) >= 2
SERVER_CORE, LOADGEN_CORE = (0, 1) if PINNED else (None, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Runs in a child before exec: it gets SIGKILL when its parent dies, so nothing is left
    running (Linux only: elsewhere nothing happens)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pin_self(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


class Child:
    def __init__(self, name: str, cmd: list[str], core: int | None,
                 env: dict[str, str] | None = None, stdin: bool = False,
                 stdout: bool = False, log: Path | None = None) -> None:
        self.name = name
        self.log = log
        full = [_TASKSET, "-c", str(core), *cmd] if core is not None and _TASKSET else cmd
        with open(log, "ab") if log is not None else contextlib.nullcontext() as stderr:
            self.proc = subprocess.Popen(
                full, cwd=ROOT, env={**os.environ, **(env or {})},
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=stderr, text=True, preexec_fn=die_with_parent)
        self.pid = self.proc.pid  # taskset execs the command: same pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        """User + system CPU seconds so far (0 once it has exited)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _TICK

    def rss_kib(self) -> int:
        try:
            return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * _PAGE_KIB
        except OSError:
            return 0

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}"
                                   f"{self.log_tail()}")
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready in {timeout} s")

    def log_tail(self, size: int = 2000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return ":\n" + self.log.read_bytes()[-size:].decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


def tcp_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    return check


def redis_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
    return check


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_command(port: int, workdir: Path, appendonly: bool = False,
                  appendfsync: str = "always") -> list[str]:
    """redis-server on 127.0.0.1:`port` (never 6379), no snapshots, its files in `workdir`;
    with `appendonly`, an AOF fsynced `always` (a SIGKILL loses nothing) or `everysec`."""
    return [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(workdir), "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync]


NGINX = "/usr/sbin/nginx"
_NGINX_TEMP = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_main_config(workdir: Path, site: Path, worker_connections: int = 1024) -> Path:
    """An nginx.conf of the run's own in `workdir` (logs, pid and temp files there) that
    includes a site config, as conf.d would: the shipped site runs unprivileged, unchanged."""
    for name in _NGINX_TEMP:
        (workdir / name).mkdir(parents=True, exist_ok=True)
    temp = "\n".join(f"    {name}_temp_path {workdir}/{name};" for name in _NGINX_TEMP)
    main = workdir / "nginx.conf"
    main.write_text(f"worker_processes 2;\nerror_log {workdir}/error.log;\n"
                    f"pid {workdir}/nginx.pid;\n"
                    f"events {{ worker_connections {worker_connections}; }}\n"
                    f"http {{\n    access_log off;\n{temp}\n    include {site};\n}}\n")
    return main


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def start_redis(workdir: Path) -> tuple[Child, int]:
    """A redis-server of our own on a free port, on the load generator's core."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    child = Child("redis-server", redis_command(port, workdir), LOADGEN_CORE,
                  log=workdir / "redis.log")
    child.wait_ready(redis_ready(port))
    return child, port


def python() -> str:
    return sys.executable


def core_busy() -> dict[int, float]:
    """Busy CPU seconds per core since boot (all processes), from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values]
            idle = ticks[3] + ticks[4]  # idle + iowait
            busy[int(name[3:])] = (sum(ticks[:8]) - idle) / _TICK
    return busy
