"""Linearizability of payment-lock histories: Wing and Gong's search with Lowe's memoisation.

A history is a list of `Operation`s: who asked, when the request left and when
its reply came back (None: no reply, so it may or may not have taken effect),
what was asked and what was answered. `check` splits it per order (operations on
different orders commute, so each order is checked alone) and, for each order,
looks for one total order of its operations that respects real time (an
operation that returned before another was invoked comes first) and that the
sequential `PaymentLockModel` accepts, answer by answer.

The search is the one porcupine (github.com/anishathalye/porcupine) runs, written
here from the papers: the call and return entries of a partition sit in one
list in time order; the search linearizes the first call it can (the model
accepts its answer in the current state), removes it and its return from the
list and starts over from the head; when it reaches a return whose call is not
yet linearized, it backtracks the last choice. Lowe's memoisation keeps every
(set of linearized operations, model state) pair already tried, so no
configuration is explored twice. An operation without a reply may take effect
anywhere after its call, up to its deadline (`effect_within` after its call, or
after everything else): its return sits there, and a search that reaches it with
the operation unplaced counts it as never applied (so the search never has to
try "applied as a no-op" at every position).

The model is nondeterministic (a lock may lapse on its own; an unanswered
request may or may not have applied; the token of an unanswered grant is
unknown until a read shows it), so the search runs over sets of model states,
as porcupine does with its nondeterministic models.

Strict where the protocol is: a grant's token (of any kind) tops every earlier token of
its order, and an order or presettle grant below that is only the re-acquire of the
client's own lock; no two holders of the payment lock; a force names the lock it revoked;
at most one payment, whose retries (same `payment_ref`) answer the same success; a
payment refused for its version or amount held the current token (section 2's
precedence); `UNAVAILABLE` changed nothing. Lenient only where the history cannot know:
  - when a lock ends on its own: any time after its shortest TTL or grace can have run
    out since the request that took it left (renewals are not recorded; the harness
    passes the bound, less clock slack);
  - whether and when an unanswered request took effect (any time after it was sent, up to
    `effect_within`: 20 s in the chaos run);
  - an unanswered grant's token, until a reply shows it: only its lower bound is known.
Operations that touch at one instant count as concurrent (porcupine's reading too).

    python -m bench.linearizability HISTORY.json   # one JSON operation per line
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# --- operations ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acquire:
    """lock.acquire of the payment lock."""

    order_id: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    """lock.release of the payment lock."""

    order_id: str
    token: int | None
    force: bool = False


@dataclass(frozen=True, slots=True)
class Complete:
    order_id: str
    token: int | None
    payment_ref: str


@dataclass(frozen=True, slots=True)
class Read:
    """order.get: the order's status and its locks."""

    order_id: str


@dataclass(frozen=True, slots=True)
class OtherLock:
    """lock.acquire of an order or presettle lock: both are blocked by another's payment
    lock (so a force revokes it), and their tokens come from the same per-order counter."""

    order_id: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    """order.publish: modify and add_items are blocked by another's payment lock (a force
    revokes it); `status` "closed" ends the order and releases its locks, "open" reopens
    an unpaid one."""

    order_id: str
    force: bool = False
    status: str = "open"


Input = Acquire | Release | Complete | Read | OtherLock | Publish


@dataclass(frozen=True, slots=True)
class Granted:
    """A lock granted (payment, or another kind for OtherLock); `forced`: the payment-lock
    tokens it revoked (a force names the lock it revoked: an empty `forced` says it revoked
    none)."""

    token: int
    forced: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Refused:
    code: str


@dataclass(frozen=True, slots=True)
class Done:
    """A release, a payment or a publish went through."""


@dataclass(frozen=True, slots=True)
class Seen:
    """A read: the payment lock's token (None: no lock) and the order's status."""

    token: int | None
    status: str


Output = Granted | Refused | Done | Seen


