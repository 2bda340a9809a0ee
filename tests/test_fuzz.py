"""Random and mutated frames, at the decoder and at a live connection (hypothesis).

The decoder must answer every frame with a typed message or `BadFrame`, nothing else. A live
broker must answer every frame with a reply or ignore it, keep the connection (a ping after each
batch is answered), keep serving a well-behaved terminal connected before the fuzzing, stay up,
and log no traceback. Deterministic (`derandomize=True`) and bounded in time.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import math
import uuid
from collections.abc import Callable
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tablelock.protocol import BadFrame, ClientMessage, decode

from .conftest import Store
from .support import BrokerProcess, WsClient, mint, order

BrokerFactory = Callable[..., BrokerProcess]
MESSAGE_TYPES = get_args(ClientMessage)
# Nesting the fuzzing stays within; deeper frames are tested on their own below.
FUZZ_DEPTH = 100
KNOWN_CODES = {"BAD_REQUEST", "FORBIDDEN", "NOT_FOUND", "ORDER_PAID", "LOCK_EXPIRED", "FENCED",
               "STALE_VERSION", "AMOUNT_MISMATCH", "ORDER_LOCKED", "PAYMENT_LOCKED",
               "PRESETTLE_LOCKED", "ACCEPT_BLOCKED", "ERP_UNAVAILABLE", "NOT_HOLDER",
               "AUTH_FAILED", "RATE_LIMITED", "LIMIT_REACHED", "UNAVAILABLE"}


def templates(store_id: str, token: str) -> list[dict[str, Any]]:
    """One valid request of each type (and an rpc.result), to be mutated."""
    return [
        {"id": 1, "type": "ping"},
        {"id": 2, "type": "hello", "token": token, "protocol": 1, "locale": "en",
         "client": {"name": "fuzz", "version": "1"}},
        {"id": 3, "type": "token.refresh", "token": token},
        {"id": 4, "type": "subscribe", "channel": f"order:{store_id}:o1", "since": 0},
        {"id": 5, "type": "unsubscribe", "channel": f"order:{store_id}:o1"},
        {"id": "g", "type": "order.get", "order_id": "o1", "fresh": False},
        {"id": 6, "type": "order.publish", "change": "add_items",
         "order": order("o2", version=2, items=[{"sku": "tea", "qty": 2}])},
        {"id": 7, "type": "check", "order_id": "o1", "action": "pay"},
        {"id": 8, "type": "lock.acquire", "order_id": "o1", "kind": "order", "force": False},
        {"id": 9, "type": "lock.renew", "order_id": "o1", "kind": "order", "token": 5},
        {"id": 10, "type": "lock.release", "order_id": "o1", "kind": "payment", "token": 5},
        {"id": 11, "type": "payment.complete", "order_id": "o1", "token": 5, "version": 1,
         "amount_cents": 1000, "payment_ref": "ref-1"},
        {"type": "rpc.result", "rid": "r1", "ok": True, "result": {"order": order("o1")}},
    ]


@functools.cache
def cached_templates(store_id: str, token: str) -> tuple[dict[str, Any], ...]:
    return tuple(templates(store_id, token))


# --- strategies ----------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


def nested(depth: int, as_list: bool) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


MUTATIONS = ("drop", "duplicate", "retype", "huge_int", "deep", "unicode", "nan", "empty",
             "extra", "swap_type", "truncate", "bytes", "as_is")


@st.composite
def mutated(draw: st.DrawFn, store_id: str = "s1", token: str = "t") -> str | bytes:
    """A valid request with one thing wrong with it (or nothing, sometimes)."""
    request = copy.deepcopy(draw(st.sampled_from(cached_templates(store_id, token))))
    how = draw(st.sampled_from(MUTATIONS))
    key = draw(st.sampled_from(sorted(request)))
    inner = request.get("order") if isinstance(request.get("order"), dict) else None
    target, field = (inner, draw(st.sampled_from(sorted(inner)))) if inner and draw(
        st.booleans()) else (request, key)
    if how == "drop":
        del target[field]
    elif how == "retype":
        target[field] = draw(json_values)
    elif how == "huge_int":
        target[field] = draw(st.sampled_from([2**53, 2**53 - 1, 2**63, 2**64, -(2**63) - 1,
                                              10**30, -1, -(10**40)]))
    elif how == "deep":
        target[field] = nested(draw(st.integers(1, FUZZ_DEPTH)), draw(st.booleans()))
    elif how == "unicode":
        target[field] = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40))
    elif how == "nan":
        target[field] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif how == "empty":
        target[field] = draw(st.sampled_from(["", [], {}, None, 0, False]))
    elif how == "extra":
        target[draw(st.text(max_size=10))] = draw(json_values)
    elif how == "swap_type":
        request["type"] = draw(st.sampled_from(
            ["ping", "hello", "token.refresh", "subscribe", "order.publish", "lock.acquire",
             "payment.complete", "rpc.result", "rpc", "event", "", "PING", "lock.*"]))
    text = json.dumps(request, allow_nan=True, ensure_ascii=draw(st.booleans()))
    if how == "duplicate":
        text = f"{text[:-1]}, {json.dumps(key)}: {json.dumps(draw(json_values))}}}"
    elif how == "truncate":
        text = text[:draw(st.integers(0, len(text) - 1))]
    return text.encode() if how == "bytes" else text


def frames(store_id: str = "s1", token: str = "t") -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),
        json_values.map(json.dumps),
        st.dictionaries(st.sampled_from(["id", "type", "token", "order_id", "kind", "channel"]),
                        json_values, max_size=4).map(json.dumps),
        mutated(store_id, token),
        mutated(store_id, token),
    )


# --- the decoder ------------------------------------------------------------------------------

@settings(derandomize=True, database=None, max_examples=600, deadline=None)
@given(frame=frames())
def test_decode_returns_a_message_or_raises_bad_frame(frame: str | bytes) -> None:
    try:
        message = decode(frame)
    except BadFrame as bad:
        assert bad.request_id is None or isinstance(bad.request_id, int | str)
        assert isinstance(bad.detail, str) and bad.detail
        return
    assert isinstance(message, MESSAGE_TYPES), message


def test_every_template_decodes() -> None:
    """The mutations start from valid requests (else the fuzzing would test little)."""
    for request in templates("s1", "t"):
        message = decode(json.dumps(request))
        assert isinstance(message, MESSAGE_TYPES)
        assert message.__struct_config__.tag == request["type"]


DEEP = 3000  # 6 KiB of brackets, far below the 64 KiB frame limit


@pytest.mark.parametrize("where", ["unknown_field", "items", "rpc_result"])
def test_decode_deeply_nested_frame(where: str) -> None:
    deep = "[" * DEEP + "]" * DEEP
    frame = {
        "unknown_field": f'{{"id": 1, "type": "ping", "x": {deep}}}',
        "items": ('{"id": 1, "type": "order.publish", "change": "modify", "order": '
                  f'{{"order_id": "o", "table_id": "t", "version": 1, "amount_cents": 1, '
                  f'"items": {deep}}}}}'),
        "rpc_result": ('{"type": "rpc.result", "rid": "r", "ok": true, "result": '
                       f'{{"a": {deep}}}}}'),
    }[where]
    with pytest.raises(BadFrame):
        decode(frame)


def test_decode_str_with_a_lone_surrogate() -> None:
    with pytest.raises(BadFrame):
        decode('{"id": 1, "type": "ping", "x": "\ud800"}')


# --- a live connection -------------------------------------------------------------------------

def broker_log_clean(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert "Exception in ASGI application" not in err, err[-3000:]


async def fuzz_batch(broker: BrokerProcess, store: Store, role: str,
                     batch: list[str | bytes]) -> None:
    """One fuzzing connection: hello, the batch, then a ping that must be answered."""
    token = store.token(role, "fuzzer", table="t1" if role == "h5" else None)
    client = await WsClient.connect(broker.url, token)
    try:
        for frame in batch:
            await client.send_raw(frame)
        marker = f"ping-{uuid.uuid4().hex}"
        reply = await client.raw_request(json.dumps({"id": marker, "type": "ping"}), marker)
        assert reply["ok"], reply
        assert client.close_code is None
        for frame in client.frames:
            if "ok" in frame and not frame["ok"]:
                error = frame["error"]
                assert error["code"] in KNOWN_CODES, frame
                assert "internal error" not in error["message"], frame
    finally:
        await client.close()


async def test_fuzzed_frames_on_a_live_connection(broker_factory: BrokerFactory,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    broker = broker_factory(env={"TABLELOCK_DRAIN_WINDOW_S": "0",
                                 "TABLELOCK_LOG_FORMAT": "json"}).start()
    store = Store(broker, store_id="fuzz-store")  # a broker of its own: a fixed id
    loop = asyncio.get_running_loop()
    try:
        # A well-behaved ERP, connected before the fuzzing and answering order.fetch.
        steady = await store.erp("steady")
        assert (await store.publish(steady, order_id="o1"))["ok"]
        token = store.token("erp_secondary", "fuzzer")
        batches = st.lists(frames(store.store_id, token), min_size=1, max_size=15)
        roles = st.sampled_from(["erp_secondary", "manager", "h5"])

        # Hypothesis drives the examples from a worker thread; each one runs on this loop.
        @settings(derandomize=True, database=None, max_examples=100, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(role=roles, batch=batches)
        def fuzz(role: str, batch: list[str | bytes]) -> None:
            asyncio.run_coroutine_threadsafe(
                fuzz_batch(broker, store, role, batch), loop).result(timeout=30)

        await asyncio.to_thread(fuzz)

        # The terminal connected before it all still does a lock round trip.
        final = f"final-{uuid.uuid4().hex[:8]}"
        assert (await store.publish(steady, order_id=final))["ok"]
        held = await steady.request("lock.acquire", order_id=final, kind="order")
        assert held["ok"], held
        released = await steady.request("lock.release", order_id=final, kind="order",
                                        token=held["lock"]["token"])
        assert released["ok"], released
        assert steady.close_code is None
        assert broker.proc is not None and broker.proc.poll() is None
    finally:
        await store.close()
    broker_log_clean(capfd.readouterr().err)


async def test_deeply_nested_frame_on_a_live_connection(
        broker_factory: BrokerFactory, capfd: pytest.CaptureFixture[str]) -> None:
    broker = broker_factory(env={"TABLELOCK_DRAIN_WINDOW_S": "0"}).start()
    store = Store(broker)
    try:
        bystander = await store.erp("bystander")
        client = await WsClient.connect(broker.url, mint(store.store_id, "erp_secondary", "x"))
        store.clients.append(client)
        deep = "[" * DEEP + "]" * DEEP
        reply = await client.raw_request(f'{{"id": "deep", "type": "ping", "x": {deep}}}',
                                         "deep")
        assert reply["ok"] is False and reply["error"]["code"] == "BAD_REQUEST", reply
        assert (await client.request("ping"))["ok"]
        assert (await bystander.request("ping"))["ok"]
    finally:
        await store.close()
    broker_log_clean(capfd.readouterr().err)
