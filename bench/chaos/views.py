"""(c) once traffic stops, every subscriber's mirror equals a fresh snapshot taken on each
broker (straight, not through nginx); the online terminals in store snapshots are the ones
actually connected."""

from __future__ import annotations

from collections import defaultdict

from .connection import Connection
from .mirror import Mirror, View, snapshot_view, view_diff
from .run import Fatal, Run
from .screen import Screen
from .settle import wait_quietly


async def compare_views(run: Run) -> tuple[int, int]:
    """(c): every mirror against a fresh snapshot of its channel, taken on both brokers."""
    check = run.checks["views"]
    for term in run.terms:
        if not term.synced:
            check.fail(f"{term.store.store_id}/{term.sub} never got back in sync "
                       f"(connected: {term.ready})")
    by_channel: dict[str, list[tuple[Screen, Mirror]]] = defaultdict(list)
    for term in run.terms:
        if term.synced:
            for channel, mirror in term.mirrors.items():
                by_channel[channel].append((term, mirror))
    checkers: list[Connection] = []
    for index in range(len(run.brokers)):
        checker = Connection(run, run.stores[0], "manager", "chaos-checker", home=index)
        checker.counted = False
        await checker.connect(index)
        checkers.append(checker)
    compared = 0
    for channel, holders in sorted(by_channel.items()):
        store_id = channel.split(":")[1]
        for attempt in range(8):
            truths = []
            for checker in checkers:
                token = run.mint(store_id, "manager", "chaos-checker")
                truths.append(await fresh_snapshot(checker, token, channel))
            (seq, truth), (seq_b, truth_b) = truths
            if seq == seq_b and truth != truth_b:
                check.fail(f"{channel}@{seq}: brokers A and B disagree: "
                           f"{view_diff(truth, truth_b)}")
            if channel.startswith("store:") and attempt == 0:
                connected = {t.sub for t in run.terms if t.store.store_id == store_id
                             and t.ready} | {"chaos-checker"}
                if truth.terminals != connected:
                    run.checks["presence"].fail(
                        f"{channel}@{seq}: shown online but not connected "
                        f"{sorted(truth.terminals - connected)}; connected but shown offline "
                        f"{sorted(connected - truth.terminals)}")
            await wait_quietly(lambda s=seq, h=holders: all(
                m.seq is not None and m.seq >= s for _, m in h), 10)
            if any(m.seq is not None and m.seq > seq for _, m in holders) and attempt < 7:
                continue  # the channel moved on meanwhile (an expiry): look again
            for term, mirror in holders:
                compared += 1
                if mirror.seq != seq:
                    check.fail(f"{term.sub} {channel}: at seq {mirror.seq}, broker at {seq}")
                    continue
                diff = view_diff(mirror.view(), truth)
                if diff:
                    check.fail(f"{term.sub} {channel}@{seq}: {diff}")
            break
    for checker in checkers:
        await checker.close_gracefully()
    return compared, len(by_channel)


async def fresh_snapshot(checker: Connection, token: str, channel: str) -> tuple[int, View]:
    """A fresh subscribe on a connection of the channel's store: (seq, state)."""
    store_id = channel.split(":")[1]
    link = checker.link
    if link is None or checker.store.store_id != store_id or link.closed:
        await checker.close_gracefully()
        checker.store = next(s for s in checker.run.stores if s.store_id == store_id)
        checker.token = token
        checker.session_id = None
        checker.mirrors = {}
        link = await checker.connect(checker.home)
    reply = await checker.call(link, "subscribe", {"channel": channel}, timeout=10)
    if reply is None or not reply.get("ok"):
        raise Fatal(f"checker could not subscribe to {channel}: {reply}")
    await checker.call(link, "unsubscribe", {"channel": channel}, timeout=10)
    return reply["seq"], snapshot_view(channel, reply["snapshot"])

