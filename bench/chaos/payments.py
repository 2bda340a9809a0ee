"""(b) at most one successful payment per order: replies, `order.paid` events and the audit
log (`payment.completed`) name the same single payment; a retried ref is the same payment."""

from __future__ import annotations

from collections import defaultdict

from .http_client import http
from .run import Run


async def check_payments(run: Run) -> str:
    """(b): replies, events and the audit log name the same single payment per order."""
    check = run.checks["payments"]
    for (store_id, oid), refs in run.paid_ok.items():
        if len(refs) > 1:
            check.fail(f"{store_id}/{oid}: {len(refs)} payments succeeded: {sorted(refs)}")
    events_paid: dict[tuple[str, str], tuple[str | None, int]] = {}
    for channel, numbered in run.events.items():
        if channel.startswith("store:"):
            store_id = channel.split(":")[1]
            for _, ev in numbered.values():
                if ev.name == "order.paid":
                    events_paid[(store_id, ev.order_id or "")] = (ev.pay_ref, ev.ts)
    for (store_id, oid), refs in run.paid_ok.items():
        got = events_paid.get((store_id, oid))
        if got is not None and got[0] not in refs:
            check.fail(f"{store_id}/{oid}: paid with {sorted(refs)}, order.paid says {got[0]}")
    audited = outside = 0
    for store in run.stores:
        token = run.mint(store.store_id, "manager", "chaos-auditor")
        status, body = await http("GET", run.brokers[0].port,
                                  f"/v1/stores/{store.store_id}/audit?kind=payment.completed"
                                  f"&limit=1000", token, timeout=10)
        if status != 200:
            check.fail(f"{store.store_id}: audit answered {status}: {body}")
            continue
        entries = body["entries"]
        audited += len(entries)
        per_order: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            per_order[entry["order_id"]].append(entry["detail"].get("payment_ref"))
        for oid, audited_refs in per_order.items():
            if len(audited_refs) > 1:
                check.fail(f"{store.store_id}/{oid}: {len(audited_refs)} payment.completed "
                           f"audit entries: {audited_refs}")
            ours = run.paid_ok.get((store.store_id, oid))
            first = audited_refs[0]
            if ours and first not in ours:
                check.fail(f"{store.store_id}/{oid}: audit says {first}, replies {ours}")
            seen = events_paid.get((store.store_id, oid))
            if seen is not None and seen[0] != first:
                check.fail(f"{store.store_id}/{oid}: audit says {first}, event {seen[0]}")
        oldest = min((e["ts"] for e in entries), default=None)
        truncated = len(entries) >= 1000
        for (store_id, oid), (ref, ts) in events_paid.items():
            if store_id != store.store_id:
                continue
            if truncated and oldest is not None and ts < oldest:
                outside += 1
                continue
            if oid not in per_order:
                check.fail(f"{store_id}/{oid}: order.paid ({ref}) without a payment.completed "
                           f"audit entry")
    unconfirmed = sum(1 for key in events_paid if key not in run.paid_ok)
    return (f"{len(events_paid)} orders paid, {audited} audit entries"
            + (f" ({outside} older than the audit window)" if outside else "")
            + f", {unconfirmed} paid without a reply seen")