@dataclass(frozen=True, slots=True)
class Operation:
    client: str
    call: float  # when the request left
    ret: float | None  # when its reply came back; None: no reply (indeterminate)
    input: Input
    output: Output | None  # None: no reply, or an answer that says the outcome is unknown

    @property
    def indeterminate(self) -> bool:
        return self.ret is None or self.output is None


# --- the sequential model of the payment lock (PROTOCOL.md section 2) ------------

class LockState(NamedTuple):
    holder: str | None  # the client holding the payment lock
    token: int | None  # its token; None while unknown (granted by an unanswered acquire)
    since: float  # when the request that granted it was sent
    low: int  # while its token is unknown: the least it can be
    floor: int  # every later grant's token must exceed this: tokens only grow
    lapsed: int | None  # the token of the last lock that expired, until the next grant
    paid: str | None  # the payment_ref the order was paid with
    closed: bool  # the ERP closed the order
    # The order and presettle locks granted so far, as (client, least token, greatest
    # token): a re-acquire may only return one of its own (an unanswered grant's token is
    # known only to be above the floor it found).
    other_grants: frozenset[tuple[str, int, int]]

    @property
    def ended(self) -> bool:
        return self.paid is not None or self.closed

    @property
    def status(self) -> str:
        return "closed" if self.closed else "paid" if self.paid is not None else "open"

    def others(self, client: str) -> bool:
        """Someone other than `client` holds the payment lock."""
        return self.holder is not None and self.holder != client

    def freed(self) -> LockState:
        return self._replace(holder=None, token=None)


# Refusals that say nothing about the payment lock (the ERP, the broker's load, a request
# the broker could not take) or that say nothing changed: allowed in any state, they change
# nothing. A version is refused after the token (section 2's precedence): STALE_VERSION is
# neutral only for a publish, which carries no payment token.
NEUTRAL = {"UNAVAILABLE", "ERP_UNAVAILABLE", "FORBIDDEN", "NOT_FOUND", "BAD_REQUEST",
           "RATE_LIMITED", "ACCEPT_BLOCKED"}
UNBOUNDED = 2**62  # the greatest token an unanswered grant may have
# Conflicts named after the payment lock's: another's payment lock would have come first.
LATER_CONFLICTS = {"PRESETTLE_LOCKED", "ORDER_LOCKED"}


@dataclass(frozen=True, slots=True)
class PaymentLockModel:
    """The payment lock of one order, strict where the protocol is strict.

    A grant's token (of any kind) exceeds every earlier token of the order; no two
    clients hold the payment lock; a release or a payment goes through only with
    the current token; at most one payment, whose retries (same `payment_ref`)
    answer the same success; an ended order takes no lock.

    A lock may also end on its own (its TTL, or its holder's disconnect grace), but
    not sooner than `min_lifetime` (seconds, the history's unit) after the request
    that took it was sent: before an operation that returned later than that, the
    lock may have lapsed. Renewals only push that moment later. An unanswered request
    that has not taken effect `effect_within` after it was sent never does.
    """

    min_lifetime: float = float("inf")
    # An unanswered request takes effect, if at all, within this many seconds of being sent
    # (None: any time after). The broker resolves a commit whose reply it lost within 5 s,
    # and answers `outcome: unknown` past that (PROTOCOL.md section 7).
    effect_within: float | None = None

    def init(self) -> LockState:
        return LockState(None, None, 0.0, 0, 0, None, None, False, frozenset())

    def step(self, state: LockState, op: Operation) -> set[LockState]:
        """Every state `op` can leave when linearized in `state`, given its answer."""
        starts = {state}
        ret = float("inf") if op.indeterminate else op.ret
        if state.holder is not None and ret is not None and (
                ret - state.since >= self.min_lifetime):
            starts.add(state.freed()._replace(lapsed=state.token))  # expired
            starts.add(state.freed())  # released: its holder's grace ran out
        found: set[LockState] = set()
        for start in starts:
            if op.indeterminate:
                found.update(_effects(start, op))  # (never applied: it is left unplaced)
            else:
                assert op.output is not None
                found.update(_answered(start, op, op.output))
        return found


