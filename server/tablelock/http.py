"""The HTTP routes of PROTOCOL.md section 8."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .auth import AuthError, Tokens
from .backends.base import Backend, OutcomeUnknown, Unavailable
from .model import StoreConfig, Terminal
from .prompts import prompt
from .protocol import Identifier, OrderResult, PaymentRef, PaymentResult, SafeInt, Token, encode
from .rules import ADMIN_ROLES, Complete, ConfigError, Paid, Tick, sees_order

# Where no store is known (or its config cannot be read), messages use the default locale.
DEFAULT_LOCALE = StoreConfig().locale


class HttpError(Exception):
    def __init__(self, status: int, code: str, detail: str = "", variant: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.detail = detail
        self.variant = variant


class PaymentBody(msgspec.Struct, forbid_unknown_fields=False):
    """The payment service's body: the same bounds as the WebSocket payment.complete."""

    version: SafeInt
    amount_cents: SafeInt
    payment_ref: PaymentRef
    token: Token | None = None


def json_response(body: Any, status: int = 200) -> Response:
    return Response(encode(body), status, media_type="application/json")


def error_response(status: int, code: str, detail: str = "", locale: str = DEFAULT_LOCALE,
                   variant: str = "", outcome: str | None = None) -> Response:
    message = prompt(code, locale, variant) + (f" ({detail})" if detail else "")
    error = {"code": code, "message": message}
    if outcome is not None:  # a write whose fate is unknown: read the order before acting
        error["outcome"] = outcome
    return json_response({"error": error}, status)


def is_identifier(value: str) -> bool:
    """Whether a path parameter is an id the protocol accepts (protocol.Identifier)."""
    try:
        msgspec.convert(value, Identifier)
    except msgspec.ValidationError:
        return False
    return True


