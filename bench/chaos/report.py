"""The summary table a run prints, and its verdict."""

from __future__ import annotations

from collections import Counter

from .run import Run


def resolved_commits(run: Run) -> int:
    """Commits whose reply a broker lost (Redis paused or killed) and resolved by their
    commit id, as the brokers logged them."""
    return sum(line.count("unanswered") for log in run.tmp.glob("broker-*.log")
               for line in log.read_text(errors="replace").splitlines()
               if "resolving" in line)


def report(run: Run, totals: dict[str, int], views: tuple[int, int], pay_detail: str,
           mem_detail: str) -> bool:
    s = run.stats
    args = run.args
    ops = sum(s.ops.values())
    requests = sum(s.requests.values())
    codes: Counter[str] = Counter()
    for (_, code), n in s.requests.items():
        codes[code] += n
    traffic_s = args.minutes * 60
    forced = totals.get("lock.forced", 0)
    expired = totals.get("lock.expired", 0)
    released: Counter[str] = Counter()
    for channel, numbered in run.events.items():
        if channel.startswith("store:"):
            for _, ev in numbered.values():
                if ev.name == "lock.released":
                    released[ev.reason or "?"] += 1
    width = 78
    print("=" * width)
    print(f"tablelock soak and chaos run   seed {run.seed}   {args.minutes:g} min of traffic   "
          f"{args.stores} stores x {args.tables} tables")
    front = f"nginx :{run.front.port} -> " if run.front is not None else ""
    print(f"{front}brokers A :{run.brokers[0].port}  B :{run.brokers[1].port}   "
          f"redis :{run.redis.port} (appendfsync always)   {len(run.terms)} terminals")
    print("-" * width)
    rows = [
        ("duration", f"{traffic_s:.0f}s of traffic, {run.elapsed():.0f}s in all"),
        ("operations", f"{ops} ({ops / traffic_s:.1f}/s), {s.skipped_busy} skipped (busy), "
                       f"{s.skipped_offline} skipped (offline)"),
        ("requests", f"{requests}: " + ", ".join(f"{c} {n}" for c, n in codes.most_common(9))),
        ("grants", f"{totals.get('lock.acquired', 0)} lock.acquired, "
                   f"{totals.get('grant_replies', 0)} distinct tokens answered"),
        ("forces", f"{forced} lock.forced ({s.ops['erp.force']} forced acquires, "
                   f"{s.ops['erp.force_publish']} forced publishes, "
                   f"{s.ops['manager.force_release']} manager releases)"),
        ("expiries", f"{expired} lock.expired; released: "
                     + ", ".join(f"{r} {n}" for r, n in sorted(released.items()))),
        ("payments", f"{totals.get('order.paid', 0)} orders paid; replies: {s.payments_ok} ok, "
                     f"{s.payment_retries_ok} ok again for a retried ref, "
                     f"{sum(s.payments_rejected.values())} refused ("
                     + ", ".join(f"{c} {n}" for c, n in s.payments_rejected.most_common())
                     + f"), {s.payments_unresolved} never answered"),
        ("reconnects", f"{s.reconnects} ({s.resumed} resumed, {s.since_recovered} channels "
                       f"recovered by since, {s.snapshot_fallbacks} by snapshot, "
                       f"{s.migrations} moved to rebalance, {s.gap_resyncs} after a gap); "
                       f"failed attempts: {sum(s.connect_failures.values())}"),
        ("events", f"{totals.get('events', 0)} distinct on {totals.get('channels', 0)} "
                   f"channels, {totals.get('holes', 0)} holes nobody saw, "
                   f"{s.contended} lock.contended"),
        ("chaos", f"{len(run.chaos_log)} faults: "
                  + ", ".join(f"{kind} {n}" for kind, n in sorted(run.faults.items()))
                  + f"; through {'nginx' if run.front is not None else 'no proxy'}; "
                  f"{resolved_commits(run)} commits resolved by id after a lost reply"),
    ]
    for name, text in rows:
        print(f"{name:<12}{text}")
    for line in run.chaos_log:
        print(f"{'':<12}{line}")
    if s.reader_errors:
        print(f"{'errors':<12}" + " | ".join(s.reader_errors))
    print("-" * width)
    details = {
        "holders": f"{totals.get('lock.acquired', 0)} grants replayed in seq order",
        "fencing": f"{totals.get('channels', 0)} channels",
        "paid_token": f"{totals.get('order.paid', 0)} order.paid events",
        "grants": f"{totals.get('grant_replies', 0)} tokens from replies",
        "grace": f"{totals.get('holder_disconnected', 0)} holder_disconnected releases "
                 f"against the terminals' connection times",
        "presence": f"{len(run.stores)} store snapshots against the harness's connections",
        "payments": pay_detail,
        "views": f"{views[0]} mirrors on {views[1]} channels vs fresh snapshots on A and B",
        "recovery": f"{s.since_recovered} recoveries compared",
        "delivery": f"{totals.get('events', 0)} events; seq gaps: {s.gaps_after_resume} on "
                    f"resumed connections, {s.gap_resyncs - s.gaps_after_resume} on others",
        "memory": mem_detail,
    }
    ok = True
    for key, check in run.checks.items():
        verdict = "SKIP" if check.skipped else "PASS" if check.count == 0 else "FAIL"
        ok = ok and verdict != "FAIL"
        detail = details.get(key, check.detail) + (
            f"; {check.count} violations" if check.count else "")
        print(f"{verdict}  {check.name}")
        print(f"      {detail}")
        for example in check.examples:
            print(f"      ! {example}")
    print("-" * width)
    print("RESULT: " + ("PASS" if ok else f"FAIL (logs kept in {run.tmp})"))
    print("=" * width, flush=True)
    return ok

