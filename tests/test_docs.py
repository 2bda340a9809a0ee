"""The docs say what the code does, and stand alone in the repository.

- docs/protocol.md's generated tables equal what `tablelock.docgen` draws from the code;
- docs/openapi.json equals what `tablelock.openapi` builds, describes every route of
  `http.py`, and real answers of a real broker obey it, roles included;
- every event, release reason and close code the code uses is listed in `protocol.py`;
- every relative link of the repository's Markdown resolves inside the repository, anchors
  included, and nothing points at the spec folder outside it.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
from starlette.routing import Route

from tablelock import docgen, openapi
from tablelock.http import http_routes, page_routes
from tablelock.protocol import CLOSE_CODES, CLOSE_NAMES, EVENT_NAMES, RELEASE_REASONS, Close

from .conftest import Store
from .support import ahttp, unique

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server" / "tablelock"
OPENAPI_PATH = ROOT / "docs" / "openapi.json"


# --- generated renderings ----------------------------------------------------------------

def test_protocol_tables_match_the_code() -> None:
    text = docgen.DOC_PATH.read_text()
    assert text == docgen.render(text), (
        "docs/protocol.md is stale: run `python -m tablelock.docgen`")


def test_every_table_has_its_block() -> None:
    text = docgen.DOC_PATH.read_text()
    for name in docgen.RENDERERS:
        assert f"<!-- generated:{name} -->" in text


def test_an_unknown_name_in_the_code_stops_the_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docgen, "EVENT_NAMES", (*EVENT_NAMES, "order.vanished"))
    with pytest.raises(docgen.DocError, match=r"order\.vanished"):
        docgen.events_table()


def test_role_table_is_what_the_core_answers() -> None:
    """Spot checks that the probe reads the core and not a copy of it."""
    table = docgen.role_table()
    row = next(line for line in table.splitlines() if line.startswith("| `order.publish`"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert dict(zip(docgen.ROLES, cells, strict=True)) == {
        "erp_main": "yes", "erp_secondary": "yes", "h5": "—", "manager": "—", "service": "—"}
    force = next(line for line in table.splitlines() if "`force: true`" in line)
    assert "— |" in force and force.count("yes") == 3


# --- the machine-readable documents ------------------------------------------------------------

def test_committed_openapi_matches_the_code() -> None:
    assert OPENAPI_PATH.read_text() == openapi.render(), (
        "docs/openapi.json is stale: run `python -m tablelock.openapi > docs/openapi.json`")


def test_every_http_route_is_described() -> None:
    """Every route of `http.py`, the demo's included; mounts of static files are not routes."""
    routes = [*http_routes(cast(Any, None), cast(Any, None)),
              *page_routes(cast(Any, None), demo_store="demo")]
    served = {(method.lower(), route.path) for route in routes if isinstance(route, Route)
              for method in (route.methods or ()) if method != "HEAD"}
    described = {(op.method, op.path) for op in openapi.OPERATIONS}
    assert served == described


def _source_files() -> list[Path]:
    return sorted(SERVER.rglob("*.py"))


def test_every_event_in_the_code_is_listed() -> None:
    emitted = set()
    pattern = re.compile(r'(?:Event\(|_emit\([^"\n]*|"event":|\'"event":")"([a-z]+\.[a-z_]+)"')
    for path in _source_files():
        emitted |= set(pattern.findall(path.read_text()))
    assert emitted, "the scan found no event: the pattern is stale"
    assert emitted <= set(EVENT_NAMES), emitted - set(EVENT_NAMES)


def test_every_release_reason_in_the_code_is_listed() -> None:
    rules_text = (SERVER / "rules.py").read_text()
    reasons = set(re.findall(r'reason="(\w+)"', rules_text))
    for call in re.findall(r"_release_all\(([^)]*)\)", rules_text):
        reasons |= set(re.findall(r'"(\w+)"', call))
    reasons |= set(re.findall(r'return [^\n]*, "(holder_\w+)"', rules_text))
    assert {"upgraded", "paid", "released", "holder_disconnected"} <= reasons
    assert reasons <= set(RELEASE_REASONS), reasons - set(RELEASE_REASONS)


def test_close_codes_are_written_only_in_protocol() -> None:
    """Every close the broker sends names a `protocol.Close`; no other file spells a code."""
    patterns = (r"CLOSE_\w+ = (\d{4})\b", r"\.close\((\d{4})\b", r'"code": (\d{4})\b')
    spelled = {}
    for path in _source_files():
        if path.name == "protocol.py":
            continue
        text = path.read_text()
        for pattern in patterns:
            spelled.update({code: path.name for code in re.findall(pattern, text)})
    assert not spelled, spelled
    assert set(Close) == set(CLOSE_CODES) == set(CLOSE_NAMES)


# --- real HTTP answers obey the OpenAPI document ------------------------------------------------

@cache
def _document() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(OPENAPI_PATH.read_text()))


def _obeys(method: str, path: str, status: int, body: Any) -> None:
    doc = _document()
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, undocumented: {body}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {errors[0].message} in {body}"


def _body_obeys(component: str, body: Any) -> None:
    doc = _document()
    schema = {"$ref": "#/components/schemas/" + component, "components": doc["components"]}
    assert jsonschema.Draft202012Validator(schema).is_valid(body), body


