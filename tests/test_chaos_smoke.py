"""The 2-minute form of the soak-and-chaos run (bench/chaos.py), part of every CI run.

Two brokers on one Redis (append-only), five stores of simulated terminals racing for
locks and paying, broker B SIGKILLed and restarted, Redis SIGKILLed and restarted on its
AOF, and a reconnect storm; the run prints its summary table and exits 1 when an invariant
broke. The long form, `python -m bench.chaos --minutes 30`, is not part of CI.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Checks that fail today because of the server bugs named in the xfail reason. A failure
# of any other check is a new finding: it fails this test outright, as does a run that
# does not complete.
KNOWN_BUG_CHECKS = {
    "(a) no holder_disconnected while the holder was connected",
    "(c) online terminals in snapshots = those connected",
    "(e) events once, in seq order, identical everywhere",
}


class KnownBugs(Exception):
    """The run failed only in checks that the known server bugs break."""


@pytest.mark.chaos
@pytest.mark.timeout(270)
@pytest.mark.xfail(strict=True, raises=KnownBugs, reason=(
    "BUG (server/tablelock/backends/redis.py, hub.py): connected terminals are shown offline "
    "and their locks released holder_disconnected, because (1) after a Redis outage _resync "
    "replays _leaving over a terminal that came back to the same broker, (2) a goodbye's and "
    "a quick reconnect's absolute presence counts reach Redis out of order, (3) after a "
    "~2.5 s Redis outage a broker buries its live peer; and seq gaps, because (4) snapshot() "
    "advances _seen past events not yet heard over pub/sub, which are then dropped for the "
    "broker's other subscribers, (5) resume replays from the last seq queued, not delivered"))
def test_two_minutes_of_chaos_keep_every_invariant() -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.chaos", "--minutes", "2", "--seed", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the chaos run did not finish within 4 minutes:\n{exc.stdout!r}")
    print(proc.stdout)
    if proc.returncode == 0:
        return
    failed = set(re.findall(r"^FAIL  (.+)$", proc.stdout, re.MULTILINE))
    assert proc.returncode == 1 and failed, (
        f"the chaos run did not complete (exit {proc.returncode}):\n{proc.stdout}\n"
        f"{proc.stderr[-4000:]}")
    new = failed - KNOWN_BUG_CHECKS
    assert not new, f"invariants broken beyond the known bugs: {sorted(new)}\n{proc.stdout}"
    raise KnownBugs(f"known server bugs showed: {sorted(failed)}\n{proc.stdout}")
