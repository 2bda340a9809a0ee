"""Soak and chaos run: simulated stores on two brokers sharing one Redis, with faults.

    python -m bench.chaos [--minutes 2] [--seed 1] [--stores 5] [--tables 8] [--rate 20]
                          [--front nginx|direct] [--chaos broker,redis,pause,storm]

Starts its own redis-server (append-only, fsync always, so a restart keeps every
write), two `tablelock serve --backend redis://...` processes on free ports of
127.0.0.1 and, in front of them, nginx with the shipped docs/deploy/nginx.conf
(round-robin, WebSockets on /ws). Each store has an erp_main (answers
`order.fetch` from the store's order book), an erp_secondary, a manager and one
phone (h5) per table; every socket and the payment service's HTTP calls go
through nginx (with `--front direct`, each screen picks a broker itself), and
screens reconnect on their own, with backoff, when their socket closes:
`resume` when they can, else `subscribe` with `since`, taking the snapshot on
`recovered: false`.

A seeded, steady stream of actions runs for `--minutes`: order, payment and
presettle locks taken, renewed, released and forced; publishes with growing
versions (racing each other); h5 payment locks that pull the order from the
ERP; payments with unique `payment_ref`s and retries of the same ref. At seeded
times: broker B is SIGKILLed and restarted on its port, Redis is SIGKILLed and
restarted on its append-only file, Redis is paused (SIGSTOP) right after a
screen sent a write and resumed (SIGCONT) 0.6 s later, past the brokers' Redis
socket timeout, and a storm of clients drop their sockets at once. Broker A is
never killed, so its memory is measured over the whole run.

Checked and printed at the end (exit 1 when one broke, 2 when the run could not
complete; logs are kept in a temporary directory on failure):
  (a) one holder per order and kind, replaying the union of every numbered event
      any observer saw in seq order; fencing tokens strictly increase per order;
      a payment succeeds only with the current payment token; every token granted
      in a reply is in the event stream; no lock is released `holder_disconnected`
      while the harness had its holder connected;
  (b) at most one successful payment per order: replies, `order.paid` events and
      the audit log (`payment.completed`) agree; a retried ref is the same payment;
  (c) once traffic stops, every subscriber's mirror (snapshot + events) equals a
      fresh snapshot taken on each broker; `since` recovery lands on the snapshot;
      the online terminals in store snapshots are the ones actually connected;
  (d) memory per connection flat: RSS / connections at the broker's usual number of
      connections, median of the last third of its samples within 25% of the first
      third, after warm-up (broker A lives through the whole run);
  (e) events arrive once, in seq order, identical on every connection;
  (f) the history of every payment-lock request (lock.acquire, lock.release of the
      payment lock, payment.complete, order.get, order.publish: client, times sent
      and answered, request, reply; no reply or `outcome: unknown` is indeterminate)
      is linearizable per order against the model of bench/linearizability.py (the
      history stays in the logs as history.jsonl: `python -m bench.linearizability`).
"""


from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import time

from .faults import chaos, rebalance
from .lincheck import check_linearizable
from .memory import check_memory, sample_memory
from .payments import check_payments
from .processes import kill_children
from .report import report
from .run import Fatal, Run
from .settle import settle
from .streams import analyse_streams, check_grace
from .traffic import setup, traffic
from .views import compare_views


async def main_async(run: Run) -> bool:
    await setup(run)
    run.t0 = time.monotonic()
    run.t0_wall = time.time()
    run.traffic_end = run.t0 + run.duration
    background = [run.spawn(chaos(run)), run.spawn(rebalance(run)),
                  run.spawn(sample_memory(run))]
    await traffic(run)
    chaos_task = background[0]
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(chaos_task), 40)
    await settle(run)
    views = await compare_views(run)
    totals = analyse_streams(run)
    totals["holder_disconnected"] = check_grace(run)
    pay_detail = await check_payments(run)
    check_linearizable(run)
    run.stopping = True
    mem_detail = check_memory(run)
    return report(run, totals, views, pay_detail, mem_detail)


async def shutdown(run: Run) -> None:
    run.stopping = True
    run.final = True
    for term in run.terms:
        term.abort()
    tasks = [t for t in run.tasks if not t.done()]
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)


async def run_all(args: argparse.Namespace) -> int:
    run = Run(args)
    ok = False
    try:
        budget = args.minutes * 60 + 100  # setup, settling and checks take seconds
        ok = await asyncio.wait_for(main_async(run), budget)
        if run.stats.reader_errors:  # the harness itself failed: its verdicts mean nothing
            print("chaos run could not complete: errors in the harness: "
                  + " | ".join(run.stats.reader_errors), flush=True)
            ok = False
            return 2
        return 0 if ok else 1
    except (Fatal, RuntimeError, TimeoutError) as exc:
        print(f"chaos run could not complete: {type(exc).__name__}: {exc} "
              f"(logs in {run.tmp})", flush=True)
        return 2
    finally:
        await shutdown(run)
        if run.front is not None:
            run.front.stop()
        for broker in run.brokers:
            broker.kill()
        run.redis.kill()
        kill_children()
        if run.trace_file is not None:
            run.trace_file.close()
        shutil.rmtree(run.redis.dir, ignore_errors=True)  # the AOF; the logs stay on failure
        if ok and not args.keep:
            shutil.rmtree(run.tmp, ignore_errors=True)


def on_sigterm(*_: object) -> None:
    kill_children()
    sys.exit(143)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="traffic time (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stores", type=int, default=5)
    parser.add_argument("--tables", type=int, default=8, help="tables (one phone each) per store")
    parser.add_argument("--rate", type=float, default=20.0, help="actions per second in all")
    parser.add_argument("--chaos", default="broker,redis,pause,storm",
                        help="faults to inject, comma-separated: broker (SIGKILL and restart "
                             "broker B), redis (SIGKILL and restart Redis on its AOF), pause "
                             "(SIGSTOP Redis right after a write was sent, SIGCONT 0.6 s "
                             "later), storm (many sockets dropped at once); empty for none")
    parser.add_argument("--front", choices=["nginx", "direct"], default="nginx",
                        help="nginx in front of both brokers (default), or none")
    parser.add_argument("--keep", action="store_true", help="keep the logs even on success")
    parser.add_argument("--trace", action="store_true",
                        help="write every frame to trace.jsonl in the logs directory")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    return asyncio.run(run_all(args))