def _current(state: LockState, token: int | None) -> bool:
    """Can `token` be the held lock's (whose token may be unknown, but has a least value)?"""
    if state.holder is None or token is None:
        return False
    return state.token == token if state.token is not None else token >= state.low


def _resolve(state: LockState, token: int) -> LockState:
    """The held lock's token is `token` (the caller checked `_current`)."""
    if state.token is not None:
        return state
    return state._replace(token=token, floor=max(state.floor, token))


def _grant(state: LockState, op: Operation, token: int | None) -> LockState | None:
    """`op`'s client takes the lock with `token` (None: unknown); None if it is too low."""
    if token is None:
        return state._replace(holder=op.client, token=None, since=op.call,
                              low=state.floor + 1, floor=state.floor + 1, lapsed=None)
    if token <= state.floor:
        return None
    return state._replace(holder=op.client, token=token, since=op.call, floor=token,
                          lapsed=None)


def _published(state: LockState, op: Publish, client: str) -> LockState:
    after = state.freed() if op.force and state.others(client) else state
    if op.status == "closed":
        return after.freed()._replace(closed=True)
    return after._replace(closed=False)


def _effects(state: LockState, operation: Operation) -> set[LockState]:
    """What an unanswered operation may have done (other than nothing)."""
    client, op = operation.client, operation.input
    if state.ended and not isinstance(op, Publish):
        return set()
    if isinstance(op, Acquire) and state.holder != client and (
            op.force or state.holder is None):
        return {_grant(state, operation, None) or state}
    if isinstance(op, Release) and state.holder is not None and (
            op.force or (state.holder == client and (
                op.token is None or _current(state, op.token)))):
        return {state.freed()}
    if isinstance(op, Complete) and _current(state, op.token):
        return {state.freed()._replace(paid=op.payment_ref)}
    if isinstance(op, OtherLock):  # a grant of unknown token
        taken = state._replace(floor=state.floor + 1, other_grants=state.other_grants | {
            (client, state.floor + 1, UNBOUNDED)})
        return {taken, taken.freed()} if op.force and state.others(client) else {taken}
    if isinstance(op, Publish) and (state.paid is None or op.status == "closed"):
        return {_published(state, op, client)}  # a paid order may only be closed
    return set()


def _answered(state: LockState, operation: Operation, out: Output) -> set[LockState]:
    client, op = operation.client, operation.input
    if isinstance(out, Refused):
        return {state} if _refusal_fits(state, client, op, out.code) else set()
    if isinstance(op, Read):
        if not isinstance(out, Seen) or out.status != state.status:
            return set()
        if out.token is None:
            return {state} if state.holder is None else set()
        return {_resolve(state, out.token)} if _current(state, out.token) else set()
    if isinstance(op, Acquire):
        return _answered_acquire(state, operation, out)
    if isinstance(op, OtherLock):
        return _answered_other_lock(state, operation, out)
    if not isinstance(out, Done):
        return set()
    if isinstance(op, Release):
        if state.ended or state.holder is None:
            return set()
        mine = state.holder == client and (op.token is None or _current(state, op.token))
        return {state.freed()} if op.force or mine else set()
    if isinstance(op, Publish):
        if state.paid is not None and op.status != "closed":
            return set()
        return {_published(state, op, client)} if op.force or not state.others(client) \
            else set()
    assert isinstance(op, Complete)
    if state.paid is not None:
        return {state} if state.paid == op.payment_ref else set()  # the retry
    if state.ended or not _current(state, op.token):
        return set()
    assert op.token is not None
    return {_resolve(state, op.token).freed()._replace(paid=op.payment_ref)}


