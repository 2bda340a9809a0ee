"""The HTTP API as an OpenAPI 3.1 document, built from the types the routes speak.

    python -m tablelock.openapi > docs/openapi.json

OPERATIONS describes each route of `http.py`: who may call it, its body and its answers.
The JSON schemas come from msgspec, from the same structs the routes decode and encode
(`PaymentBody`, `OrderResult`, `StoreConfig`, `AuditEntry`, ...). tests/test_docs.py fails
when the committed document drifts from the code or a route is not described.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from . import __version__
from .http import DemoTokenBody, PaymentBody
from .model import CONFIG_RANGES, AuditEntry, StoreConfig
from .protocol import OrderResult, PaymentResult
from .rules import ADMIN_ROLES

REF: Final = "#/components/schemas/"


class Health(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct):
    ready: bool


class AuditPage(msgspec.Struct):
    entries: list[AuditEntry]  # newest first


class Handled(msgspec.Struct):
    id: str
    handled: bool


class DemoToken(msgspec.Struct):
    token: str
    store_id: str


class HttpErrorDetail(msgspec.Struct, omit_defaults=True):
    code: str
    message: str  # in the store's locale
    # Only on a 503 UNAVAILABLE whose write may have been applied: read the order first.
    outcome: Literal["unknown"] | None = None


class HttpErrorReply(msgspec.Struct):
    error: HttpErrorDetail


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    summary: str
    # None: no token needed; (): any valid token of the store; else the roles allowed.
    roles: tuple[str, ...] | None
    response: type[msgspec.Struct] | None  # None: not JSON (Prometheus text, a redirect)
    body: str | None = None  # a component name
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, dict[str, Any], str], ...] = ()
    description: str = ""
    redirect: str | None = None  # answered 307 to this location


# Every /v1 route needs a token, and answers 503 when the backend cannot be reached.
_V1_ERRORS: Final = (401, 403, 503)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation("get", "/healthz", "liveness", None, Health),
    Operation("get", "/readyz", "readiness, backend included (503 while draining or when the "
              "backend is unreachable)", None, Readiness, errors=(503,)),
    Operation("get", "/metrics", "Prometheus metrics, text format", None, None),
    Operation("get", "/", "the dashboard page", None, None, redirect="/app/dashboard.html",
              description="The pages (`/app/`) and the browser SDK (`/sdk/`) are static files."),
    Operation("post", "/demo/token", "a token for a page of the demo store (`tablelock demo` "
              "only)", None, DemoToken, body="DemoTokenBody", errors=(400,)),
    Operation("post", "/demo/pay", "the demo's simulated payment provider takes a phone's "
              "payment and records it through the service route (`tablelock demo` only)", (),
              None, errors=(400, 401),
              description="Body `{order_id, version, amount_cents, payment_ref, token}`; "
                          "answered 202 `{payment_ref, status: pending}` at once."),
    Operation("get", "/demo/pay/{ref}", "the outcome of a demo payment (`?wait=1` holds "
              "until it is known; `tablelock demo` only)", (), None, errors=(401, 404),
              description="`{status: pending}`, or `{status: paid|refused|unknown, code?, "
                          "message?}`."),
    Operation("get", "/demo/tables/{table}/feed", "server-sent events naming the orders of "
              "one table, for the demo's H5 pages (`tablelock demo` only; `?token=` of that "
              "table or of a store terminal)", None, None, errors=(401, 403, 503)),
    Operation("get", "/v1/stores/{store}/orders/{order}", "the order and its locks", (),
              OrderResult, errors=(*_V1_ERRORS, 404),
              description="An `h5` token reads only orders of its own table (else 403)."),
    Operation("get", "/v1/stores/{store}/config", "the store config", ADMIN_ROLES["config"],
              StoreConfig, errors=_V1_ERRORS),
    Operation("put", "/v1/stores/{store}/config", "change the store config (partial; publishes "
              "`config.updated`)", ADMIN_ROLES["config"], StoreConfig, body="ConfigPatch",
              errors=(400, *_V1_ERRORS),
              description="Takes a partial flat object of config fields. Unknown fields and "
                          "out-of-range values are refused with 400. Answers the whole "
                          "config. Turning `strong_link` off releases every lock of the store."),
    Operation("post", "/v1/stores/{store}/orders/{order}/payment", "record a payment "
              "(the platform payment service, with the phone's lock token)", ADMIN_ROLES["payment"],
              PaymentResult, body="PaymentBody", errors=(400, *_V1_ERRORS, 404, 409),
              description="The same rules as the WebSocket `payment.complete`. A refusal "
                          "(`LOCK_EXPIRED`, `FENCED`, `STALE_VERSION`, `AMOUNT_MISMATCH`, "
                          "`ORDER_PAID`) is 409 and is written to the audit log as "
                          "`payment.rejected`. A retry with the same `payment_ref` answers "
                          "the same success."),
    Operation("get", "/v1/stores/{store}/audit", "the store's audit log, newest first",
              ADMIN_ROLES["audit"], AuditPage, errors=(400, *_V1_ERRORS),
              query=(("kind", {"type": "string"}, "only entries of this kind, e.g. "
                      "`payment.rejected`"),
                     ("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                "default": 100}, "at most this many entries (clamped)"))),
    Operation("post", "/v1/stores/{store}/audit/{id}/handled", "mark a `payment.rejected` "
              "entry handled", ADMIN_ROLES["audit"], Handled, errors=(*_V1_ERRORS, 404)),
)

_STATUS_TEXT: Final = {400: "bad request or body", 401: "no valid Bearer token",
                       403: "a token of another store, role or table",
                       404: "unknown order or audit entry", 409: "the payment was refused",
                       503: "not ready, or the backend is unavailable"}


def _schemas() -> dict[str, Any]:
    types: list[Any] = [PaymentBody, DemoTokenBody, HttpErrorReply, StoreConfig,
                        *(op.response for op in OPERATIONS if op.response is not None)]
    _, components = msgspec.json.schema_components(types, ref_template=REF + "{name}")
    patch = copy.deepcopy(components["StoreConfig"])
    patch["title"] = "ConfigPatch"
    patch["additionalProperties"] = False
    for name, (low, high) in CONFIG_RANGES.items():
        patch["properties"][name].update(minimum=low, maximum=high)
    for prop in patch["properties"].values():
        prop.pop("default", None)
    components["ConfigPatch"] = patch
    return dict(sorted(components.items()))


def _operation(op: Operation) -> dict[str, Any]:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in ("store", "order", "id") if "{" + name + "}" in op.path]
    params += [{"name": name, "in": "query", "required": False, "schema": schema,
                "description": text} for name, schema, text in op.query]
    responses: dict[str, Any]
    if op.redirect is not None:
        responses = {"307": {"description": f"redirect to {op.redirect}"}}
    elif op.response is None:
        responses = {"200": {"description": "OK", "content": {"text/plain": {
            "schema": {"type": "string"}}}}}
    else:
        responses = {"200": {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": REF + op.response.__name__}}}}}
    for status in op.errors:
        schema = REF + ("Readiness" if op.path == "/readyz" else "HttpErrorReply")
        responses[str(status)] = {"description": _STATUS_TEXT[status], "content": {
            "application/json": {"schema": {"$ref": schema}}}}
    who = ("anyone" if op.roles is None else "any token of the store" if not op.roles
           else "roles: " + ", ".join(op.roles))
    built: dict[str, Any] = {
        "summary": op.summary,
        "description": (op.description + " " if op.description else "") + f"Who: {who}.",
        "x-roles": list(op.roles) if op.roles is not None else None,
        "responses": responses,
    }
    if params:
        built["parameters"] = params
    if op.roles is not None:
        built["security"] = [{"bearer": []}]
    if op.body is not None:
        built["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": REF + op.body}}}}
    return built


def build() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tablelock HTTP API",
            "version": f"1 (broker {__version__})",
            "description": "HTTP routes of the tablelock order-lock broker. Error messages are "
                           "in the store's locale. See docs/protocol.md, section 8.",
        },
        "servers": [{"url": "http://localhost:8080"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"}},
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
