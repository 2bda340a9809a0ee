"""Both SDKs take roles, close codes, prompts and lost-lock reasons from their generated
constants modules, and carry no copy of their own.

The constants (client_sdk/js/constants.js, client_sdk/python/tablelock_client/constants.py)
are generated from the broker (`python -m tablelock.constants`). Everywhere else in the SDK
sources a role name in quotes, a close code written as a number or a prompt's text is a
copied rule that would drift: these tests fail on it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tablelock_client import ERRORS, constants, locks

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "client_sdk" / "js"
PY_DIR = ROOT / "client_sdk" / "python" / "tablelock_client"
JS_SOURCES = sorted(p for p in JS_DIR.glob("*.js") if p.name != "constants.js")
PY_SOURCES = sorted(p for p in PY_DIR.glob("*.py") if p.name != "constants.py")
# The broker's own close codes (4001..4010); 4000 is the code a client closes with itself.
BROKER_CLOSE_CODE = re.compile(r"\b40(?:0[1-9]|10)\b")
JS_STRING = re.compile(r"""(["'`])((?:\\.|(?!\1).)*)\1""")


def js_code(path: Path) -> str:
    """A JS source without its comments (so that prose may name a role or a code)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines()
                     if not line.lstrip().startswith("//"))


def py_numbers(path: Path) -> str:
    return " ".join(str(node.value) for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and isinstance(node.value, int))


def test_the_sources_are_found() -> None:
    assert {p.name for p in JS_SOURCES} >= {"tablelock.js", "client.js", "lock.js"}
    assert {p.name for p in PY_SOURCES} >= {"client.py", "locks.py", "payments.py"}


@pytest.mark.parametrize("path", JS_SOURCES, ids=lambda p: p.name)
def test_no_js_module_names_a_role(path: Path) -> None:
    quoted = {m.group(2) for m in JS_STRING.finditer(js_code(path))}
    assert not quoted & set(constants.ROLES), (
        f"{path.name} compares role names: ask CAPABILITIES (helpers.capability) instead")


@pytest.mark.parametrize("path", PY_SOURCES, ids=lambda p: p.name)
def test_no_python_module_names_a_role(path: Path) -> None:
    strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & set(constants.ROLES), (
        f"{path.name} compares role names: ask CAPABILITIES (model.capability) instead")


@pytest.mark.parametrize("path", JS_SOURCES + PY_SOURCES, ids=lambda p: p.name)
def test_no_module_writes_a_close_code(path: Path) -> None:
    code = js_code(path) if path.suffix == ".js" else py_numbers(path)
    assert not BROKER_CLOSE_CODE.findall(code), f"{path.name}: use CLOSE from the constants"


@pytest.mark.parametrize("path", JS_SOURCES + PY_SOURCES, ids=lambda p: p.name)
def test_no_module_copies_a_prompt(path: Path) -> None:
    text = path.read_text()
    for code, variants in constants.PROMPTS.items():
        for variant, texts in variants.items():
            # The zh-CN text whole; the English one by its start (a copy may be split in lines).
            assert texts["zh-CN"] not in text, f"{path.name} copies {code}/{variant}"
            assert texts["en"][:40] not in text, f"{path.name} copies {code}/{variant}"


def test_both_sdks_end_locks_with_the_same_reasons() -> None:
    assert set(locks.GONE.values()) <= set(constants.LOST_LOCK_REASONS)
    js_gone = re.search(r"const GONE = \{(.*?)\}", (JS_DIR / "lock.js").read_text(), re.S)
    assert js_gone is not None
    js_reasons = set(re.findall(r':\s*"(\w+)"', js_gone.group(1)))
    assert js_reasons == set(locks.GONE.values())
    # The words each SDK used before they agreed are gone from both.
    for path in JS_SOURCES + PY_SOURCES:
        code = js_code(path) if path.suffix == ".js" else path.read_text()
        for retired in ("missing", "revoked", "disconnected", "closed"):
            assert not re.search(rf"""(_end|_mark_lost|lost_reason ==)\(?["']{retired}["']""",
                                 code), f"{path.name} ends a lock as {retired!r}"


def test_every_error_code_has_a_python_error_class() -> None:
    assert set(constants.ERROR_CODES) <= set(ERRORS)