def _answered_acquire(state: LockState, operation: Operation, out: Output) -> set[LockState]:
    client, op = operation.client, operation.input
    assert isinstance(op, Acquire)
    if not isinstance(out, Granted) or state.ended:
        return set()
    if state.holder == client:  # a re-acquire returns the held lock
        if out.forced or not _current(state, out.token):
            return set()
        return {_resolve(state, out.token)}
    if state.holder is not None:  # another client holds it: only a force takes it, naming it
        if not op.force or len(out.forced) != 1 or not _current(state, out.forced[0]):
            return set()
    elif out.forced:
        return set()  # it revoked a lock that was not there
    granted = _grant(state, operation, out.token)
    return {granted} if granted is not None else set()


def _answered_other_lock(state: LockState, operation: Operation,
                         out: Output) -> set[LockState]:
    client, op = operation.client, operation.input
    assert isinstance(op, OtherLock)
    if not isinstance(out, Granted) or state.ended:
        return set()
    if not out.forced and any(who == client and low <= out.token <= high
                              for who, low, high in state.other_grants):
        # The re-acquire of the client's own lock of that kind: returned before any conflict.
        return {state}
    if out.token <= state.floor:
        return set()  # a new grant's token tops every earlier token of the order
    after = state
    if out.forced:
        if not op.force or len(out.forced) != 1 or not state.others(client) or not _current(
                state, out.forced[0]):
            return set()
        after = state.freed()
    elif state.others(client):
        return set()  # another's payment lock blocks it; a force names the lock it revoked
    return {after._replace(floor=out.token, other_grants=after.other_grants | {
        (client, out.token, out.token)})}


def _refusal_fits(state: LockState, client: str, op: Input, code: str) -> bool:
    """Could `op` be refused `code` in `state` (it then changes nothing)?"""
    if code in NEUTRAL or isinstance(op, Read):
        return code in NEUTRAL
    if isinstance(op, Publish) and code == "STALE_VERSION":
        return True  # another publish of that version came first
    if isinstance(op, Publish):
        if code == "ORDER_PAID":
            return state.paid is not None and op.status != "closed"
        if code == "PAYMENT_LOCKED":
            return not op.force and state.others(client)
        return (code in LATER_CONFLICTS and not state.others(client)) or code in (
            "FENCED", "LOCK_EXPIRED", "NOT_HOLDER")  # a publish under a token
    if code == "ORDER_PAID":
        if isinstance(op, Complete) and state.paid == op.payment_ref:
            return False  # the retry of the success answers it again
        return state.ended
    if state.ended:
        return False  # ORDER_PAID comes first
    if isinstance(op, (Acquire, OtherLock)):
        if code == "PAYMENT_LOCKED":
            return not op.force and state.others(client)
        return code in LATER_CONFLICTS and not state.others(client)
    token = op.token if isinstance(op, (Release, Complete)) else None
    current = _current(state, token)
    if code == "NOT_HOLDER":
        if isinstance(op, Release) and (op.force or op.token is None):
            return state.holder is None or (not op.force and state.holder != client)
        return current and state.holder != client
    if code in ("STALE_VERSION", "AMOUNT_MISMATCH"):  # after the token: it was current
        return isinstance(op, Complete) and current
    # A token refusal. A current token can still be refused while the held lock's token
    # is unknown and the token merely sits above the floor.
    if current:
        return state.token is None and (code == "FENCED" or (
            code == "LOCK_EXPIRED" and token == state.lapsed))
    if code == "LOCK_EXPIRED":
        return token is not None and token == state.lapsed
    return code == "FENCED" and (token is None or token != state.lapsed)


# --- the search --------------------------------------------------------------------

