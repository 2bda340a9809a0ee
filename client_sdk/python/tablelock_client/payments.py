"""Counter payments: `payment.complete` by a holder that may record a payment."""

from __future__ import annotations

from .errors import Forbidden, OutcomeUnknown
from .locks import HeldLocks
from .model import PaymentResult, capability, convert
from .requests import Requests
from .session import Session

# The SDK's own message (the broker never hears of such a call).
PHONE_NEVER_PAYS = (
    "A phone never records a payment: it holds the payment lock while the customer pays "
    "through the payment provider, and the platform's payment service records the payment "
    "with this lock's token (tablelock_client.PaymentService, role service).")


class Payments:
    def __init__(self, session: Session, requests: Requests, held: HeldLocks) -> None:
        self.session = session
        self.requests = requests
        self.held = held

    async def complete_payment(self, order_id: str, *, token: int | None, version: int,
                               amount_cents: int, payment_ref: str) -> PaymentResult:
        if not capability(self.session.terminal.role, "record_payment"):
            raise Forbidden(PHONE_NEVER_PAYS)
        try:
            reply = await self.requests.request(
                "payment.complete", order_id=order_id, token=token, version=version,
                amount_cents=amount_cents, payment_ref=payment_ref)
        except OutcomeUnknown as unknown:
            view = unknown.view
            if view is not None and view.order is not None and view.order.status == "paid":
                self.held.order_paid(order_id)
            raise
        self.held.order_paid(order_id)
        return convert({"order": reply["order"], "payment": reply.get("payment")},
                       PaymentResult)
