"""Two tablelock brokers side by side: server CPU per lock pair, user and system apart.

    python -m bench.ab --a-src DIR [--a-python PY] [--rounds N] [--seconds S]
                       [--a-env K=V ...] [--b-env K=V ...]

Broker A runs the code in DIR (a checkout of the revision to compare, made with `git worktree
add`; with its own venv's python if it has one), broker B this checkout's. Both run at once
on the server core, each with its own load generator (bench's `store` workload) on the other
core; short closed loops take turns, the order swapped every round, so that the machine's
drift falls on both alike. Prints one line per turn and the medians, with B/A: below 1 is B
cheaper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from .hist import Hist
from .http import get_ok
from .procs import _TICK, LOADGEN_CORE, SERVER_CORE, Child, free_port, pin_self, python
from .scenarios import Options, store_workload
from .session import Generators

HERE = Path(__file__).resolve().parent.parent


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def start_broker(name: str, src: Path, interpreter: str, secret: str, env: dict[str, str],
                 log: Path) -> tuple[Child, str]:
    port = free_port()
    child = Child(name, [interpreter, "-m", "tablelock", "serve", "--port", str(port),
                         "--backend", "memory"], SERVER_CORE,
                  env={"TABLELOCK_SECRET": secret, "PYTHONPATH": str(src / "server"), **env},
                  log=log)
    child.wait_ready(lambda: get_ok(f"http://127.0.0.1:{port}/readyz"))
    return child, f"ws://127.0.0.1:{port}"


def pairs_env(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-src", type=Path, required=True)
    parser.add_argument("--a-python", help="default: A's .venv/bin/python, else ours")
    parser.add_argument("--a-env", action="append", default=[])
    parser.add_argument("--b-env", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="10 stores instead of 50")
    parser.add_argument("--warm", type=float, default=1.0,
                        help="seconds of load on each before measuring: histories and the "
                        "audit log fill to their bound in about a minute")
    parser.add_argument("--open-rate", type=float, default=0.0,
                        help="then, pairs/s of an open loop run on each in turn (e.g. half "
                        "the closed loop's): reply and fan-out latency")
    parser.add_argument("--logs", type=Path, help="keep the brokers' logs here")
    args = parser.parse_args(argv)
    pin_self(LOADGEN_CORE)
    a_python = args.a_python or (str(args.a_src / ".venv/bin/python")
                                 if (args.a_src / ".venv/bin/python").exists() else python())
    opts = Options(quick=args.quick)
    with tempfile.TemporaryDirectory(prefix="tablelock-ab-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        brokers: dict[str, Child] = {}
        gens: dict[str, Generators] = {}
        try:
            for name, src, interp, env in (("A", args.a_src, a_python, pairs_env(args.a_env)),
                                           ("B", HERE, python(), pairs_env(args.b_env))):
                brokers[name], url = start_broker(name, src, interp, opts.secret, env,
                                                  logs / f"{name}.log")
                workload = store_workload(opts)
                workload.urls, workload.secret = [url], opts.secret
                gens[name] = Generators([workload])
            for name, gen in gens.items():
                ready = gen.collect(timeout=600)
                print(json.dumps({"broker": name, "connections": ready[0]["connections"]}),
                      flush=True)
            time.sleep(0.5)
            for gen in gens.values():  # warm both up: first frames pay imports and allocation
                gen.command({"cmd": "closed", "seconds": args.warm}, timeout=args.warm + 120)
            turns: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    pid = brokers[name].pid
                    user0, sys0 = cpu_split(pid)
                    gen0 = gens[name].cpu_s()
                    answer = gens[name].command({"cmd": "closed", "seconds": args.seconds},
                                                timeout=args.seconds + 120)[0]
                    user1, sys1 = cpu_split(pid)
                    pairs = max(1, answer["pairs_window"])
                    per = (1e6 * (user1 - user0) / pairs, 1e6 * (sys1 - sys0) / pairs,
                           1e6 * (gens[name].cpu_s() - gen0) / pairs)
                    turns[name].append(per)
                    errors = sum(answer["stats"].get("errors", {}).values())
                    print(json.dumps({"round": r, "broker": name, "pairs": pairs,
                                      "user_us": round(per[0], 1), "sys_us": round(per[1], 1),
                                      "gen_us": round(per[2], 1), "errors": errors}), flush=True)
            summary: dict[str, dict[str, float]] = {}
            for name, rows in turns.items():
                total = [u + s for u, s, _ in rows]
                summary[name] = {"user_us": statistics.median(u for u, _, _ in rows),
                                 "sys_us": statistics.median(s for _, s, _ in rows),
                                 "total_us": statistics.median(total),
                                 "spread_us": max(total) - min(total),
                                 "gen_us": statistics.median(g for _, _, g in rows)}
            ratios = [b[0] + b[1] for b in turns["B"]]
            paired = [(bu + bs) / (au + as_) for (au, as_, _), (bu, bs, _)
                      in zip(turns["A"], turns["B"], strict=True)]
            print(json.dumps({"A": summary["A"], "B": summary["B"],
                              "B/A total (median of rounds)": round(statistics.median(paired), 3),
                              "B/A user": round(summary["B"]["user_us"]
                                                / summary["A"]["user_us"], 3),
                              "B/A sys": round(summary["B"]["sys_us"]
                                               / max(1e-9, summary["A"]["sys_us"]), 3),
                              "rounds": len(ratios)}, indent=1), flush=True)
            for r in range(args.rounds if args.open_rate else 0):
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    answer = gens[name].command({"cmd": "open", "rate": args.open_rate,
                                                 "seconds": args.seconds},
                                                timeout=args.seconds + 120)[0]
                    stats = answer["stats"]
                    print(json.dumps({"open_round": r, "broker": name,
                                      "rate": args.open_rate, "missed": answer.get("missed"),
                                      "reply_ms": Hist.from_json(stats["reply"]).summary_ms(),
                                      "fanout_ms": Hist.from_json(stats["fanout"]).summary_ms()}),
                          flush=True)
        finally:
            for gen in gens.values():
                gen.stop()
            for broker in brokers.values():
                broker.stop()


if __name__ == "__main__":
    main()
