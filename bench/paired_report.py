"""The `paired` section of RESULTS.md: ratios taken round by round, with their spread.

In each round every target ran one short closed loop, seconds after the others, while the
others sat idle: a ratio of two targets' server CPU per pair in the same round compares them
under the same machine state, and the spread over rounds says how far to trust it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from .targets import RAW, TABLELOCK, UVICORN_DIRECT

Row = dict[str, Any]


def _rounds(rows: list[Row]) -> dict[int, dict[str, Row]]:
    by_round: dict[int, dict[str, Row]] = {}
    for r in rows:
        if r["scenario"] == "paired" and r.get("round"):
            by_round.setdefault(r["round"], {})[r["target"]] = r
    return by_round


def _spread(values: Iterable[float], fmt: Callable[[float], str]) -> str:
    got = sorted(values)
    if not got:
        return "-"
    return f"{fmt(statistics.median(got))} ({fmt(got[0])}–{fmt(got[-1])})"


def _int(v: float) -> str:
    return f"{v:.0f}"


def _one(v: float) -> str:
    return f"{v:.1f}"


def _two(v: float) -> str:
    return f"{v:.2f}"


def per_round(rows: list[Row], base: str,
              measure: Callable[[Row, Row], float | None]) -> list[float]:
    """measure(tablelock's row, base's row) in every round where both ran."""
    out = []
    for runs in _rounds(rows).values():
        ours, theirs = runs.get(TABLELOCK), runs.get(base)
        if ours and theirs:
            value = measure(ours, theirs)
            if value is not None:
                out.append(value)
    return out


def by_cpu(ours: Row, theirs: Row) -> float | None:
    a, b = ours["server_cpu_us_per_pair"], theirs["server_cpu_us_per_pair"]
    return b / a if a and b else None


def paired_ratio(rows: list[Row], base: str) -> tuple[float, float, float, int] | None:
    """tablelock / base by server CPU per pair: median, min, max over rounds, and rounds."""
    values = sorted(per_round(rows, base, by_cpu))
    if not values:
        return None
    return statistics.median(values), values[0], values[-1], len(values)


def _others(runs: list[Row], core: str) -> list[float]:
    return [float(r["other_load_pct"].get(core, r["other_load_pct"].get(int(core), 0)))
            for r in runs]


def paired_section(rows: list[Row]) -> list[str]:
    closed = [r for r in rows if r["scenario"] == "paired" and r.get("round")]
    if not closed:
        return []
    targets = list(dict.fromkeys(r["target"] for r in closed))
    rounds = len(_rounds(rows))
    seconds = closed[0]["seconds"]
    out = [
        "## Paired alternation (`paired`): the ratios",
        "",
        f"{', '.join(targets)} were all up at once (servers on one core, one load generator "
        f"each on the other), each with the `store` workload ({closed[0]['connections']} "
        f"connections). {rounds} rounds: in each, every target ran a {seconds:.0f} s closed "
        "loop in turn while the others sat idle (order rotating by round). Each figure is the "
        "median over rounds, with min–max. `others` is CPU taken by processes not ours on "
        "the server core (c0) and the load-generator core (c1) during the loops: how loaded "
        "the shared machine was. `idle neighbours` is what the idle targets (servers, load "
        "generators) used meanwhile. This section alone: "
        f"`.venv/bin/python -m bench --scenario paired --rounds {rounds}`.",
        "",
        "| target | pairs/s | server µs/pair | user µs/pair | kernel µs/pair | "
        "load-gen µs/frame (machine-speed check) | others c0 % | others c1 % | "
        "idle neighbours % (servers / load-gens) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in targets:
        runs = [r for r in closed if r["target"] == name]
        idle = [r.get("idle_neighbours_cpu_pct") or [0, 0] for r in runs]
        out.append(
            f"| {name} | {_spread((r['pairs_per_s'] for r in runs), _int)} | "
            f"{_spread((r['server_cpu_us_per_pair'] or 0 for r in runs), _int)} | "
            f"{_spread((r['server_user_us_per_pair'] or 0 for r in runs), _int)} | "
            f"{_spread((r['server_sys_us_per_pair'] or 0 for r in runs), _int)} | "
            f"{_spread((r['loadgen_us_per_frame'] or 0 for r in runs), _one)} | "
            f"{_spread(_others(runs, '0'), _int)} | {_spread(_others(runs, '1'), _int)} | "
            f"{_spread((i[0] for i in idle), _one)} / {_spread((i[1] for i in idle), _one)} | "
            f"{sum(r['error_count'] for r in runs)} |")
    out += ["", "Ratios, round by round (tablelock / baseline; above 1 means tablelock is "
            "cheaper or faster):", "",
            "| tablelock / | by server CPU per pair | by pairs/s | rounds |", "|---|---|---|---|"]
    for base in (RAW, UVICORN_DIRECT):
        cpu = per_round(rows, base, by_cpu)
        rate = per_round(rows, base, lambda a, b: a["pairs_per_s"] / b["pairs_per_s"]
                         if b["pairs_per_s"] else None)
        if cpu:
            out.append(f"| {base} | {_spread(cpu, _two)} | {_spread(rate, _two)} | "
                       f"{len(cpu)} |")
    opened = [r for r in rows if r["scenario"] == "paired" and r["mode"].startswith("open")]
    if opened:
        out += ["", "Open loop at half of each target's median closed-loop pairs/s, "
                f"{opened[0]['seconds']:.0f} s each, the others idle:", "",
                "| target | run | pairs/s | reply p50 / p99 / max ms | fan-out p50 / p99 ms | "
                "server µs/pair | load-gen µs/frame | others c0 / c1 % | starts with no idle "
                "actor |", "|---|---|---|---|---|---|---|---|---|"]
        for r in opened:
            reply, fan = r["reply_ms"], r["fanout_ms"]
            out.append(
                f"| {r['target']} | {r['mode']} | {r['pairs_per_s']:.0f} | "
                f"{reply['p50']} / {reply['p99']} / {reply['max']} | "
                f"{fan['p50']} / {fan['p99']} | {r['server_cpu_us_per_pair']} | "
                f"{r['loadgen_us_per_frame']} | {_others([r], '0')[0]:.0f} / "
                f"{_others([r], '1')[0]:.0f} | {r['open_loop_missed']} |")
    return [*out, ""]
