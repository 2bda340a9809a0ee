"""The tables of docs/protocol.md, drawn from the code that enforces them.

    python -m tablelock.docgen            # rewrite the generated blocks of docs/protocol.md
    python -m tablelock.docgen --check    # exit 1 when they are stale

A generated block is `<!-- generated:NAME -->` ... `<!-- /generated:NAME -->`, and NAME is
one of RENDERERS. The lock table, the role capability table, the store config, the prompts
and the close codes are read from the modules that hold them, so the rendering says what the
code does, whoever changes it. The words that
explain a code or an event live here, and rendering fails when the code has a name they miss.
tests/test_docs.py keeps the committed page and the code in step.
"""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Final

from . import openapi, prompts, rules
from .model import CONFIG_RANGES, LOCK_KINDS, Action, StoreConfig
from .protocol import CLOSE_CODES, EVENT_NAMES, RELEASE_REASONS

DOC_PATH: Final = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
BLOCK: Final = re.compile(
    r"(?P<open><!-- generated:(?P<name>[\w-]+) -->\n).*?(?P<close><!-- /generated:(?P=name) -->)",
    re.S)
ROLES: Final = rules.ROLES


class DocError(Exception):
    """The code names something the docs have no words for, or a block is unknown."""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _words(docs: dict[str, str], names: typing.Iterable[str], what: str) -> dict[str, str]:
    missing = [name for name in names if name not in docs]
    if missing:
        raise DocError(f"docgen has no words for {what}: {', '.join(missing)}")
    return docs


# --- the lock table ------------------------------------------------------------------

ACTION_LABELS: Final = {
    "edit": "take the order lock (edit the cart)",
    "add_items": "add items (`order.publish`, `change: add_items`)",
    "modify": "modify the order (`order.publish`, `change: modify` or `status`)",
    "pay": "take the payment lock (pay)",
    "presettle": "take the presettle lock (print the pre-bill)",
    "accept": "accept a scanned order (`check`, `action: accept`)",
}


def lock_table() -> str:
    labels = _words(ACTION_LABELS, rules.LOCK_TABLE, "lock table actions")
    header = ["attempt \\ held by another terminal", *(f"{kind} lock" for kind in LOCK_KINDS)]
    rows = []
    for action, row in rules.LOCK_TABLE.items():
        cells = []
        for kind in LOCK_KINDS:
            cell = row[kind]
            if cell is None:
                cells.append("allowed")
            else:
                force = "may force" if cell.can_force else "no force"
                cells.append(f"`{cell.code}`, {force}")
        rows.append([f"`{action}`: {labels[action]}", *cells])
    return _table(header, rows)


# --- what each role may do: the capability table -------------------------------------------

def _yes(flag: bool) -> str:
    return "yes" if flag else "—"


CAPABILITY_ROWS: Final[tuple[tuple[str, Callable[[rules.Capability], str]], ...]] = (
    *((f"`lock.acquire`, `lock.release` kind `{kind}`",
       lambda cap, kind=kind: _yes(kind in cap.lock_kinds)) for kind in LOCK_KINDS),
    ("`force: true` (acquire, publish, release)", lambda cap: _yes(cap.force)),
    ("`lock.renew` (re-acquiring renews too)", lambda cap: _yes(cap.renew)),
    ("`order.publish`", lambda cap: _yes(cap.publish)),
    ("`payment.complete`", lambda cap: _yes(cap.record_payment)),
    ("subscribe to `store:<store>`", lambda cap: _yes(cap.store_channel)),
    ("`order_authority: true` in `hello`", lambda cap: _yes(cap.order_authority)),
    ("only its own table's orders and events", lambda cap: _yes(cap.table_scoped)),
    ("its locks outlive its last connection by `disconnect_grace_ms`",
     lambda cap: _yes(cap.disconnect_grace)),
    ("its locks live for", lambda cap: f"`{cap.lock_ttl}`" if cap.lock_kinds else "—"),
    ("a lock waits for the ERP's latest order (strong link)",
     lambda cap: _yes(cap.pulls_order)),
)


def role_table() -> str:
    """rules.CAPABILITIES, one column per role; `check` rows from rules.actions_of."""
    rows = [[label, *(cell(rules.capability(role)) for role in ROLES)]
            for label, cell in CAPABILITY_ROWS]
    rows += [[f"`check` action `{action}`",
              *(_yes(action in rules.actions_of(role)) for role in ROLES)]
             for action in typing.get_args(Action)]
    return _table(["request", *(f"`{role}`" for role in ROLES)], rows)


