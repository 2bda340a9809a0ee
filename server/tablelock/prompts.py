"""The screens' prompts of PROTOCOL.md section 7, word for word, by locale."""

from __future__ import annotations

from typing import Final

from .rules import PHONE_PROMPT

Variant = str  # "" for the plain text, or a qualifier such as "h5" or "presettle"

_PROMPTS: Final[dict[tuple[str, Variant], tuple[str, str]]] = {
    # (code, variant): (zh-CN, en)
    ("ORDER_LOCKED", ""): (
        "商家正在修改订单，请稍后再结账",
        "The order is being changed at the counter. Please pay when it is done.",
    ),
    ("PAYMENT_LOCKED", ""): (
        "此订单正在其他机器/顾客端进行结账，现在结账可能导致重复支付，是否确定继续结账？",
        "This order is being checked out on another machine or by the customer. "
        "Checking out now may cause a duplicate payment. Continue?",
    ),
    ("PAYMENT_LOCKED", PHONE_PROMPT): (
        "订单正在其他机器/顾客端进行支付，请稍后再试",
        "This order is being paid elsewhere. Please try again shortly.",
    ),
    ("PRESETTLE_LOCKED", ""): (
        "订单已预结，暂不能修改",
        "The bill has been printed; the order cannot be changed now.",
    ),
    ("ACCEPT_BLOCKED", ""): (
        "订单正在其他机器/顾客端进行支付，暂不能接单，如需接单请先取消支付",
        "This order is being paid on another machine or by the customer, "
        "so it cannot be accepted now. Cancel the payment first.",
    ),
    ("ACCEPT_BLOCKED", "presettle"): (
        "订单已预结，暂不能接单，如需接单请先取消预结",
        "The bill has been printed, so the order cannot be accepted now. "
        "Cancel the pre-bill first.",
    ),
    ("ERP_UNAVAILABLE", ""): (
        "获取订单失败，请到前台结账",
        "Could not get the latest order. Please pay at the front desk.",
    ),
    ("LOCK_EXPIRED", ""): (
        "支付超时，请重新获取订单后再支付",
        "The payment timed out. Please reload the order and pay again.",
    ),
    ("STALE_VERSION", ""): (
        "订单已变更，请刷新后再支付",
        "The order has changed. Please refresh it before paying.",
    ),
    ("ORDER_PAID", ""): ("订单已支付", "This order has already been paid."),
    ("AMOUNT_MISMATCH", ""): (
        "支付金额与订单金额不一致，请刷新后再支付",
        "The amount paid differs from the order total. Please refresh before paying.",
    ),
    ("FENCED", ""): ("此订单已被其他机器接管", "This order was taken over by another machine."),
    ("NOT_HOLDER", ""): ("您未持有该锁", "You do not hold this lock."),
    ("FORBIDDEN", ""): ("无权执行此操作", "This terminal may not do that."),
    ("AUTH_FAILED", ""): ("身份验证失败，请重新登录",
                          "Authentication failed. Please sign in again."),
    ("BAD_REQUEST", ""): ("请求格式错误", "The request is malformed."),
    ("UNSUPPORTED_PROTOCOL", ""): ("不支持的协议版本", "This protocol version is not supported."),
    ("RATE_LIMITED", ""): ("请求过于频繁，请稍后再试", "Too many requests. Please slow down."),
    ("NOT_FOUND", ""): ("未找到该订单", "No such order."),
    ("LIMIT_REACHED", ""): ("连接或订阅数已达上限",
                            "A connection or subscription limit is reached."),
    ("UNAVAILABLE", ""): (
        "锁服务暂不可用，请稍后再试",
        "The lock service is unavailable right now. Please try again shortly.",
    ),
}

ERROR_CODES: Final[frozenset[str]] = frozenset(code for code, _ in _PROMPTS)
# Every prompt by (code, variant), for the docs (tablelock.docgen).
PROMPTS: Final = _PROMPTS


def prompt(code: str, locale: str, variant: Variant = "") -> str:
    """The message for `code` in `locale` (anything but "en" reads zh-CN)."""
    texts = _PROMPTS.get((code, variant)) or _PROMPTS[(code, "")]
    return texts[1] if locale == "en" else texts[0]
