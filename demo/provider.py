"""The demo's payment provider, and the platform's payment service behind it.

A customer's phone never records a payment (PROTOCOL.md section 2): it takes the
payment lock and pays through the payment provider. When the provider confirms,
the platform's payment service records the payment with the phone's lock token,
as role `service`, over HTTP (`POST /v1/stores/{store}/orders/{order}/payment`).

`PaymentProvider.charge` plays both: a short, realistic confirmation delay, then
the service's call. The simulated store's phones use it directly; the H5 page
reaches it through `provider_routes` (`POST /demo/pay`, served by a demo broker
only), and learns the outcome from the broker's `order.paid` push, or, for a
refused payment, from `GET /demo/pay/{payment_ref}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tablelock.auth import AuthError, Tokens

CONFIRM_DELAY_S = (0.8, 1.6)  # the provider's confirmation, at speed 1
SERVICE_TRIES = 3  # a lost answer is asked again, with the same payment_ref
SERVICE_RETRY_S = 1.0
KEPT_OUTCOMES = 1000  # outcomes the page may still ask for (oldest forgotten first)
WAIT_LIMIT_S = 15.0  # the longest `GET /demo/pay/{ref}?wait=1` holds


@dataclass(frozen=True, slots=True)
class Charge:
    """What the phone hands the provider: the order, its lock token, what it pays."""

    store_id: str
    order_id: str
    token: int | None
    version: int
    amount_cents: int
    payment_ref: str


@dataclass(frozen=True, slots=True)
class Settled:
    """`paid` (with the order), `refused` (with the broker's code, to refund), or `unknown`
    (the broker could not be reached: the money is taken, the record is not)."""

    status: str
    order: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None

    def wire(self) -> dict[str, Any]:
        return {k: v for k, v in (("status", self.status), ("order", self.order),
                                  ("code", self.code), ("message", self.message))
                if v is not None}


def post_json(url: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read())
        except ValueError:
            return err.code, None


class PaymentProvider:
    """Confirms a phone's payment, then records it at the broker as the payment service."""

    def __init__(self, http_base: str, tokens: Tokens, *, speed: float = 1.0,
                 rng: random.Random | None = None) -> None:
        self.http_base = http_base.rstrip("/")
        self.tokens = tokens
        self.speed = speed if speed > 0 else 1.0
        self.rng = rng or random.Random()

    async def charge(self, charge: Charge) -> Settled:
        await asyncio.sleep(self.rng.uniform(*CONFIRM_DELAY_S) / self.speed)
        return await self.record(charge)

    async def record(self, charge: Charge) -> Settled:
        """The payment service's call; a lost answer is retried with the same payment_ref,
        which the broker answers with the same success."""
        token = self.tokens.mint(store=charge.store_id, role="service",
                                 sub="demo-payment-service", name="Payment service", ttl_s=300)
        url = f"{self.http_base}/v1/stores/{charge.store_id}/orders/{charge.order_id}/payment"
        body = {"token": charge.token, "version": charge.version,
                "amount_cents": charge.amount_cents, "payment_ref": charge.payment_ref}
        problem = "no answer"
        for attempt in range(SERVICE_TRIES):
            if attempt:
                await asyncio.sleep(SERVICE_RETRY_S / self.speed)
            try:
                status, reply = await asyncio.to_thread(post_json, url, token, body)
            except (OSError, ValueError) as exc:
                problem = str(exc)
                continue
            reply = reply if isinstance(reply, dict) else {}
            error = reply.get("error") or {}
            if status == 200:
                return Settled("paid", order=reply.get("order"))
            if status == 503:  # UNAVAILABLE: nothing changed, or the outcome is unknown
                problem = str(error.get("message") or "UNAVAILABLE")
                continue
            return Settled("refused", code=str(error.get("code") or status),
                           message=error.get("message"))
        return Settled("unknown", code="UNAVAILABLE", message=problem)


class PayBody(msgspec.Struct):
    order_id: str
    version: int
    amount_cents: int
    payment_ref: str
    token: int | None = None


def provider_routes(tokens: Tokens, store_id: str) -> list[BaseRoute]:
    """`POST /demo/pay` (the phone's token as Bearer; answered 202 at once) and
    `GET /demo/pay/{payment_ref}` (`?wait=1` holds until the outcome is known)."""
    outcomes: OrderedDict[str, Settled | asyncio.Event] = OrderedDict()
    running: set[asyncio.Task[None]] = set()

    def phone(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return "a Bearer token is needed"
        try:
            terminal, _ = tokens.verify(token)
        except AuthError as exc:
            return str(exc)
        return None if terminal.store_id == store_id else "a token of another store"

    def answer(body: dict[str, Any], status: int = 200) -> Response:
        return Response(json.dumps(body), status, media_type="application/json")

    async def settle(charge: Charge, provider: PaymentProvider, done: asyncio.Event) -> None:
        outcomes[charge.payment_ref] = await provider.charge(charge)
        done.set()
        while len(outcomes) > KEPT_OUTCOMES:
            outcomes.popitem(last=False)

    async def pay(request: Request) -> Response:
        if (problem := phone(request)) is not None:
            return answer({"error": {"code": "AUTH_FAILED", "message": problem}}, 401)
        try:
            body = msgspec.json.decode(await request.body(), type=PayBody)
        except msgspec.DecodeError as exc:
            return answer({"error": {"code": "BAD_REQUEST", "message": str(exc)}}, 400)
        if body.payment_ref in outcomes:  # the page asked twice: one charge
            return answer({"payment_ref": body.payment_ref, "status": "pending"}, 202)
        provider = PaymentProvider(str(request.base_url), tokens)
        done = asyncio.Event()
        outcomes[body.payment_ref] = done
        charge = Charge(store_id, body.order_id, body.token, body.version, body.amount_cents,
                        body.payment_ref)
        task = asyncio.create_task(settle(charge, provider, done))
        running.add(task)
        task.add_done_callback(running.discard)
        return answer({"payment_ref": body.payment_ref, "status": "pending"}, 202)

    async def outcome(request: Request) -> Response:
        if (problem := phone(request)) is not None:
            return answer({"error": {"code": "AUTH_FAILED", "message": problem}}, 401)
        found = outcomes.get(request.path_params["ref"])
        if found is None:
            return answer({"error": {"code": "NOT_FOUND", "message": "no such payment"}}, 404)
        if isinstance(found, asyncio.Event) and request.query_params.get("wait"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(found.wait(), WAIT_LIMIT_S)
            found = outcomes.get(request.path_params["ref"], found)
        if isinstance(found, asyncio.Event):
            return answer({"status": "pending"})
        return answer(found.wire())

    return [Route("/demo/pay", pay, methods=["POST"]),
            Route("/demo/pay/{ref}", outcome, methods=["GET"])]
