"""docs/asyncapi.json is generated from the wire types, and real frames obey it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tablelock import schema
from tablelock.prompts import ERROR_CODES
from tablelock.protocol import CLOSE_CODES, EVENT_NAMES, RELEASE_REASONS

from .conftest import Store

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"


def test_committed_schema_matches_the_code() -> None:
    assert DOC_PATH.read_text() == schema.render(), (
        "docs/asyncapi.json is stale: run `python -m tablelock.schema > docs/asyncapi.json`")


def validator(message: str) -> jsonschema.Draft202012Validator:
    doc = json.loads(DOC_PATH.read_text())
    payload = doc["components"]["messages"][message]["payload"]
    return jsonschema.Draft202012Validator({**payload, "components": doc["components"]})


def check(message: str, frame: dict[str, Any]) -> None:
    errors = sorted(validator(message).iter_errors(frame), key=str)
    assert not errors, f"{message}: {errors[0].message} in {frame}"


async def test_live_frames_obey_the_schema(store: Store) -> None:
    erp = await store.erp("erp-1")
    check("hello_reply", erp.hello)
    published = await store.publish(erp, order_id="o1")
    check("order_publish_reply", published)
    sub = await erp.request("subscribe", channel=f"order:{store.store_id}:o1")
    check("subscribe_reply", sub)
    store_sub = await erp.request("subscribe", channel=f"store:{store.store_id}", since=0)
    check("subscribe_reply", store_sub)
    acquired = await erp.request("lock.acquire", order_id="o1", kind="payment")
    check("lock_acquire_reply", acquired)
    check("event", await erp.event("lock.acquired"))
    check("check_reply", await erp.request("check", order_id="o1", action="accept"))
    check("lock_renew_reply", await erp.request("lock.renew", order_id="o1", kind="payment",
                                                token=acquired["lock"]["token"]))
    h5 = await store.connect("h5", "phone-1", table="t1")
    refused = await h5.request("lock.acquire", order_id="o1", kind="payment")
    check("error", refused)
    paid = await erp.request("payment.complete", order_id="o1", token=acquired["lock"]["token"],
                             version=1, amount_cents=1000, payment_ref="ref-1")
    check("payment_complete_reply", paid)
    check("event", await erp.event("order.paid"))
    check("order_get_reply", await erp.request("order.get", order_id="o1"))
    check("ping_reply", await erp.request("ping"))
    check("unsubscribe_reply", await erp.request("unsubscribe", channel=f"store:{store.store_id}"))


def test_every_request_has_a_message() -> None:
    doc = schema.build()
    for request in schema.request_types():
        tag = request.__struct_config__.tag
        assert isinstance(tag, str)
        name = tag.replace(".", "_")
        assert f"{name}_request" in doc["components"]["messages"]
        assert f"{name}_reply" in doc["components"]["messages"]


def test_enumerations_are_listed_and_used() -> None:
    """A client generated from the document knows every event, reason, code and close code."""
    schemas = json.loads(DOC_PATH.read_text())["components"]["schemas"]
    assert schemas["EventName"]["enum"] == list(EVENT_NAMES)
    assert schemas["ReleaseReason"]["enum"] == list(RELEASE_REASONS)
    assert set(schemas["ErrorCode"]["enum"]) == ERROR_CODES
    assert [c["const"] for c in schemas["CloseCode"]["oneOf"]] == sorted(CLOSE_CODES)
    event = schemas["EventFrame"]["properties"]
    assert event["event"] == {"$ref": "#/components/schemas/EventName"}
    assert {"$ref": "#/components/schemas/ReleaseReason"} in event["reason"]["anyOf"]
    assert schemas["ErrorBody"]["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}
    check("event", {"type": "event", "event": "lock.released", "ts": 1, "reason": "paid"})
    with pytest.raises(AssertionError):
        check("event", {"type": "event", "event": "lock.vanished", "ts": 1})
    with pytest.raises(AssertionError):
        check("error", {"id": 1, "ok": False, "error": {"code": "OOPS", "message": ""}})
