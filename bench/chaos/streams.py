"""(a), (b) and (e) on the union of every numbered event any observer saw, in seq order: one
holder per order and kind, fencing tokens that only grow, payments with the current token,
every granted token in the stream; and no `holder_disconnected` release of a holder the
harness had connected."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from .run import Run
from .screen import Screen
from .settings import STORE_CONFIG

UNKNOWN = -1  # a lock kind whose holder the analysis cannot know (before coverage, after a hole)


def analyse_streams(run: Run) -> dict[str, int]:
    """(a), (b) and (e) on the union of every numbered event any observer saw, in seq order."""
    holders, fencing, paid_token = (run.checks[k] for k in ("holders", "fencing", "paid_token"))
    payments = run.checks["payments"]
    totals: Counter[str] = Counter()
    holes_in: dict[str, int] = {}
    acquired: dict[tuple[str, str], dict[int, tuple[str, str | None]]] = defaultdict(dict)
    for channel, numbered in sorted(run.events.items()):
        scope = "store" if channel.startswith("store:") else "order"
        store_id = channel.split(":")[1]
        current: dict[tuple[str, str], int | None] = defaultdict(lambda: UNKNOWN)
        top: dict[str, int] = {}
        versions: dict[str, int] = {}
        paid: dict[str, str | None] = {}
        previous: int | None = None
        holes = 0
        for seq in sorted(numbered):
            ev = numbered[seq][1]
            if previous is not None and seq != previous + 1:
                holes += 1
                current = defaultdict(lambda: UNKNOWN)
            previous = seq
            if scope == "store":
                totals[ev.name] += 1
            oid = ev.order_id or ""
            if ev.name == "lock.acquired" and ev.kind and ev.token is not None:
                key = (oid, ev.kind)
                held = current[key]
                if held not in (None, UNKNOWN):
                    holders.fail(f"{channel}#{seq}: {oid}/{ev.kind} token {ev.token} granted "
                                 f"to {ev.holder} while token {held} was held")
                if oid in top and ev.token <= top[oid]:
                    fencing.fail(f"{channel}#{seq}: {oid} token {ev.token} after {top[oid]}")
                top[oid] = max(top.get(oid, 0), ev.token)
                current[key] = ev.token
                if scope == "store":
                    acquired[(store_id, oid)][ev.token] = (ev.kind, ev.holder)
            elif ev.name in ("lock.released", "lock.expired", "lock.forced") and ev.kind:
                key = (oid, ev.kind)
                held = current[key]
                if held is None or (held != UNKNOWN and held != ev.token):
                    holders.fail(f"{channel}#{seq}: {ev.name} {oid}/{ev.kind} token "
                                 f"{ev.token}, but the current one is {held}")
                current[key] = None
            elif ev.name == "order.paid":
                held = current[(oid, "payment")]
                if held is None or (held != UNKNOWN and held != ev.pay_token):
                    paid_token.fail(f"{channel}#{seq}: {oid} paid with token {ev.pay_token}, "
                                    f"current payment lock {held}")
                if oid in paid:
                    payments.fail(f"{channel}#{seq}: {oid} paid twice: {paid[oid]} and "
                                  f"{ev.pay_ref}")
                paid[oid] = ev.pay_ref
                if ev.version is not None and oid in versions and ev.version < versions[oid]:
                    fencing.fail(f"{channel}#{seq}: {oid} paid at version {ev.version} "
                                 f"below {versions[oid]}")
            if ev.name == "order.updated" and ev.version is not None:
                if oid in versions and ev.version <= versions[oid]:
                    fencing.fail(f"{channel}#{seq}: {oid} version {ev.version} after "
                                 f"{versions[oid]}")
                versions[oid] = ev.version
        holes_in[channel] = holes
        totals["holes"] += holes
        totals["channels"] += 1
        totals["events"] += len(numbered)
    # every grant answered to a client is the grant the observers saw
    grants = run.checks["grants"]
    seen_tokens: dict[tuple[str, str, int], str] = {}
    for store_id, oid, kind, token, holder in run.grants:
        key3 = (store_id, oid, token)
        if seen_tokens.setdefault(key3, holder) != holder:
            holders.fail(f"{store_id}/{oid}: token {token} answered to {seen_tokens[key3]} "
                         f"and to {holder}")
        if holes_in.get(f"store:{store_id}", 0):
            continue
        event = acquired.get((store_id, oid), {}).get(token)
        if event is None:
            grants.fail(f"{store_id}/{oid}/{kind}: token {token} of {holder} has no "
                        f"lock.acquired on the store channel")
        elif event != (kind, holder):
            grants.fail(f"{store_id}/{oid}: token {token} granted as {(kind, holder)}, "
                        f"event says {event}")
    totals["grant_replies"] = len({(s, o, t) for s, o, _, t, _ in run.grants})
    return dict(totals)


def check_grace(run: Run) -> int:
    """A lock released `holder_disconnected` at `ts` says its holder had no connection since
    `ts - grace`; the harness knows when each terminal was connected. Slack: 2 s after the
    claimed disconnect (a dead broker's terminals count as gone from its last heartbeat) and
    0.5 s before the release."""
    check = run.checks["grace"]
    grace = STORE_CONFIG["disconnect_grace_ms"]
    terms = {(t.store.store_id, t.sub): t for t in run.terms}

    def connected(term: Screen) -> list[tuple[float, float]]:
        # A killed broker's terminals count as gone from its last heartbeat, which a busy
        # machine may delay: a socket that a SIGKILL closed counts until 3 s before it.
        spans = []
        for a, b in term.online:
            if any(k <= b <= k + 2000 for k in run.kills):
                b = min(b, max(k for k in run.kills if k <= b) - 3000)
            spans.append((a, b))
        return spans

    seen = 0
    for channel, numbered in run.events.items():
        if not channel.startswith("store:"):
            continue
        store_id = channel.split(":")[1]
        for seq, (_, ev) in sorted(numbered.items()):
            if ev.name != "lock.released" or ev.reason != "holder_disconnected":
                continue
            seen += 1
            term = terms.get((store_id, ev.holder or ""))
            if term is None:
                continue
            low, high = ev.ts - grace + 2000, ev.ts - 500
            overlap = [(a, b) for a, b in connected(term) if a <= high and b >= low]
            if overlap:
                a, b = overlap[0]
                check.fail(f"{channel}#{seq}: {ev.order_id}/{ev.kind} token {ev.token} of "
                           f"{ev.holder} released holder_disconnected at t="
                           f"{run.at(ev.ts):.1f}s; the holder was connected from "
                           f"t={run.at(a):.1f}s to "
                           + ("the end" if b == math.inf else f"t={run.at(b):.1f}s"))
    return seen

