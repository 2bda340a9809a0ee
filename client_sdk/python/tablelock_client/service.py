"""The platform's payment service: it records a phone's payment over HTTP (role `service`).

A phone never records a payment. It holds the payment lock while the customer
pays in the payment provider's app; the provider tells the platform, and the
platform's payment service records the payment with the phone's lock token:
`POST /v1/stores/{store}/orders/{order}/payment`.

The SDK depends on no HTTP client (its socket is `websockets`), and one small
POST per payment does not warrant adding one: requests go through the standard
library's urllib, in a worker thread for asyncio callers.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import Disconnected, NotFound, OutcomeUnknown, TablelockError, Unavailable, error_from
from .model import OrderView, PaymentResult, convert


class PaymentService:
    """Calls the broker's HTTP API with a `service` token of one store.

        service = PaymentService("http://127.0.0.1:8080", service_token)
        await service.complete_payment("s1", "o1", token=lock_token, version=3,
                                       amount_cents=4200, payment_ref="wx-123")

    Refusals raise the same typed errors as the WebSocket client (LockExpired,
    Fenced, StaleVersion, AmountMismatch, OrderPaid, ...), with the message in
    the store's locale. `*_blocking` are the same calls for programs that are
    not asyncio.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    async def complete_payment(self, store_id: str, order_id: str, *, token: int | None,
                               version: int, amount_cents: int,
                               payment_ref: str) -> PaymentResult:
        """Record the payment; retrying with the same `payment_ref` returns the same success."""
        return await asyncio.to_thread(
            self.complete_payment_blocking, store_id, order_id, token=token, version=version,
            amount_cents=amount_cents, payment_ref=payment_ref)

    async def get_order(self, store_id: str, order_id: str) -> OrderView:
        return await asyncio.to_thread(self.get_order_blocking, store_id, order_id)

    def complete_payment_blocking(self, store_id: str, order_id: str, *, token: int | None,
                                  version: int, amount_cents: int,
                                  payment_ref: str) -> PaymentResult:
        body = {"token": token, "version": version, "amount_cents": amount_cents,
                "payment_ref": payment_ref}
        try:
            reply = self._call("POST", self._order_path(store_id, order_id) + "/payment", body)
        except OutcomeUnknown as unknown:
            # It may have been recorded: read what the broker holds before reporting.
            unknown.view = self._reread(store_id, order_id)
            raise
        return convert({"order": reply["order"], "payment": reply.get("payment")},
                       PaymentResult)

    def get_order_blocking(self, store_id: str, order_id: str) -> OrderView:
        reply = self._call("GET", self._order_path(store_id, order_id))
        return convert({"order": reply.get("order"), "locks": reply.get("locks") or []},
                       OrderView)

    def _reread(self, store_id: str, order_id: str) -> OrderView | None:
        try:
            return self.get_order_blocking(store_id, order_id)
        except NotFound:
            return OrderView(None, [])
        except TablelockError:
            return None

    def _order_path(self, store_id: str, order_id: str) -> str:
        quote = urllib.parse.quote
        return f"/v1/stores/{quote(store_id, safe='')}/orders/{quote(order_id, safe='')}"

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as refused:
            status, raw = refused.code, refused.read()
        except TimeoutError as exc:
            # The request went out and no answer came: it may have been applied.
            raise OutcomeUnknown(f"no answer from {self.base_url} within {self.timeout:g} s"
                                 ) from exc
        except OSError as exc:  # refused, unreachable: nothing was sent
            raise Disconnected(f"cannot reach {self.base_url}: {exc}") from exc
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise Unavailable(f"HTTP {status} without a JSON body from {self.base_url}")
        if status == 200:
            return decoded
        raise error_from(decoded.get("error") or {"code": "UNAVAILABLE",
                                                  "message": f"HTTP {status}"})
