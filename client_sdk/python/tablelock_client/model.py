"""The wire records the SDK hands out, as msgspec structs.

Unknown fields are ignored on decode, so a newer broker that adds fields
(PROTOCOL.md: "extra fields may be added freely") does not break old clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from .constants import CAPABILITIES, CONFIG_DEFAULTS

if TYPE_CHECKING:
    from .errors import TablelockError

LockKind = Literal["order", "payment", "presettle"]
Action = Literal["edit", "add_items", "modify", "pay", "presettle", "accept"]
Change = Literal["add_items", "modify", "status"]


class Holder(msgspec.Struct, frozen=True):
    terminal_id: str
    role: str
    name: str = ""


class Lock(msgspec.Struct, frozen=True):
    store_id: str
    order_id: str
    kind: str
    token: int
    holder: Holder
    acquired_at: int
    expires_at: int
    order_version: int


class Order(msgspec.Struct):
    order_id: str
    table_id: str
    version: int
    amount_cents: int
    items: list[Any] = msgspec.field(default_factory=list)
    status: str = "open"


class Terminal(msgspec.Struct, frozen=True):
    terminal_id: str
    role: str
    name: str = ""
    store_id: str = ""
    table_id: str | None = None


def _default(field: str) -> Any:
    """The broker's default of a config field (constants.CONFIG_DEFAULTS)."""
    return CONFIG_DEFAULTS[field]


class StoreConfig(msgspec.Struct, frozen=True):
    strong_link: bool = _default("strong_link")
    h5_payment_lock_ttl_ms: int = _default("h5_payment_lock_ttl_ms")
    erp_lock_ttl_ms: int = _default("erp_lock_ttl_ms")
    disconnect_grace_ms: int = _default("disconnect_grace_ms")
    erp_fetch_timeout_ms: int = _default("erp_fetch_timeout_ms")
    locale: str = _default("locale")
    order_retention_ms: int = _default("order_retention_ms")


class Payment(msgspec.Struct, frozen=True):
    token: int | None
    amount_cents: int
    payment_ref: str
    by: Terminal | None = None


class OrderView(msgspec.Struct):
    """`order.get`: the order and its current locks."""

    order: Order | None
    locks: list[Lock] = msgspec.field(default_factory=list)


class PaymentResult(msgspec.Struct):
    order: Order
    payment: Payment | None = None


class Contention(msgspec.Struct, frozen=True):
    """`lock.contended`: `by` was refused `action` because of `lock`, which we hold."""

    lock: Lock
    by: Terminal
    action: str = ""


class CheckResult(msgspec.Struct):
    """`check`: whether `action` would be allowed now, and if not, why."""

    allowed: bool
    code: str | None = None
    message: str | None = None
    can_force: bool = False
    lock: Lock | None = None

    @property
    def error(self) -> TablelockError | None:
        """The typed exception the action would raise, or None when allowed."""
        if self.allowed:
            return None
        from .errors import error_from

        return error_from({"code": self.code, "message": self.message,
                           "can_force": self.can_force,
                           "lock": msgspec.to_builtins(self.lock) if self.lock else None})


def capability(role: str, name: str) -> Any:
    """What the broker's capability table (constants.CAPABILITIES) says of `role`.

    The SDK asks this instead of comparing role names: e.g. `renew` (is a lock of
    this role renewed?), `record_payment`, `disconnect_grace`. None for a role
    this SDK does not know.
    """
    return CAPABILITIES.get(role, {}).get(name)


def lock_ttl_ms(config: StoreConfig, role: str) -> int:
    """The TTL of a lock held by `role`: the config field the capability table names."""
    field = capability(role, "lock_ttl")
    if not isinstance(field, str):
        raise ValueError(f"a {role} terminal holds no locks")
    return int(getattr(config, field))


T = TypeVar("T")


def convert(value: Any, type_: type[T]) -> T:
    """Decode a piece of a JSON frame into one of the structs above."""
    return msgspec.convert(value, type_)


def as_wire(value: Any) -> Any:
    """Structs (or plain mappings) as JSON-ready builtins."""
    return msgspec.to_builtins(value)
