"""The exhaustive model check of `rules.step` (tests/model_check.py) finds nothing, and it
would: each deliberate rule break below is reported."""

from __future__ import annotations

import msgspec
import pytest

from tablelock import rules
from tablelock.model import Lock, OrderRecord, Terminal, holder_key
from tablelock.rules import Complete, Context

from .model_check import explore

# As deep as runs in about 30 s alone on the 2-core CI machine (MODEL_CHECK.md).
CI_DEPTH = 7
# Every break below is reachable within this many transitions of a new order.
BREAK_DEPTH = 5


def test_every_state_within_the_ci_depth_keeps_the_protocol() -> None:
    report = explore(CI_DEPTH)
    print(f"\nmodel check: {report.states} states, {report.transitions} transitions, "
          f"depth {len(report.per_depth)}, {report.seconds:.1f} s")
    assert [v.problem for v in report.violations] == []
    assert len(report.per_depth) == CI_DEPTH
    assert report.states > 10_000  # the search really went somewhere


def force_keeps_the_old_token_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token older than the current lock's still writes, as if a force did not fence it."""
    original = rules._token_refusal

    def broken(rec: OrderRecord, kind: str, token: int, actor: Terminal | None) -> str | None:
        code = original(rec, kind, token, actor)
        lock = rec.locks.get(kind)
        return None if code == "FENCED" and lock is not None and token < lock.token else code

    monkeypatch.setattr(rules, "_token_refusal", broken)


def payment_accepted_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """payment.complete judges a paid order as if it were still open."""
    original = rules._payment_refusal

    def broken(rec: OrderRecord, cmd: Complete, ctx: Context,
               actor: Terminal | None) -> str | None:
        reopened = msgspec.structs.replace(
            rec, payment=None, order=msgspec.structs.replace(rec.order, status="open"))
        return original(reopened, cmd, ctx, actor)

    monkeypatch.setattr(rules, "_payment_refusal", broken)


def h5_lock_gets_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phone that drops its socket loses its payment lock after the disconnect grace."""
    def broken(lock: Lock, ctx: Context) -> tuple[int, str]:
        since = ctx.offline.get(holder_key(lock.holder))
        if since is not None and since + ctx.config.disconnect_grace_ms <= lock.expires_at:
            return since + ctx.config.disconnect_grace_ms, "holder_disconnected"
        return lock.expires_at, "expired"

    monkeypatch.setattr(rules, "lock_deadline", broken)


@pytest.mark.parametrize(("breaks", "reported"), [
    (force_keeps_the_old_token_valid, "a stale token wrote"),
    (payment_accepted_twice, "a second payment"),
    (h5_lock_gets_the_grace, "an h5 lock ended by the disconnect grace"),
])
def test_a_broken_rule_is_reported(monkeypatch: pytest.MonkeyPatch, breaks: object,
                                   reported: str) -> None:
    assert callable(breaks)
    breaks(monkeypatch)
    report = explore(BREAK_DEPTH, max_violations=100_000)
    problems = {violation.problem for violation in report.violations}
    assert reported in problems, sorted(problems)[:20]
    first = next(v for v in report.violations if v.problem == reported)
    print(f"\n{reported}, after: {' / '.join(first.trace)}")