class _Entry:
    """A call or a return in the partition's time-ordered doubly linked list."""

    __slots__ = ("id", "is_call", "match", "next", "prev", "time")

    def __init__(self, op_id: int, time: float, is_call: bool) -> None:
        self.id = op_id
        self.time = time
        self.is_call = is_call
        self.match: _Entry | None = None  # a call's return, a return's call
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _entries(ops: list[Operation], effect_within: float | None) -> _Entry:
    """The list head: calls and returns by time; at equal times calls first, so that two
    operations that touch at one instant count as concurrent (the lenient reading). An
    unanswered operation returns after everything else, or `effect_within` after its call."""
    end = max([op.call for op in ops] + [op.ret for op in ops if op.ret is not None]) + 1
    events: list[tuple[float, int, _Entry]] = []
    for op_id, op in enumerate(ops):
        call = _Entry(op_id, op.call, True)
        if not op.indeterminate:
            assert op.ret is not None
            ret = _Entry(op_id, op.ret, False)
        elif effect_within is None:
            ret = _Entry(op_id, end, False)
        else:
            ret = _Entry(op_id, min(end, op.call + effect_within), False)
        call.match, ret.match = ret, call
        events += [(call.time, 0, call), (ret.time, 1, ret)]
    events.sort(key=lambda item: (item[0], item[1]))
    head = _Entry(-1, float("-inf"), False)
    last = head
    for _, _, entry in events:
        last.next, entry.prev = entry, last
        last = entry
    return head


def _lift(call: _Entry) -> None:
    assert call.prev is not None and call.match is not None and call.match.prev is not None
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    ret = call.match
    ret.prev.next = ret.next  # type: ignore[union-attr]
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Entry) -> None:
    ret = call.match
    assert ret is not None and ret.prev is not None and call.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


@dataclass
class PartitionResult:
    order_id: str
    ok: bool | None  # None: the search gave up (it tried `budget` configurations)
    operations: int
    # The longest prefix of a linearization the search found (all of it when ok).
    longest: list[Operation] = field(default_factory=list)
    configurations: int = 0  # (linearized set, states) pairs tried: the search's work


def check_partition(order_id: str, ops: list[Operation], model: PaymentLockModel,
                    budget: int | None = None) -> PartitionResult:
    if not ops:
        return PartitionResult(order_id, True, 0)
    head = _entries(ops, model.effect_within)
    states: frozenset[LockState] = frozenset({model.init()})
    linearized = 0
    seen: set[tuple[int, Hashable]] = set()
    # The calls placed, with the states before each; `dropped`: an unanswered one that
    # never took effect.
    stack: list[tuple[_Entry, frozenset[LockState], bool]] = []
    longest: list[int] = []
    deepest = 0
    entry = head.next
    while head.next is not None:
        assert entry is not None
        if entry.is_call:
            op = ops[entry.id]
            following = frozenset(after for state in states for after in model.step(state, op))
            if following:
                mark = linearized | (1 << entry.id)
                if (mark, following) not in seen:
                    if budget is not None and len(seen) >= budget:
                        return PartitionResult(order_id, None, len(ops),
                                               [ops[i] for i in longest], len(seen))
                    seen.add((mark, following))
                    stack.append((entry, states, False))
                    states, linearized = following, mark
                    _lift(entry)
                    if len(stack) > deepest:
                        deepest = len(stack)
                        longest = [call.id for call, _, dropped in stack if not dropped]
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if ops[entry.id].indeterminate and model.effect_within is None:
                # Every answered operation is placed (their returns all come earlier): the
                # unanswered ones still unplaced never took effect.
                return PartitionResult(order_id, True, len(ops), [ops[i] for i in longest],
                                       len(seen))
            if ops[entry.id].indeterminate:
                # Past the last moment it could take effect: it never did (tried first; on
                # backtracking, placing it earlier is tried).
                mark = linearized | (1 << entry.id)
                if (mark, states) not in seen:
                    if budget is not None and len(seen) >= budget:
                        return PartitionResult(order_id, None, len(ops),
                                               [ops[i] for i in longest], len(seen))
                    seen.add((mark, states))
                    call = entry.match
                    assert call is not None
                    stack.append((call, states, True))
                    linearized = mark
                    _lift(call)
                    entry = head.next
                    continue
            if not stack:  # this return's call cannot come first in any order: not linearizable
                return PartitionResult(order_id, False, len(ops), [ops[i] for i in longest],
                                       len(seen))
            call, states, _ = stack.pop()
            linearized &= ~(1 << call.id)
            _unlift(call)
            entry = call.next
    return PartitionResult(order_id, True, len(ops), [ops[i] for i in longest], len(seen))