async def test_http_answers_obey_the_document(store: Store) -> None:
    erp = await store.erp()
    await store.publish(erp, order_id="o1", table_id="t1")
    orders = "/v1/stores/{store}/orders/{order}"
    config = "/v1/stores/{store}/config"
    payment = "/v1/stores/{store}/orders/{order}/payment"
    audit = "/v1/stores/{store}/audit"
    handled = "/v1/stores/{store}/audit/{id}/handled"

    _obeys("get", orders, *await store.http("GET", "/orders/o1", role="erp_main"))
    _obeys("get", orders, *await store.http("GET", "/orders/nowhere", role="erp_main"))
    _obeys("get", orders, *await store.http("GET", "/orders/o1", role="h5", token=store.token(
        "h5", table="t9")))
    _obeys("get", config, *await store.http("GET", "/config"))
    patch = {"h5_payment_lock_ttl_ms": 20_000}
    _body_obeys("ConfigPatch", patch)
    _obeys("put", config, *await store.http("PUT", "/config", body=patch))
    bad = {"h5_payment_lock_ttl_ms": 1}
    assert not jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/ConfigPatch", "components": _document()["components"]}
    ).is_valid(bad)
    status, body = await store.http("PUT", "/config", body=bad)
    assert status == 400
    _obeys("put", config, status, body)

    lock = await erp.request("lock.acquire", order_id="o1", kind="payment")
    paid = {"token": lock["lock"]["token"] - 1, "version": 1, "amount_cents": 1000,
            "payment_ref": unique("ref")}
    _body_obeys("PaymentBody", paid)
    status, body = await store.http("POST", "/orders/o1/payment", role="service", body=paid)
    assert status == 409
    _obeys("post", payment, status, body)
    status, body = await store.http("POST", "/orders/o1/payment", role="service",
                                    body={**paid, "token": lock["lock"]["token"]})
    assert status == 200
    _obeys("post", payment, status, body)

    status, body = await store.http("GET", "/audit?kind=payment.rejected&limit=5")
    _obeys("get", audit, status, body)
    entry_id = body["entries"][0]["id"]
    _obeys("post", handled, *await store.http("POST", f"/audit/{entry_id}/handled"))
    _obeys("post", handled, *await store.http("POST", "/audit/404404/handled"))
    _obeys("get", audit, *await store.http("GET", "/audit", role=None))

    for path in ("/healthz", "/readyz"):
        _obeys("get", path, *await ahttp("GET", store.broker.http + path))


async def test_roles_in_the_document_are_the_ones_let_in(store: Store) -> None:
    """Each route's `x-roles`: a listed role passes the door, any other gets 403."""
    erp = await store.erp()
    await store.publish(erp, order_id="o1", table_id="t1")
    concrete = {"{store}": store.store_id, "{order}": "o1", "{id}": "1"}
    for op in openapi.OPERATIONS:
        if not op.roles:
            continue
        path = op.path
        for placeholder, value in concrete.items():
            path = path.replace(placeholder, value)
        sub_path = path.removeprefix(f"/v1/stores/{store.store_id}")
        body = {} if op.method in ("put", "post") else None
        for role in docgen.ROLES:
            table = "t1" if role == "h5" else None
            status, answer = await store.http(op.method.upper(), sub_path, body=body,
                                              token=store.token(role, table=table))
            if role in op.roles:
                assert status != 403, (op.path, role, answer)
            else:
                assert status == 403, (op.path, role, status, answer)


# --- the repository's Markdown stands alone -----------------------------------------------------

def _tracked(pattern: str) -> list[Path]:
    names = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return [ROOT / name for name in names]


FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """Markdown without code: links written inside code are examples, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens,
    repeated headings numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text()
    broken = []
    for target in LINK.findall(_prose(text)) + REFERENCE.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(root) or not resolved.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{target} (no such heading)")
    return broken


def test_markdown_links_resolve_inside_the_repository() -> None:
    files = _tracked("*.md")
    assert ROOT / "README.md" in files
    broken = {str(path.relative_to(ROOT)): links for path in files
              if (links := broken_links(path))}
    assert not broken


def test_nothing_points_outside_the_repository() -> None:
    outside = (b"../" + b"shared", b"/work/" + b"shared")  # split, so this file is no offender
    offenders = [str(path.relative_to(ROOT)) for path in _tracked("*")
                 if path.is_file() and any(word in path.read_bytes() for word in outside)]
    assert not offenders


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = ROOT / "docs" / "protocol.md"
    assert {"1-concepts", "close-codes", "51-hello"} <= anchors(page.read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "protocol.md").write_text(page.read_text())
    probe = tmp_path / "docs" / "probe.md"
    probe.write_text("[a](protocol.md#no-such-heading) [b](../../elsewhere.md) "
                     "[c](protocol.md#2-the-lock-rules) `[d](nowhere.md)`\n"
                     "```\n[e](nowhere.md)\n```\n[f]: ../README.md\n")
    assert broken_links(probe, tmp_path) == [
        "protocol.md#no-such-heading (no such heading)",
        "../../elsewhere.md (no such file in the repository)",
        "../README.md (no such file in the repository)"]