# --- error codes and prompts -----------------------------------------------------------------

CODE_MEANINGS: Final = {
    "ORDER_LOCKED": "another terminal holds the order lock: a cart is being edited at an ERP",
    "PAYMENT_LOCKED": "another terminal holds the payment lock: someone is paying",
    "PRESETTLE_LOCKED": "another terminal holds the presettle lock: the pre-bill is printed "
                        "and the order is frozen",
    "ACCEPT_BLOCKED": "`accept` is refused while the order is being paid or pre-billed",
    "ERP_UNAVAILABLE": "the broker could not pull the order from the ERP (no order authority "
                       "online, no answer within `erp_fetch_timeout_ms`, or an error); "
                       "nothing changed",
    "LOCK_EXPIRED": "the token's own lock lapsed and nobody has taken that kind since",
    "STALE_VERSION": "a publish whose `version` does not grow, or a payment at a version "
                     "other than the order's",
    "ORDER_PAID": "the order is paid or closed: no more locks, changes or payments",
    "AMOUNT_MISMATCH": "`amount_cents` differs from the order's amount",
    "FENCED": "the token is not the current lock's: another terminal took over (or no token "
              "was sent under strong link)",
    "NOT_HOLDER": "release or renew of a lock the terminal does not hold, or of a kind "
                  "nobody holds",
    "FORBIDDEN": "the role may not do this, or the order, channel or store is not the "
                 "terminal's (see Role permissions)",
    "AUTH_FAILED": "the token is invalid, expired or of another store; or `token.refresh` "
                   "names another terminal",
    "BAD_REQUEST": "the frame or body does not decode into a known request with fields of the "
                   "right types and values",
    "UNSUPPORTED_PROTOCOL": "`hello` asked for a protocol other than 1",
    "RATE_LIMITED": "the connection passed its request rate; the request was not run",
    "NOT_FOUND": "the broker has never seen this order (or, over HTTP, this audit entry)",
    "LIMIT_REACHED": "a connection or subscription limit is reached",
    "UNAVAILABLE": "the backend cannot be reached and nothing changed; or, with "
                   "`\"outcome\": \"unknown\"`, the write's fate could not be learnt in 5 s",
}

# When a code has several prompts, which one a client sees.
VARIANT_NOTES: Final = {
    ("PAYMENT_LOCKED", ""): "to an ERP or manager",
    ("PAYMENT_LOCKED", rules.PHONE_PROMPT): "to a phone (`h5`)",
    ("ACCEPT_BLOCKED", ""): "a payment lock is held",
    ("ACCEPT_BLOCKED", "presettle"): "only a presettle lock is held",
}


def _forceable_codes() -> set[str]:
    return {cell.code for row in rules.LOCK_TABLE.values() for cell in row.values()
            if cell is not None and cell.can_force}


def error_table() -> str:
    entries = prompts.PROMPTS
    meanings = _words(CODE_MEANINGS, (code for code, _ in entries), "error codes")
    forceable = _forceable_codes()
    forcers = ", ".join(f"`{role}`" for role in ROLES if rules.capability(role).force)
    rows = []
    for (code, variant), (zh, en) in entries.items():
        note = VARIANT_NOTES.get((code, variant), variant)
        meaning = meanings[code] + (f"; {note}" if note else "")
        phone = variant == rules.PHONE_PROMPT  # a phone may never force
        can_force = f"yes, to {forcers}" if code in forceable and not phone else "no"
        rows.append([f"`{code}`", meaning, can_force, zh, en])
    return _table(["code", "meaning", "`can_force`", "zh-CN", "en"], rows)


# --- events, reasons, close codes, config -------------------------------------------------------

