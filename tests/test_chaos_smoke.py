"""The 2-minute form of the soak-and-chaos run (bench/chaos/), part of every CI run.

Two brokers on one Redis (append-only, `appendfsync always`) behind nginx (the shipped
docs/deploy/nginx.conf, round-robin, WebSockets), five stores of simulated terminals racing
for locks and paying, broker B SIGKILLed and restarted, Redis SIGKILLed and restarted on its
AOF, Redis paused with SIGSTOP right after a write was sent and resumed 0.6 s later (past the
brokers' Redis socket timeout), and a reconnect storm. The run checks every invariant and the
linearizability of its payment-lock history, prints its summary table and exits 1 when one
broke. The long form, `python -m bench.chaos --minutes 30`, is not part of CI.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NGINX = Path("/usr/sbin/nginx")


@pytest.mark.chaos
@pytest.mark.timeout(270)
@pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed")
def test_two_minutes_of_chaos_through_nginx_keep_every_invariant() -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.chaos", "--minutes", "2", "--seed", "1",
             "--front", "nginx", "--chaos", "broker,redis,pause,storm"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the chaos run did not finish within 4 minutes:\n{exc.stdout!r}")
    print(proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    # Every kind of fault landed, the pauses while a write was in flight.
    faults = re.search(r"^chaos .*faults: (.*?); through nginx;", proc.stdout, re.MULTILINE)
    assert faults is not None, proc.stdout
    landed = dict(part.split() for part in faults.group(1).split(", "))
    assert set(landed) == {"broker", "redis", "pause", "storm"}, landed
    assert "SIGSTOP redis-server right after" in proc.stdout
    # A pause landed while a commit was in flight: a broker lost its reply and resolved it by
    # its commit id (backends/redis.py) instead of answering UNAVAILABLE or deciding again.
    resolved = re.search(r"(\d+) commits resolved by id after a lost reply", proc.stdout)
    assert resolved is not None and int(resolved.group(1)) >= 1, faults.group(0)
    assert re.search(r"PASS  \(f\) payment-lock history linearizable", proc.stdout)
