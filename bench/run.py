"""`python -m bench [--quick] [--scenario NAME ...] [--targets A,B] [--seconds S] [--rounds N]
[--out DIR]`

Runs the scenarios, prints one JSON line per measured run, and writes RESULTS.md and
results.json into the output folder: bench/ for the full form, bench/out/ for --quick. A
scenario run alone replaces only its own rows there. Exits 1 if any run of tablelock counted an
error (a baseline's errors are reported, not fatal).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .procs import LOADGEN_CORE, pin_self
from .report import load_rows, write_results
from .scenarios import SCENARIOS, Options
from .targets import ALL_TARGETS

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per run and fewer connections (CI smoke form)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable); default: all")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated subset of: {', '.join(ALL_TARGETS)}")
    parser.add_argument("--seconds", type=float, help="length of every measured run")
    parser.add_argument("--rounds", type=int,
                        help="paired closed-loop rounds (default 7; --quick: 2)")
    parser.add_argument("--out", type=Path, help="folder for RESULTS.md and results.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        sys.exit(f"unknown targets: {', '.join(unknown)}")
    pin_self(LOADGEN_CORE)
    opts = Options(quick=args.quick, seconds=args.seconds, targets=targets,
                   rounds_wanted=args.rounds)
    out = args.out or (HERE / "out" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    names = args.scenario or list(SCENARIOS)
    rows = load_rows(out / "results.json", keep_unless=set(names))
    errors = 0
    for name in names:
        for row in SCENARIOS[name](opts):
            row["quick"] = args.quick
            print(json.dumps(row), flush=True)
            if row["target"] == "tablelock":  # the baselines' own failures are figures
                errors += row["error_count"]
            rows.append(row)
        write_results(out, rows, quick=args.quick)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
