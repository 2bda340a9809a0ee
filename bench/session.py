"""One measured session: servers up, load generators connected, commands timed.

`Session.measure` brackets one load-generator command with the server's and the load
generators' CPU seconds, the busy time of both cores (to see other people's load on a shared
machine) and the servers' RSS, and turns it all into one result row.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hist import Hist
from .procs import LOADGEN_CORE, SERVER_CORE, Child, core_busy, python
from .targets import Servers, dialect_of, start
from .workload import Workload

SATURATED = 0.85  # of one core
log = logging.getLogger("bench")


class Generators:
    """Load-generator processes, each answering one JSON line per command."""

    def __init__(self, workloads: list[Workload]) -> None:
        self.children: list[Child] = []
        self._lines: list[queue.Queue[str]] = []
        for n, workload in enumerate(workloads):
            child = Child(f"loadgen#{n}", [python(), "-m", "bench.loadgen", workload.to_json()],
                          LOADGEN_CORE, stdin=True, stdout=True)
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=_pump, args=(child, lines), daemon=True).start()
            self.children.append(child)
            self._lines.append(lines)

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        answers = []
        for child, lines in zip(self.children, self._lines, strict=True):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{child.name} did not answer in {timeout:.0f} s") from None
            if not line:
                raise RuntimeError(f"{child.name} exited ({child.proc.poll()})")
            answers.append(json.loads(line))
        return answers

    def command(self, cmd: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        for child in self.children:
            assert child.proc.stdin is not None
            child.proc.stdin.write(json.dumps(cmd) + "\n")
            child.proc.stdin.flush()
        return self.collect(timeout)

    def cpu_s(self) -> float:
        return sum(c.cpu_s() for c in self.children)

    def stop(self) -> None:
        for child in self.children:
            try:
                if child.proc.stdin is not None and child.alive():
                    child.proc.stdin.write('{"cmd": "quit"}\n')
                    child.proc.stdin.flush()
            except OSError:
                pass
        for child in self.children:
            child.stop(timeout=15)


def _pump(child: Child, lines: queue.Queue[str]) -> None:
    assert child.proc.stdout is not None
    for line in child.proc.stdout:
        if line.startswith("{"):
            lines.put(line)
    lines.put("")


class Session:
    def __init__(self, scenario: str, target: str, workloads: list[Workload], secret: str,
                 workdir: Path, redis: bool = False, brokers: int = 1) -> None:
        self.scenario, self.target = scenario, target
        self.backend = "redis" if redis else "memory"
        self.brokers = brokers
        self.affinity = workloads[0].affinity if brokers > 1 else ""
        t0 = time.monotonic()
        self.servers: Servers = start(target, secret, workdir, redis, brokers)
        self.start_s = time.monotonic() - t0
        self.gens: Generators | None = None
        try:
            time.sleep(0.3)
            self.rss_before = self.servers.rss_kib()
            for workload in workloads:
                workload.urls, workload.secret = self.servers.urls, secret
                workload.dialect = dialect_of(target)
            self.gens = Generators(workloads)
            ready = self.gens.collect(timeout=600)
            self.connections = sum(r["connections"] for r in ready)
            self.setup_errors: dict[str, int] = {}
            for answer in ready:
                for key, n in answer["setup_errors"].items():
                    self.setup_errors[key] = self.setup_errors.get(key, 0) + n
            self.setup_s = max(r["setup_s"] for r in ready)
            self.phases = ready[0]["phases"]
            time.sleep(0.5)
            self.rss_after = self.servers.rss_kib()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for broker in self.servers.brokers:
            if not broker.alive():
                log.warning("%s died%s", broker.name, broker.log_tail())
        if self.gens is not None:
            self.gens.stop()
        self.servers.stop()

    def measure(self, cmd: dict[str, Any], label: str,
                neighbours: Sequence[Session] = ()) -> dict[str, Any]:
        """One command, timed. `neighbours` are sessions of ours left idle meanwhile (the
        paired mode's other servers): their CPU is reported apart, not as other people's."""
        assert self.gens is not None
        server0, redis0, gen0 = (self.servers.user_sys_s(), self.servers.redis_cpu_s(),
                                 self.gens.cpu_s())
        idle0 = [(n.servers.cpu_s(), n.gen_cpu_s()) for n in neighbours]
        busy0, t0 = core_busy(), time.monotonic()
        answers = self.gens.command(cmd, timeout=float(cmd.get("seconds", 0)) + 120)
        wall = time.monotonic() - t0
        busy1 = core_busy()
        user1, sys1 = self.servers.user_sys_s()
        split = (user1 - server0[0], sys1 - server0[1])
        redis_cpu = self.servers.redis_cpu_s() - redis0
        gen_cpu = self.gens.cpu_s() - gen0
        idle1 = [(n.servers.cpu_s(), n.gen_cpu_s()) for n in neighbours]
        idle_cpu = (sum(b[0] - a[0] for a, b in zip(idle0, idle1, strict=True)),
                    sum(b[1] - a[1] for a, b in zip(idle0, idle1, strict=True)))
        return self._row(label, cmd, answers, wall, split, redis_cpu, gen_cpu,
                         busy0, busy1, idle_cpu)

    def gen_cpu_s(self) -> float:
        """Its load generators' CPU seconds so far."""
        return self.gens.cpu_s() if self.gens is not None else 0.0

    def _row(self, label: str, cmd: dict[str, Any], answers: list[dict[str, Any]], wall: float,
             split: tuple[float, float], redis_cpu: float, gen_cpu: float,
             busy0: dict[int, float], busy1: dict[int, float],
             idle_cpu: tuple[float, float]) -> dict[str, Any]:
        server_cpu = split[0] + split[1]
        reply, fanout, expiry = Hist(), Hist(), Hist()
        errors: dict[str, int] = {}
        pairs = pairs_window = events = frames = expired = 0
        window = max(a["window"] for a in answers)
        for answer in answers:
            stats = answer["stats"]
            reply.merge(Hist.from_json(stats["reply"]))
            fanout.merge(Hist.from_json(stats["fanout"]))
            expiry.merge(Hist.from_json(stats["expiry"]))
            for key, n in stats["errors"].items():
                errors[key] = errors.get(key, 0) + n
            pairs += stats["pairs"]
            pairs_window += answer["pairs_window"]
            events += stats["events"]
            frames += stats["frames"]
            expired += stats["expired"]
        if label.startswith("closed") and self.setup_errors:
            for key, n in self.setup_errors.items():
                errors[key] = errors.get(key, 0) + n
        missed = sum(a.get("missed", 0) for a in answers)  # over capacity: not an error
        requested = sum(a.get("requested", 0) for a in answers)
        if cmd["cmd"] == "expiry" and expired < pairs:
            errors["lock.expired never arrived"] = pairs - expired
        if not self.servers.alive():
            errors["server died"] = 1
        server_util, gen_util = server_cpu / wall, gen_cpu / wall
        # ours: this run's server (core 0), its load generators and redis (core 1), and the
        # idle neighbours' servers and load generators on the same cores
        other = {core: round(max(0.0, (busy1[core] - busy0[core]) / wall - ours) * 100)
                 for core, ours in ((SERVER_CORE, server_util + idle_cpu[0] / wall),
                                    (LOADGEN_CORE, gen_util + (redis_cpu + idle_cpu[1]) / wall))
                 if core is not None and core in busy0}
        connections = self.connections
        return {
            "scenario": self.scenario, "target": self.target, "backend": self.backend,
            "brokers": self.brokers, "affinity": self.affinity, "mode": label,
            "connections": connections,
            "seconds": round(window, 2), "pairs": pairs,
            "pairs_per_s": round(pairs_window / window, 1) if window else 0,
            "locks_requested": requested or None, "locks_expired": expired or None,
            "reply_ms": reply.summary_ms(), "fanout_ms": fanout.summary_ms(),
            "expiry_late_ms": expiry.summary_ms() if expiry.count else None,
            "events_per_s": round(events / window, 1) if window else 0,
            "errors": errors, "error_count": sum(errors.values()), "open_loop_missed": missed,
            "rss_before_kib": self.rss_before, "rss_after_connect_kib": self.rss_after,
            "rss_end_kib": self.servers.rss_kib(),
            "kib_per_connection": round((self.rss_after - self.rss_before) / connections, 2)
            if connections else None,
            "server_cpu_pct": round(server_util * 100, 1),
            "server_cpu_us_per_pair": round(server_cpu / pairs * 1e6, 1) if pairs else None,
            "server_user_us_per_pair": round(split[0] / pairs * 1e6, 1) if pairs else None,
            "server_sys_us_per_pair": round(split[1] / pairs * 1e6, 1) if pairs else None,
            "server_sys_share": round(split[1] / server_cpu, 3) if server_cpu else None,
            "redis_cpu_pct": round(redis_cpu / wall * 100, 1) if self.backend == "redis"
            else None,
            "loadgen_cpu_pct": round(gen_util * 100, 1),
            "loadgen_us_per_frame": round(gen_cpu / frames * 1e6, 2) if frames else None,
            "other_load_pct": other,
            "idle_neighbours_cpu_pct": [round(idle_cpu[0] / wall * 100, 1),
                                        round(idle_cpu[1] / wall * 100, 1)],
            "server_start_s": round(self.start_s, 1),
            "setup_s": round(self.setup_s, 1), "setup_phases_s": self.phases,
            "bottleneck": bottleneck(label, server_util, gen_util, redis_cpu / wall, other,
                                     missed),
        }


def bottleneck(label: str, server: float, gen: float, redis: float,
               other: dict[int, int], missed: int = 0) -> str:
    """Which side ran out of CPU, as far as one run can tell."""
    if missed:
        return (f"over capacity at this rate: {missed} starts found no idle actor "
                f"(server {server * 100:.0f}%, load generator {gen * 100:.0f}% of a core)")
    if gen >= SATURATED and gen >= server:
        return "load generator (its core is saturated: the server figure is a lower bound)"
    if server >= SATURATED:
        return "server CPU"
    if redis >= SATURATED:
        return "redis-server CPU"
    busy = {c: p for c, p in other.items() if p >= 25}
    if busy and not label.startswith("open"):
        cores = ", ".join(f"core {c} {p}%" for c, p in busy.items())
        return f"shared cores: other processes used {cores}"
    if label.startswith("open") or label.startswith("expiry"):
        return "none (fixed rate)"
    return "none saturated: round trips (closed loop)"
