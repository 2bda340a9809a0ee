"""The payment-lock history of a run, recorded request by request for bench/linearizability.py.

A terminal's request and its reply, as sent and read on the wire, become one
`Operation`: the client (store/terminal), the times the request left and the
reply came back (seconds on the harness's monotonic clock), what was asked and
what was answered. A request with no reply, or answered `UNAVAILABLE` with
`"outcome": "unknown"`, is indeterminate. Orders are named store/order_id, so
each order of each store is its own partition. Requests that cannot touch the
payment lock or the order's status (renewals, checks, subscriptions) are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .linearizability import (
    Acquire,
    Complete,
    Done,
    Granted,
    Input,
    Operation,
    OtherLock,
    Output,
    PaymentLockModel,
    Publish,
    Read,
    Refused,
    Release,
    Result,
    Seen,
    check,
    to_json,
)

Frame = dict[str, Any]


def _payment_token(locks: list[Frame]) -> int | None:
    tokens = [lock["token"] for lock in locks if lock.get("kind") == "payment"]
    return tokens[0] if tokens else None


def _request(store_id: str, type_: str, params: Frame, reply: Frame | None) -> Input | None:
    """What a request asked of the payment lock; None when it cannot touch it."""
    order_id = params.get("order_id")
    if type_ == "order.get":  # by table or by order: the reply names the order
        order = (reply or {}).get("order") if reply is not None and reply.get("ok") else None
        return Read(f"{store_id}/{order['order_id']}") if order else None
    if type_ == "order.publish":
        order = params["order"]
        return Publish(f"{store_id}/{order['order_id']}", bool(params.get("force")),
                       order.get("status", "open"))
    if order_id is None:
        return None
    key = f"{store_id}/{order_id}"
    if type_ == "lock.acquire":
        force = bool(params.get("force"))
        return Acquire(key, force) if params.get("kind") == "payment" else OtherLock(key, force)
    if type_ == "lock.release" and params.get("kind") == "payment":
        return Release(key, params.get("token"), bool(params.get("force")))
    if type_ == "payment.complete":
        return Complete(key, params.get("token"), params["payment_ref"])
    return None


def _answer(what: Input, reply: Frame) -> Output | None:
    """The reply as the model reads it; None: its outcome is unknown."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        if error.get("outcome") == "unknown" or reply.get("outcome") == "unknown":
            return None
        return Refused(error.get("code", "?"))
    if isinstance(what, Read):
        return Seen(_payment_token(reply.get("locks") or []), reply["order"]["status"])
    if isinstance(what, (Acquire, OtherLock)):
        lock = reply["lock"]
        forced = tuple(f["token"] for f in reply.get("forced") or [] if f["kind"] == "payment")
        return Granted(lock["token"], forced)
    return Done()


class History:
    """Every payment-lock request of a run, in the order they were recorded."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []

    def record(self, store_id: str, client: str, type_: str, params: Frame, call: float,
               ret: float, reply: Frame | None) -> None:
        what = _request(store_id, type_, params, reply)
        if what is None:
            return
        if isinstance(what, Acquire | OtherLock) and reply is not None and reply.get("ok") \
                and reply.get("lock") is None:
            return  # strong link off: nothing was held (the run never turns it off)
        answer = _answer(what, reply) if reply is not None else None
        done_at = ret if answer is not None else None
        self.operations.append(Operation(f"{store_id}/{client}", call, done_at, what, answer))

    def check(self, min_lifetime: float, budget: int | None = None,
              effect_within: float | None = None) -> Result:
        return check(self.operations, PaymentLockModel(min_lifetime, effect_within), budget)

    def save(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as out:
            for op in self.operations:
                out.write(json.dumps(to_json(op)) + "\n")
