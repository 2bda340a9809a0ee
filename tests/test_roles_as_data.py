"""Roles are data: outside rules.py (the capability table), model.py (the Role type) and
auth.py (the token's claims), the server package never names a role. Every other layer
asks `rules` what a role may do, so a role's rights are written once."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

from tablelock import rules
from tablelock.model import Order, OrderRecord, Role, StoreConfig, Terminal
from tablelock.rules import CAPABILITIES

PACKAGE = Path(__file__).resolve().parent.parent / "server" / "tablelock"
ALLOWED = {"rules.py", "model.py", "auth.py"}
ROLES = frozenset(CAPABILITIES)
# A role quoted inside a longer string: Lua scripts comparing ARGV to 'h5', say.
QUOTED = re.compile("['\"](" + "|".join(sorted(ROLES)) + ")['\"]")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (a statement of a lone string)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def role_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant that is, or quotes, a role name."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docs
                and (node.value in ROLES or QUOTED.search(node.value))):
            found.append((node.lineno, node.value[:60]))
    return sorted(found)


def test_no_role_is_named_outside_the_table() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ALLOWED and path.parent == PACKAGE:
            continue
        found = role_literals(path.read_text())
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, offenders


def test_the_scan_sees_values_and_lua_but_not_prose() -> None:
    source = '''
"""A module about the h5 role and "erp_main"."""
# a comment naming "manager"
def f(role):
    """Only for 'service'."""
    return role == "h5"
SCRIPT = "if ARGV[5] ~= 'h5' then return 1 end"
TEXT = "an h5 terminal"
'''
    assert [line for line, _ in role_literals(source)] == [6, 7]


def test_every_role_has_a_capability() -> None:
    assert {"erp_main", "erp_secondary", "manager", "h5", "service"} == ROLES


# --- the core answers what the table says ------------------------------------------------------

def _forbidden(role: Role, command: rules.Command) -> bool:
    """Does the core refuse `command` by `role` as FORBIDDEN, on an open order of the role's
    own table that nobody has locked?"""
    record = OrderRecord("s1", "o1", Order("o1", "t1", 1, 1000), fence=1)
    actor = Terminal("probe", role, "probe", "s1", "t1")
    out = rules.step(record, command, rules.Context(now=1_000_000, config=StoreConfig(),
                                                    actor=actor))
    refusal = out.refusal
    if isinstance(out.result, rules.Checked):
        refusal = out.result.refusal
    return refusal is not None and refusal.code == "FORBIDDEN"


def test_the_core_refuses_what_the_table_denies() -> None:
    newer = Order("o1", "t1", 2, 1000)
    for role, cap in CAPABILITIES.items():
        for kind in ("order", "payment", "presettle"):
            assert _forbidden(role, rules.Acquire(kind)) is (kind not in cap.lock_kinds)
        assert _forbidden(role, rules.Acquire("payment", force=True)) is not cap.force
        assert _forbidden(role, rules.Renew("payment", 1)) is not cap.renew
        assert _forbidden(role, rules.Publish(newer, "modify")) is not cap.publish
        assert _forbidden(role, rules.Complete(1, 1, 1000, "ref")) is not cap.record_payment
        for action in typing.get_args(rules.Action):
            assert _forbidden(role, rules.Check(action)) is (action not in rules.actions_of(role))
