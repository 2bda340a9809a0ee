"""Narrow seams: no SDK module reaches into another module's `_underscore` members, and no demo
page compares a role name (it asks the capability table, the SDK's generated constants).

The browser SDK's modules meet through public members and the symbols of
client_sdk/js/internal.js; a module's `_underscore` members are its own. The Python SDK's
modules likewise: a `_member` is used only in the module that defines it. Static scans, each
shown to catch the break it looks for.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tablelock_client import constants

ROOT = Path(__file__).resolve().parents[1]
JS_SDK = sorted((ROOT / "client_sdk" / "js").glob("*.js"))
DEMO = sorted((ROOT / "demo" / "static").glob("*.js")) + sorted(
    (ROOT / "demo" / "static").glob("*.html"))
PY_SDK = sorted((ROOT / "client_sdk" / "python" / "tablelock_client").glob("*.py"))

# `x._member`, `x?._member`, `x[...]._member`, `(x)._member`: foreign unless x is `this`.
JS_MEMBER = re.compile(r"((?:[\w$)\]]\??\.)?)([\w$]+|[)\]])\??\.(_[\w$]+)")
JS_BRACKET = re.compile(r"""\[\s*(["'`])(_[\w$]+)\1\s*\]""")
JS_OWN_USE = re.compile(r"\bthis\.(_[\w$]+)")
JS_DEFINED = re.compile(r"\bthis\.(_[\w$]+)\s*(?:=(?!=)|\?\?=)|"
                        r"^\s*(?:(?:async|static|get|set)\s+)*(_[\w$]+)\s*\(", re.M)
ROLE = "|".join(map(re.escape, constants.ROLES))
QUOTED_ROLE = "|".join(rf"{q}(?:{ROLE}){q}" for q in "\"'`")
QUOTED_ROLE = f"(?:{QUOTED_ROLE})"
ROLE_COMPARED = re.compile(rf"(?:[=!]==?\s*{QUOTED_ROLE})|(?:{QUOTED_ROLE}\s*[=!]==?)|"
                           rf"(?:\bcase\s+{QUOTED_ROLE})")


def js_code(text: str) -> str:
    """JS without its comments (prose may name anything); string contents are kept."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"(^|\s)//.*$", r"\1", line) for line in text.splitlines())


def js_reaches(text: str) -> list[str]:
    """The `_members` this module uses on objects other than `this`, or on `this` without
    defining them (inherited from another module's class)."""
    code = js_code(text)
    defined = {a or b for a, b in JS_DEFINED.findall(code)}
    found = [m.group(0)[len(m.group(1)):] for m in JS_MEMBER.finditer(code)
             if m.group(1) or m.group(2) != "this"]
    found += [m.group(0) for m in JS_BRACKET.finditer(code)]
    found += [f"this.{name}" for name in sorted(set(JS_OWN_USE.findall(code)) - defined)]
    return found


def role_comparisons(text: str) -> list[str]:
    return [m.group(0) for m in ROLE_COMPARED.finditer(js_code(text))]


def py_defined(tree: ast.Module) -> set[str]:
    """The `_members` a Python module defines: methods, class attributes, `self._x = ...`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def py_reaches(text: str) -> list[str]:
    """The `_members` this module uses but does not define (another module's)."""
    tree = ast.parse(text)
    defined = py_defined(tree)
    return [f"{ast.unparse(node.value)}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__") and node.attr not in defined]


def test_the_sources_are_found() -> None:
    assert {p.name for p in JS_SDK} >= {"tablelock.js", "client.js", "internal.js", "mirror.js"}
    assert {p.name for p in DEMO} >= {"common.js", "erp.js", "h5.html"}
    assert {p.name for p in PY_SDK} >= {"client.py", "locks.py"}


@pytest.mark.parametrize("path", JS_SDK + DEMO, ids=lambda p: p.name)
def test_no_js_module_reaches_into_another_modules_underscore_members(path: Path) -> None:
    assert not js_reaches(path.read_text()), (
        f"{path.name} uses another module's _members: give that module a public member or a "
        "symbol of client_sdk/js/internal.js")


@pytest.mark.parametrize("path", PY_SDK, ids=lambda p: p.name)
def test_no_python_module_reaches_into_another_modules_underscore_members(path: Path) -> None:
    assert not py_reaches(path.read_text()), (
        f"{path.name} uses another module's _members: give that class a public method")


@pytest.mark.parametrize("path", DEMO, ids=lambda p: p.name)
def test_no_demo_page_compares_a_role_name(path: Path) -> None:
    assert not role_comparisons(path.read_text()), (
        f"{path.name} compares role names: ask the capability table (capability() of the SDK)")


def test_the_js_scan_catches_a_reach() -> None:
    assert js_reaches("this.client._deliver(frame);") == ["client._deliver"]
    assert js_reaches("mine?._end('x');") == ["mine?._end"]
    assert js_reaches("(client)._token;") == [")._token"]
    assert js_reaches("handles[0]._end();") == ["]._end"]
    assert js_reaches('client["_gen"];') == ['["_gen"]']
    # Using a `_member` of `this` that this module never defines: it is inherited.
    assert js_reaches("class A extends B { f() { return this._gen; } }") == ["this._gen"]
    fine = """
      class A { constructor() { this._gen = 0; }
        _tick() { return [...this._gen]; }
        // a comment may say client._gen
        get x() { return this[GENERATION] + this._tick(); } }
      const s = "a._b";
    """
    assert js_reaches(fine) == ["a._b"]  # string contents are not told apart: keep them out
    assert js_reaches(fine.replace('"a._b"', '"ab"')) == []


def test_the_python_scan_catches_a_reach() -> None:
    assert py_reaches("def f(client):\n    client._session.open()\n") == ["client._session"]
    own = ("class A:\n    def __init__(self):\n        self._x = 1\n"
           "    def _y(self):\n        return self._x\n"
           "def f(a):\n    return a._y(), a.__class__\n")
    assert py_reaches(own) == []


def test_the_role_scan_catches_a_comparison() -> None:
    assert role_comparisons('if (who.role === "h5") x();') == ['=== "h5"']
    assert role_comparisons("const m = 'erp_main' == role;") == ["'erp_main' =="]
    assert role_comparisons("switch (r) { case `manager`: }") == ["case `manager`"]
    assert role_comparisons('tokenSource({ role: "manager" }); // role === "h5"') == []
