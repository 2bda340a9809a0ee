"""(f) the history of every payment-lock request is linearizable per order against the model
of bench/linearizability.py; the history is kept as history.jsonl in the run's directory."""

from __future__ import annotations

import time

from .run import Run
from .settings import (
    CLOCK_SLACK_S,
    EFFECT_WITHIN_S,
    H5_TTL_MS,
    LINEARIZABILITY_BUDGET,
    STORE_CONFIG,
)


def check_linearizable(run: Run) -> None:
    """(f): every payment-lock request and its reply fit one order of the requests per order
    that respects real time and the lock rules (bench/linearizability.py)."""
    check = run.checks["linearizable"]
    started = time.monotonic()
    shortest_ms = min(H5_TTL_MS, STORE_CONFIG["erp_lock_ttl_ms"],
                      STORE_CONFIG["disconnect_grace_ms"])
    ops = run.history.operations
    result = run.history.check(shortest_ms / 1000 - CLOCK_SLACK_S, LINEARIZABILITY_BUDGET,
                               EFFECT_WITHIN_S)
    run.history.save(run.tmp / "history.jsonl")
    for part in result.failures:
        last = part.longest[-1] if part.longest else None
        check.fail(f"{part.order_id}: no linearization of its {part.operations} requests; "
                   f"the longest valid prefix ends with {last}")
    for part in result.unknown:
        check.fail(f"{part.order_id}: the search gave up after {part.configurations} "
                   f"configurations ({part.operations} requests)")
    unanswered = sum(op.indeterminate for op in ops)
    searched = sum(p.configurations for p in result.partitions)
    biggest = max((p.operations for p in result.partitions), default=0)
    # Requests in flight across a Redis pause: sent before its SIGSTOP, answered after its
    # SIGCONT (or never).
    spanning = sum(1 for stop, cont in run.pauses for op in ops
                   if op.call < stop and (op.ret is None or op.ret > cont))
    check.detail = (f"{len(ops)} requests ({unanswered} without a definite answer, "
                    f"{spanning} in flight across a Redis pause) on "
                    f"{len(result.partitions)} orders (largest {biggest}), {searched} "
                    f"configurations searched in {time.monotonic() - started:.1f}s")

