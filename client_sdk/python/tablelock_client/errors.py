"""Typed exceptions: one class per error code of PROTOCOL.md section 7."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from .model import Holder, Lock, OrderView


class TablelockError(Exception):
    """A refusal from the broker. `message` is the prompt in the session's locale."""

    code: ClassVar[str] = "ERROR"

    def __init__(self, message: str = "", *, code: str | None = None, can_force: bool = False,
                 lock: Lock | None = None) -> None:
        super().__init__(message or self.code)
        if code is not None:
            self.code = code  # type: ignore[misc]  # an unknown code keeps its own name
        self.message = message
        self.can_force = can_force
        self.lock = lock

    @property
    def holder(self) -> Holder | None:
        """Who holds the lock that blocked the request, if one did."""
        return self.lock.holder if self.lock is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class OrderLocked(TablelockError):
    code = "ORDER_LOCKED"


class PaymentLocked(TablelockError):
    code = "PAYMENT_LOCKED"


class PresettleLocked(TablelockError):
    code = "PRESETTLE_LOCKED"


class AcceptBlocked(TablelockError):
    code = "ACCEPT_BLOCKED"


class ErpUnavailable(TablelockError):
    code = "ERP_UNAVAILABLE"


class LockExpired(TablelockError):
    code = "LOCK_EXPIRED"


class StaleVersion(TablelockError):
    code = "STALE_VERSION"


class OrderPaid(TablelockError):
    code = "ORDER_PAID"


class AmountMismatch(TablelockError):
    code = "AMOUNT_MISMATCH"


class Fenced(TablelockError):
    code = "FENCED"


class NotHolder(TablelockError):
    code = "NOT_HOLDER"


class Forbidden(TablelockError):
    code = "FORBIDDEN"


class AuthFailed(TablelockError):
    code = "AUTH_FAILED"


class BadRequest(TablelockError):
    code = "BAD_REQUEST"


class UnsupportedProtocol(TablelockError):
    code = "UNSUPPORTED_PROTOCOL"


class RateLimited(TablelockError):
    code = "RATE_LIMITED"


class NotFound(TablelockError):
    code = "NOT_FOUND"


class LimitReached(TablelockError):
    """A connection or subscription limit of the broker is reached."""

    code = "LIMIT_REACHED"


class Unavailable(TablelockError):
    code = "UNAVAILABLE"


class OutcomeUnknown(Unavailable):
    """`UNAVAILABLE` with `"outcome": "unknown"`: a write may or may not have been applied.

    The broker sent the write to its backend and could not learn, within 5 s,
    whether it took effect. The SDK has already re-read the order (`order.get`)
    before raising: `view` is what the broker holds now (None if that read
    failed too). Decide from it, never from the request: e.g. an order that is
    now `paid`, or a lock of `kind` held by this terminal.
    """

    def __init__(self, message: str = "", *, view: OrderView | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.view = view


class Disconnected(Unavailable):
    """The broker cannot be reached right now (raised locally, never sent by the broker).

    A subclass of Unavailable because a screen treats both alike: an ERP may
    take payment at its counter, an H5 page shows "pay at the front desk".
    """


ERRORS: dict[str, type[TablelockError]] = {
    cls.code: cls
    for cls in (OrderLocked, PaymentLocked, PresettleLocked, AcceptBlocked, ErpUnavailable,
                LockExpired, StaleVersion, OrderPaid, AmountMismatch, Fenced, NotHolder,
                Forbidden, AuthFailed, BadRequest, UnsupportedProtocol, RateLimited, NotFound,
                LimitReached, Unavailable)
}


def error_from(body: Mapping[str, Any] | None) -> TablelockError:
    """The exception for an `error` object of a reply (or a refused `check`)."""
    body = body or {}
    code = str(body.get("code") or "ERROR")
    raw_lock = body.get("lock")
    lock = msgspec.convert(raw_lock, Lock) if raw_lock else None
    unknown = code == "UNAVAILABLE" and body.get("outcome") == "unknown"
    cls = OutcomeUnknown if unknown else ERRORS.get(code)
    kwargs: dict[str, Any] = {"can_force": bool(body.get("can_force")), "lock": lock}
    if cls is None:
        return TablelockError(str(body.get("message") or code), code=code, **kwargs)
    return cls(str(body.get("message") or ""), **kwargs)