@dataclass
class Result:
    partitions: list[PartitionResult]

    @property
    def ok(self) -> bool:
        """Linearizable: every order has a linearization (none failed, none gave up)."""
        return all(p.ok for p in self.partitions)

    @property
    def failures(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.ok is False]

    @property
    def unknown(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.ok is None]


def check(history: Iterable[Operation], model: PaymentLockModel | None = None,
          budget: int | None = None) -> Result:
    """Is `history` linearizable, order by order? `budget`: configurations an order may
    take before its search gives up (None: no limit)."""
    model = model or PaymentLockModel()
    by_order: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        by_order[op.input.order_id].append(op)
    return Result([check_partition(order_id, ops, model, budget)
                   for order_id, ops in sorted(by_order.items())])


# --- histories as JSON lines ------------------------------------------------------------

_INPUTS = {"acquire": Acquire, "release": Release, "complete": Complete, "read": Read,
           "other_lock": OtherLock, "publish": Publish}
_OUTPUTS = {"granted": Granted, "refused": Refused, "done": Done, "seen": Seen}


def to_json(op: Operation) -> dict[str, Any]:
    def tagged(value: Any, table: dict[str, type]) -> dict[str, Any] | None:
        if value is None:
            return None
        name = next(k for k, v in table.items() if isinstance(value, v))
        fields = {k: getattr(value, k) for k in value.__dataclass_fields__}
        return {"op": name, **fields}
    return {"client": op.client, "call": op.call, "ret": op.ret,
            "input": tagged(op.input, _INPUTS), "output": tagged(op.output, _OUTPUTS)}


def from_json(data: dict[str, Any]) -> Operation:
    def build(value: dict[str, Any] | None, table: dict[str, type]) -> Any:
        if value is None:
            return None
        fields = dict(value)
        kind = table[fields.pop("op")]
        if "forced" in fields:
            fields["forced"] = tuple(fields["forced"] or ())
        return kind(**fields)
    return Operation(data["client"], data["call"], data["ret"], build(data["input"], _INPUTS),
                     build(data["output"], _OUTPUTS))


def describe(op: Operation) -> str:
    end = "no reply" if op.ret is None else f"{op.ret:.3f}"
    return f"{op.client} [{op.call:.3f} .. {end}] {op.input} -> {op.output}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check a payment-lock history")
    parser.add_argument("history", help="JSON lines, one operation each")
    parser.add_argument("--min-lifetime", type=float, default=float("inf"),
                        help="least time a lock lives unrenewed, in the history's unit "
                             "(default: locks never end on their own)")
    parser.add_argument("--effect-within", type=float, default=None,
                        help="the latest an unanswered request can take effect after it was "
                             "sent, in the history's unit (default: any time)")
    args = parser.parse_args(argv)
    with open(args.history, encoding="utf-8") as lines:
        history = [from_json(json.loads(line)) for line in lines if line.strip()]
    result = check(history, PaymentLockModel(args.min_lifetime, args.effect_within))
    verdict = ("linearizable" if result.ok else "NOT linearizable" if result.failures
               else "unknown (the search gave up)")
    print(f"{len(history)} operations, {len(result.partitions)} orders: {verdict}")
    for failure in result.failures:
        print(f"order {failure.order_id}: no linearization; the longest prefix found:")
        for op in failure.longest:
            print("   ", describe(op))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
