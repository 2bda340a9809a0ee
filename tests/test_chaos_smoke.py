"""The 2-minute form of the soak-and-chaos run (bench/chaos.py), part of every CI run.

Two brokers on one Redis (append-only), five stores of simulated terminals racing for
locks and paying, broker B SIGKILLed and restarted, Redis SIGKILLed and restarted on its
AOF, and a reconnect storm; the run prints its summary table and exits 1 when an invariant
broke. The long form, `python -m bench.chaos --minutes 30`, is not part of CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.chaos
@pytest.mark.timeout(270)
def test_two_minutes_of_chaos_keep_every_invariant() -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.chaos", "--minutes", "2", "--seed", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the chaos run did not finish within 4 minutes:\n{exc.stdout!r}")
    print(proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
