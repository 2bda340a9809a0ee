"""The benchmark's quick form runs end to end: `store` on tablelock (memory) and on the
raw-websockets baseline, about 2 s each, and the paired mode's alternation. It asserts that
it ran and that nothing errored, never a timing: the figures belong to bench/RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_store_runs_without_errors(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "--quick", "--scenario", "store", "--seconds", "1",
           "--targets", "tablelock,raw-websockets", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr[-3000:]
    assert {(r["target"], r["mode"].split(" ")[0]) for r in rows} == {
        ("tablelock", "closed"), ("tablelock", "open"),
        ("raw-websockets", "closed"), ("raw-websockets", "open")}
    for row in rows:
        assert row["error_count"] == 0, row["errors"]
        assert row["connections"] == 10 * (3 + 10 * 2 + 2)  # the quick store
        assert row["pairs"] > 0 and row["fanout_ms"]["n"] > 0
    assert (tmp_path / "RESULTS.md").read_text().startswith("# tablelock benchmark results")


def test_the_data_file_bench_runs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.durable", "--seconds", "0.2", "--dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.rsplit(maxsplit=3) for line in done.stdout.splitlines()[2:]]
    backends = ("memory", "memory + data FULL", "memory + data NORMAL")
    assert [(row[0], row[1]) for row in rows] == [
        (backend, actors) for actors in ("1", "64") for backend in backends]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows)  # pairs/s


def test_paired_mode_alternates_and_reports_ratios(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "--quick", "--scenario", "paired", "--seconds", "0.5",
           "--targets", "tablelock,raw-websockets", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr[-3000:]
    # two rounds, the order rotating, then one open loop each
    assert [(r["target"], r.get("round")) for r in rows] == [
        ("tablelock", 1), ("raw-websockets", 1), ("raw-websockets", 2), ("tablelock", 2),
        ("tablelock", None), ("raw-websockets", None)]
    for row in rows:
        assert row["error_count"] == 0, row["errors"]
        assert row["loadgen_us_per_frame"] > 0  # the machine-speed check
        assert row["server_user_us_per_pair"] + row["server_sys_us_per_pair"] > 0
    results = (tmp_path / "RESULTS.md").read_text()
    assert "## Paired alternation" in results
    assert "| raw-websockets | " in results.split("Ratios, round by round")[1]
