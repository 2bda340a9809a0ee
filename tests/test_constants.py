"""The SDKs' generated constants (docs/constants.json, client_sdk/js/constants.js,
tablelock_client/constants.py) are what the broker's code says, and say it alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tablelock_client.constants as python_sdk
from tablelock import constants, rules
from tablelock.model import StoreConfig
from tablelock.prompts import ERROR_CODES, prompt
from tablelock.protocol import Close


def test_the_generated_files_are_fresh() -> None:
    for path, text in constants.rendered().items():
        assert path.read_text() == text, (
            f"{path.name} is stale: run `python -m tablelock.constants`")


def test_the_three_files_hold_the_same_values() -> None:
    data = json.loads((constants.ROOT / "docs" / "constants.json").read_text())
    assert {name: getattr(python_sdk, name.upper()) for name in data} == data
    js = (constants.ROOT / "client_sdk" / "js" / "constants.js").read_text()
    assert js.startswith(f"// {constants.HEADER}\n")
    for name, value in data.items():
        literal = json.dumps(value, ensure_ascii=False, indent=2)
        assert f"export const {name.upper()} = {literal};" in js


def test_the_values_are_the_code_s() -> None:
    data = constants.constants()
    assert data["roles"] == list(rules.ROLES)
    for role, cap in rules.CAPABILITIES.items():
        generated = data["capabilities"][role]
        assert generated["lock_kinds"] == list(cap.lock_kinds)
        assert generated["force"] is cap.force and generated["renew"] is cap.renew
        assert generated["lock_ttl"] in StoreConfig.__struct_fields__
    assert data["close"]["NO_HELLO"] == Close.NO_HELLO == 4001
    assert data["close_codes"]["4010"] == "slow consumer"
    assert set(data["error_codes"]) == ERROR_CODES
    assert data["config_defaults"]["h5_payment_lock_ttl_ms"] == StoreConfig().h5_payment_lock_ttl_ms
    assert data["prompts"]["PAYMENT_LOCKED"]["h5"]["en"] == prompt("PAYMENT_LOCKED", "en", "h5")
    assert data["lost_lock_reasons"] == ["released", "upgraded", "paid", "holder_disconnected",
                                         "expired", "forced", "gone"]


def test_check_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "ROOT", tmp_path)
    for relative in constants.TARGETS:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    assert constants.main([]) == 0
    assert constants.main(["--check"]) == 0
    (tmp_path / "docs" / "constants.json").write_text("{}\n")
    assert constants.main(["--check"]) == 1