def decode_json(raw: bytes, type_: Any = Any) -> Any:
    """A request body, or 400: malformed, mistyped and too deeply nested alike."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.DecodeError as exc:
        raise HttpError(400, "BAD_REQUEST", str(exc)) from None
    except RecursionError:
        raise HttpError(400, "BAD_REQUEST", "nested too deep") from None


Endpoint = Callable[[Request], Awaitable[Response]]


def http_routes(backend: Backend, tokens: Tokens,
                draining: Callable[[], bool] = lambda: False) -> list[Route]:
    def caller(request: Request, store_id: str, roles: Iterable[str] | None = None) -> Terminal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HttpError(401, "AUTH_FAILED", "a Bearer token is needed")
        try:
            terminal, _ = tokens.verify(token)
        except AuthError as exc:
            raise HttpError(401, "AUTH_FAILED", str(exc)) from None
        if terminal.store_id != store_id:
            raise HttpError(403, "FORBIDDEN", "a token of another store")
        # From here on the store is known: its errors speak its locale (see guarded).
        request.state.store_id = store_id
        if roles is not None and terminal.role not in roles:
            raise HttpError(403, "FORBIDDEN", f"role {terminal.role} may not do this")
        return terminal

    async def locale_of(request: Request) -> str:
        """The locale of the store a caller has shown a token of; the default before that
        (an anonymous caller does not get to make the broker read a store's config)."""
        store_id = getattr(request.state, "store_id", None)
        if store_id is None:
            return DEFAULT_LOCALE
        try:
            return (await backend.get_config(store_id)).locale
        except Unavailable:
            return DEFAULT_LOCALE

    def guarded(endpoint: Endpoint) -> Endpoint:
        async def run(request: Request) -> Response:
            try:
                return await endpoint(request)
            except HttpError as err:
                return error_response(err.status, err.code, err.detail,
                                      await locale_of(request), err.variant)
            except OutcomeUnknown:
                return error_response(503, "UNAVAILABLE", outcome="unknown")
            except Unavailable:
                return error_response(503, "UNAVAILABLE")
        return run

    def order_id_of(request: Request) -> str:
        order_id: str = request.path_params["order"]
        if not is_identifier(order_id):
            raise HttpError(400, "BAD_REQUEST", "order ids are printable and bounded in length")
        return order_id

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # Not ready while draining, so that a load balancer sends newcomers elsewhere.
        ready = not draining() and await backend.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def get_order(request: Request) -> Response:
        store_id = request.path_params["store"]
        terminal = caller(request, store_id)
        order_id = order_id_of(request)
        rec = (await backend.apply(store_id, order_id, Tick(), terminal)).record
        if rec is None:
            raise HttpError(404, "NOT_FOUND")
        if not sees_order(terminal, rec.order):
            raise HttpError(403, "FORBIDDEN", "an order of another table")
        return json_response(OrderResult(rec.order, list(rec.locks.values())))

    async def config(request: Request) -> Response:
        store_id = request.path_params["store"]
        caller(request, store_id, ADMIN_ROLES["config"])
        if request.method == "GET":
            return json_response(await backend.get_config(store_id))
        patch = decode_json(await request.body())
        if not isinstance(patch, dict):
            raise HttpError(400, "BAD_REQUEST", "the body must be a JSON object")
        try:
            return json_response(await backend.update_config(store_id, patch))
        except ConfigError as exc:
            raise HttpError(400, "BAD_REQUEST", str(exc)) from None

    async def payment(request: Request) -> Response:
        store_id = request.path_params["store"]
        terminal = caller(request, store_id, ADMIN_ROLES["payment"])
        order_id = order_id_of(request)
        body: PaymentBody = decode_json(await request.body(), PaymentBody)
        command = Complete(body.token, body.version, body.amount_cents, body.payment_ref)
        out = await backend.apply(store_id, order_id, command, terminal)
        if out.refusal is not None:
            status = 404 if out.refusal.code == "NOT_FOUND" else 409
            raise HttpError(status, out.refusal.code, variant=out.refusal.variant)
        assert isinstance(out.result, Paid)
        return json_response(PaymentResult(out.result.order, out.result.payment))

    async def audit(request: Request) -> Response:
        store_id = request.path_params["store"]
        caller(request, store_id, ADMIN_ROLES["audit"])
        kind = request.query_params.get("kind") or None
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise HttpError(400, "BAD_REQUEST", "limit must be an integer") from None
        limit = max(1, min(limit, 1000))
        return json_response({"entries": await backend.audit(store_id, kind, limit)})

    async def handled(request: Request) -> Response:
        store_id, entry_id = request.path_params["store"], request.path_params["id"]
        caller(request, store_id, ADMIN_ROLES["audit"])
        # An id no backend could have made is simply not found (it never reaches Redis).
        if not is_identifier(entry_id) or not await backend.mark_handled(store_id, entry_id):
            raise HttpError(404, "NOT_FOUND", "no such audit entry")
        return json_response({"id": entry_id, "handled": True})

    return [
        Route("/healthz", guarded(healthz)),
        Route("/readyz", guarded(readyz)),
        Route("/metrics", guarded(metrics)),
        Route("/v1/stores/{store}/orders/{order}", guarded(get_order)),
        Route("/v1/stores/{store}/config", guarded(config), methods=["GET", "PUT"]),
        Route("/v1/stores/{store}/orders/{order}/payment", guarded(payment), methods=["POST"]),
        Route("/v1/stores/{store}/audit", guarded(audit)),
        Route("/v1/stores/{store}/audit/{id}/handled", guarded(handled), methods=["POST"]),
    ]


SDK_DIR = Path(__file__).resolve().parents[2] / "client_sdk" / "js"


class DemoTokenBody(msgspec.Struct):
    role: str
    sub: str
    table: str | None = None
    name: str | None = None


def page_routes(tokens: Tokens, demo_store: str) -> list[BaseRoute]:
    """The dashboard and terminal pages (/app/), the browser SDK (/sdk/), and in demo mode
    only, tokens for the pages of the demo store (a real store's pages bring their own), its
    simulated payment provider and the H5 pages' table feed."""
    from tablelock_demo import STATIC
    from tablelock_demo.provider import provider_routes
    from tablelock_demo.table_feed import table_feed_routes

    routes: list[BaseRoute] = [
        Route("/", lambda request: RedirectResponse("/app/dashboard.html")),
        Mount("/app", StaticFiles(directory=STATIC, html=True)),
    ]
    if SDK_DIR.is_dir():
        routes.append(Mount("/sdk", StaticFiles(directory=SDK_DIR)))
    if not demo_store:
        return routes

    async def demo_token(request: Request) -> Response:
        try:
            body: DemoTokenBody = decode_json(await request.body(), DemoTokenBody)
            token = tokens.mint(store=demo_store, role=body.role, sub=body.sub,
                                table=body.table, name=body.name)
        except HttpError as err:
            return error_response(err.status, err.code, err.detail)
        except ValueError as exc:
            return error_response(400, "BAD_REQUEST", str(exc))
        return json_response({"token": token, "store_id": demo_store})

    routes.append(Route("/demo/token", demo_token, methods=["POST"]))
    routes += provider_routes(tokens, demo_store) + table_feed_routes(tokens, demo_store)
    return routes