EVENT_DOCS: Final = {
    "lock.acquired": "`lock` | a lock was granted",
    "lock.released": "`lock`, `reason` | a lock ended other than by expiry or force",
    "lock.expired": "`lock` | an unrenewed lock reached its `expires_at`",
    "lock.forced": "`lock` (the revoked one), `by` (terminal) | another terminal revoked it",
    "lock.contended": "`lock`, `by` (terminal), `action` | direct, to the holder alone: "
                      "someone was refused because of its lock",
    "order.updated": "`order` | the broker's copy of the order changed (publish or pull)",
    "order.paid": "`order`, `payment: {token, amount_cents, payment_ref, by}` | "
                  "`payment.complete` succeeded",
    "terminal.online": "`terminal` | store channel only: a terminal's first connection opened",
    "terminal.offline": "`terminal` | store channel only: a terminal's last connection closed",
    "config.updated": "`config` | store channel only: the store config changed",
}

REASON_DOCS: Final = {
    "released": "the holder released it, or strong link was turned off, or the order was "
                "closed",
    "upgraded": "the holder of the order lock took the payment lock",
    "paid": "the order was paid",
    "holder_disconnected": "the holder's last connection stayed closed for "
                           "`disconnect_grace_ms`",
}

CONFIG_DOCS: Final = {
    "strong_link": "locks are enforced; off: acquires answer `\"enforced\": false` and store "
                   "nothing",
    "h5_payment_lock_ttl_ms": "life of a phone's payment lock (never renewed)",
    "erp_lock_ttl_ms": "life of an ERP or manager lock from its grant or last renewal",
    "disconnect_grace_ms": "how long an ERP or manager holder's locks outlive its last "
                           "connection",
    "erp_fetch_timeout_ms": "how long the broker waits for an `order.fetch` answer",
    "locale": "language of the messages: `zh-CN` or `en` (a `hello` may choose its own)",
    "order_retention_ms": "how long paid and closed orders are kept",
}


def events_table() -> str:
    docs = _words(EVENT_DOCS, EVENT_NAMES, "events")
    rows = [[f"`{name}`", *docs[name].split(" | ")] for name in EVENT_NAMES]
    return _table(["event", "data", "when"], rows)


def reasons_table() -> str:
    docs = _words(REASON_DOCS, RELEASE_REASONS, "release reasons")
    return _table(["`reason`", "meaning"], [[f"`{r}`", docs[r]] for r in RELEASE_REASONS])


def close_codes_table() -> str:
    return _table(["code", "meaning"], [[str(int(code)), text] for code, text in
                                        sorted(CLOSE_CODES.items())])


def config_table() -> str:
    defaults = StoreConfig()
    docs = _words(CONFIG_DOCS, StoreConfig.__struct_fields__, "config fields")
    rows = []
    for name in StoreConfig.__struct_fields__:
        default = getattr(defaults, name)
        low_high = CONFIG_RANGES.get(name)
        shown = str(default).lower() if isinstance(default, bool) else f"`{default}`"
        rows.append([f"`{name}`", shown, f"{low_high[0]}..{low_high[1]}" if low_high else "",
                     docs[name]])
    return _table(["field", "default", "range", "meaning"], rows)


def http_routes_table() -> str:
    rows = []
    for op in openapi.OPERATIONS:
        who = "anyone" if op.roles is None else (
            "any token of the store" if not op.roles else ", ".join(f"`{r}`" for r in op.roles))
        rows.append([f"`{op.method.upper()} {op.path}`", who, op.summary])
    return _table(["route", "who", "what"], rows)


RENDERERS: Final[dict[str, Callable[[], str]]] = {
    "lock-table": lock_table,
    "roles": role_table,
    "errors": error_table,
    "events": events_table,
    "reasons": reasons_table,
    "close-codes": close_codes_table,
    "config": config_table,
    "http-routes": http_routes_table,
}


def render(text: str) -> str:
    """`text` with every generated block redrawn from the code."""
    found: set[str] = set()

    def redraw(match: re.Match[str]) -> str:
        name = match["name"]
        renderer = RENDERERS.get(name)
        if renderer is None:
            raise DocError(f"unknown generated block {name!r}")
        found.add(name)
        return match["open"] + renderer() + match["close"]

    result = BLOCK.sub(redraw, text)
    missing = sorted(set(RENDERERS) - found)
    if missing:
        raise DocError(f"docs/protocol.md lacks the generated blocks {', '.join(missing)}")
    return result


def main(argv: list[str]) -> int:
    current = DOC_PATH.read_text()
    fresh = render(current)
    if "--check" in argv:
        if fresh != current:
            print("docs/protocol.md is stale: run `python -m tablelock.docgen`", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
