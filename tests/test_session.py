"""The connection's conversation without a socket or a broker: frames in, frames and actions
out (tablelock.conversation). Outcomes come from the real rules core."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tablelock.auth import Tokens
from tablelock.backends.base import Numbered, OutcomeUnknown, Unavailable
from tablelock.conversation import (
    Apply,
    Conversation,
    FindOrder,
    Goodbye,
    PullOrder,
    Step,
    Welcome,
    origin_allowed,
)
from tablelock.hub import Connection, Hub
from tablelock.model import Order, OrderRecord, StoreConfig
from tablelock.protocol import (
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    Close,
    OrderSnapshot,
    Ping,
    RpcResult,
    Subscribe,
    Unsubscribe,
)
from tablelock.rules import (
    Acquire,
    Check,
    Complete,
    ConnectionCounts,
    Context,
    Ingest,
    Publish,
    Pulled,
    Release,
    Renew,
    Tick,
    step,
)
from tablelock.settings import Settings

SECRET = "conversation-unit-test-secret-0123456789"
TOKENS = Tokens([SECRET])
NOW = 1_700_000_000_000
STRONG = StoreConfig(strong_link=True)


async def _no_socket(message: dict[str, Any]) -> None:
    raise AssertionError("the conversation never writes to a socket")


def new_talk(**settings: Any) -> Conversation:
    chosen = Settings(secrets=[SECRET], **settings)
    hub = Hub(rate_per_s=chosen.rate_per_s, rate_burst=chosen.rate_burst)
    return Conversation(hub.connection(_no_socket), hub, TOKENS, chosen, {})


def token(role: str = "erp_main", sub: str = "erp1", table: str | None = None,
          store: str = "s1", ttl_s: int = 3600) -> str:
    return TOKENS.mint(store=store, role=role, sub=sub, table=table, ttl_s=ttl_s)


def frame(type_: str, **fields: Any) -> bytes:
    return json.dumps({"type": type_, **fields}).encode()


def hello(tok: str, **fields: Any) -> bytes:
    return frame("hello", id=1, token=tok, protocol=PROTOCOL_VERSION, **fields)


def reply(out: bytes | Step) -> dict[str, Any]:
    assert isinstance(out, bytes), out
    decoded: dict[str, Any] = json.loads(out)
    return decoded


def error_code(out: bytes | Step) -> str:
    body = reply(out)
    assert body["ok"] is False, body
    code: str = body["error"]["code"]
    return code


def welcome(talk: Conversation, tok: str | None = None, **fields: Any) -> Welcome:
    """Say hello and attach, as the gateway does once the store is read."""
    said = talk.hello(hello(tok or token(), **fields))
    assert isinstance(said, Welcome), said
    session = talk.hub.attach(talk.conn, said.terminal, False)
    talk.store_read(said, STRONG)
    talk.welcomed(said, session, False, STRONG, NOW, [])
    return said


def served(role: str = "erp_main", table: str | None = None, **settings: Any) -> Conversation:
    talk = new_talk(**settings)
    welcome(talk, token(role, f"{role}1", table))
    return talk


def order(order_id: str = "o1", table_id: str = "t1") -> Order:
    return Order(order_id, table_id, 1, 1000)


def record(order_id: str = "o1", table_id: str = "t1") -> OrderRecord:
    return OrderRecord("s1", order_id, order(order_id, table_id), fence=NOW)


def apply(talk: Conversation, applied: Apply, rec: OrderRecord | None = None) -> bytes | PullOrder:
    """What the driver does with an `Apply`: the rules core decides, the conversation answers."""
    conn: Connection = talk.conn
    out = step(rec, applied.command, Context(NOW, STRONG, conn.terminal))
    return talk.answer(applied, out)


# --- hello --------------------------------------------------------------------------------

def test_hello_welcomes_and_replies_with_the_session() -> None:
    talk = new_talk()
    said = talk.hello(hello(token(), locale="en"))
    assert isinstance(said, Welcome)
    assert said.terminal.role == "erp_main" and said.terminal.store_id == "s1"
    session = talk.hub.attach(talk.conn, said.terminal, False)
    talk.store_read(said, StoreConfig(locale="zh-CN"))
    assert talk.conn.locale == "en"  # the hello's language before the store's
    body = reply(talk.welcomed(said, session, False, STRONG, NOW, []))
    assert body["id"] == 1 and body["ok"] is True
    assert body["session_id"] == session.session_id and body["resumed"] is False
    assert body["server_time"] == NOW and body["store"]["store_id"] == "s1"
    assert talk.conn.expires_at == said.expires_s


@pytest.mark.parametrize(("first", "code", "close"), [
    (b"{not json", "BAD_REQUEST", Close.NO_HELLO),
    (frame("ping", id=7), "BAD_REQUEST", Close.NO_HELLO),
    (frame("hello", id=1, token=token(), protocol=PROTOCOL_VERSION + 1), "UNSUPPORTED_PROTOCOL",
     Close.UNSUPPORTED_PROTOCOL),
    (hello("not-a-token"), "AUTH_FAILED", Close.AUTH_FAILED),
    (hello(token(ttl_s=-10)), "AUTH_FAILED", Close.AUTH_FAILED),
    (hello(token(), store_id="s2"), "AUTH_FAILED", Close.AUTH_FAILED),
    (hello(token("h5", "p1", "t1"), order_authority=True), "FORBIDDEN", Close.AUTH_FAILED),
])
def test_hello_refusals_answer_then_close(first: bytes, code: str, close: Close) -> None:
    said = new_talk().hello(first)
    assert isinstance(said, Goodbye) and said.frame is not None
    assert error_code(said.frame) == code
    assert said.code == close


def test_a_refused_hello_answers_in_its_own_language() -> None:
    said = new_talk().hello(hello("bad", locale="en"))
    assert isinstance(said, Goodbye) and said.frame is not None
    assert reply(said.frame)["error"]["message"].startswith("Authentication")


def test_no_hello_in_time_closes_without_a_frame() -> None:
    said = new_talk().hello_timeout()
    assert said == Goodbye(None, Close.NO_HELLO, "no hello")


def test_the_terminal_limit_refuses_one_more() -> None:
    talk = new_talk(max_connections_per_terminal=1)
    said = talk.hello(hello(token()))
    assert isinstance(said, Welcome)
    assert talk.admitted(said, ConnectionCounts(store=2, terminal=1)) is None
    bye = talk.admitted(said, ConnectionCounts(store=2, terminal=2))  # counts include it
    assert isinstance(bye, Goodbye) and bye.frame is not None
    assert error_code(bye.frame) == "LIMIT_REACHED" and bye.code == Close.POLICY
    assert "terminal" in json.dumps(reply(bye.frame)["error"])


def test_an_unreadable_store_refuses_in_the_hello_language() -> None:
    talk = new_talk()
    said = talk.hello(hello(token()))
    assert isinstance(said, Welcome)
    talk.store_read(said, StoreConfig(locale="en"))  # read, then terminal_up failed
    bye = talk.store_unreadable(said, Unavailable("down"))
    assert bye.code == Close.TRY_AGAIN_LATER and bye.frame is not None
    assert reply(bye.frame)["error"]["code"] == "UNAVAILABLE"
    assert reply(bye.frame)["error"]["message"] != "Backend unavailable"  # zh-CN, not en


# --- limits and refusals before dispatch --------------------------------------------------

def test_the_rate_limit_answers_then_closes_past_a_second_burst() -> None:
    talk = served(rate_per_s=0.001, rate_burst=2)
    steps = [talk.receive(frame("ping", id=n)) for n in range(7)]
    assert all(isinstance(s, Ping) for s in steps[:2])
    assert [error_code(s) for s in steps[2:4]] == ["RATE_LIMITED"] * 2
    bye = steps[4]  # past a whole burst of refusals
    assert isinstance(bye, Goodbye) and bye.code == Close.POLICY and bye.reason == "rate limit"
    assert bye.frame is not None and error_code(bye.frame) == "RATE_LIMITED"


def test_bad_frames_and_oversized_fields_are_bad_requests() -> None:
    talk = served()
    assert error_code(talk.receive(b"[1, 2")) == "BAD_REQUEST"
    long_id = "x" * (MAX_ID_CHARS + 1)
    assert error_code(talk.receive(frame("ping", id=long_id))) == "BAD_REQUEST"
    big = talk.receive(frame("lock.acquire", id=2, order_id="o" * 5000, kind="order"))
    assert error_code(big) == "BAD_REQUEST" and reply(big)["id"] == 2


def test_a_second_hello_and_another_store_are_refused() -> None:
    talk = served()
    assert reply(talk.receive(hello(token())))["error"]["message"].endswith(
        "(hello was already said)")
    assert error_code(talk.receive(frame("ping", id=3, store_id="s2"))) == "FORBIDDEN"


# --- dispatch: which step each request is -----------------------------------------------

@pytest.mark.parametrize(("request_frame", "command"), [
    (frame("lock.acquire", id=1, order_id="o1", kind="order"), Acquire("order")),
    (frame("lock.acquire", id=1, order_id="o1", kind="order", force=True, operator="ann",
           reason="stuck"), Acquire("order", True, "ann", "stuck")),
    (frame("lock.renew", id=1, order_id="o1", kind="order", token=5), Renew("order", 5)),
    (frame("lock.release", id=1, order_id="o1", kind="order", token=5), Release("order", 5)),
    (frame("check", id=1, order_id="o1", action="edit"), Check("edit")),
    (frame("payment.complete", id=1, order_id="o1", token=5, version=1, amount_cents=1000,
           payment_ref="p1"), Complete(5, 1, 1000, "p1")),
    (frame("order.publish", id=1, change="modify",
           order={"order_id": "o1", "table_id": "t1", "version": 2, "amount_cents": 5}),
     Publish(Order("o1", "t1", 2, 5), "modify")),
    (frame("order.get", id=1, order_id="o1"), Tick()),
])
def test_requests_become_rules_commands(request_frame: bytes, command: object) -> None:
    step_ = served().receive(request_frame)
    assert isinstance(step_, Apply)
    assert step_.order_id == "o1" and step_.command == command


def test_requests_the_driver_carries_out_come_back_as_they_are() -> None:
    talk = served()
    assert isinstance(talk.receive(frame("ping", id=1)), Ping)
    assert isinstance(talk.receive(frame("subscribe", id=2, channel="store:s1")), Subscribe)
    assert isinstance(talk.receive(frame("unsubscribe", id=3, channel="store:s1")), Unsubscribe)
    answer = frame("rpc.result", rid="r1", ok=True, result={"order_id": "o1"})
    assert isinstance(talk.receive(answer), RpcResult)


def test_order_get_by_table_finds_the_order_first() -> None:
    talk = served()
    find = talk.receive(frame("order.get", id=1, table_id="t1"))
    assert isinstance(find, FindOrder) and find.table_id == "t1"
    assert error_code(talk.found(find, None)) == "NOT_FOUND"
    then = talk.found(find, "o1")
    assert isinstance(then, Apply) and then.command == Tick()
    body = reply(apply(talk, then, record()))
    assert body["order"]["order_id"] == "o1" and body["locks"] == []


def test_order_get_fresh_pulls_from_the_erp_then_ingests() -> None:
    talk = served()
    pull = talk.receive(frame("order.get", id=1, order_id="o1", fresh=True))
    assert isinstance(pull, PullOrder) and pull.params == {"order_id": "o1"}
    assert error_code(talk.pulled(pull, None)) == "ERP_UNAVAILABLE"
    then = talk.pulled(pull, order())
    assert isinstance(then, Apply) and then.command == Ingest(order())
    assert reply(apply(talk, then))["order"]["order_id"] == "o1"
    assert error_code(talk.pull_limited(pull)) == "RATE_LIMITED"


def test_h5_scope_is_checked_on_the_request_and_on_the_record() -> None:
    talk = served("h5", "t1")
    assert error_code(talk.receive(frame("order.get", id=1, table_id="t2"))) == "FORBIDDEN"
    get = talk.receive(frame("order.get", id=2, order_id="o2"))
    assert isinstance(get, Apply)
    assert error_code(apply(talk, get, record("o2", "t2"))) == "FORBIDDEN"
    assert error_code(apply(talk, get, None)) == "NOT_FOUND"


# --- the explicit order pull ---------------------------------------------------------------

def test_an_h5_payment_lock_pulls_first_then_decides_on_the_pulled_copy() -> None:
    talk = served("h5", "t1")
    first = talk.receive(frame("lock.acquire", id=9, order_id="o1", kind="payment"))
    assert isinstance(first, Apply)
    pull = apply(talk, first, record())
    assert isinstance(pull, PullOrder) and pull.params == {"order_id": "o1"}
    assert pull.acquire == Acquire("payment")
    again = talk.pulled(pull, order())
    assert isinstance(again, Apply) and again.command == Acquire("payment", pulled=Pulled(order()))
    body = reply(apply(talk, again, record()))
    assert body["id"] == 9 and body["ok"] is True and body["lock"]["kind"] == "payment"
    failed = talk.pulled(pull, None)
    assert isinstance(failed, Apply) and failed.command == Acquire("payment", pulled=Pulled(None))
    assert error_code(apply(talk, failed, record())) == "ERP_UNAVAILABLE"


# --- subscribe ----------------------------------------------------------------------------

@pytest.mark.parametrize(("role", "table", "channel", "code"), [
    ("erp_main", None, "nonsense", "BAD_REQUEST"),
    ("erp_main", None, "store:s2", "FORBIDDEN"),
    ("h5", "t1", "store:s1", "FORBIDDEN"),
])
def test_subscribe_refusals(role: str, table: str | None, channel: str, code: str) -> None:
    talk = served(role, table)
    assert error_code(talk.receive(frame("subscribe", id=1, channel=channel))) == code


def test_the_subscription_limit() -> None:
    talk = served(max_subscriptions=1)
    assert talk.conn.session is not None
    talk.conn.session.subs["order:s1:o1"] = 0
    refused = talk.receive(frame("subscribe", id=1, channel="order:s1:o2"))
    assert error_code(refused) == "LIMIT_REACHED"
    again = talk.receive(frame("subscribe", id=2, channel="order:s1:o1"))
    assert isinstance(again, Subscribe)  # the same channel again is no more


def test_subscribed_replies_with_the_snapshot_and_what_the_h5_may_see() -> None:
    talk = served("h5", "t1")
    request = talk.receive(frame("subscribe", id=4, channel="order:s1:o1", since=1))
    assert isinstance(request, Subscribe)
    snapshot = OrderSnapshot(order(), [])
    missed = [Numbered(2, b'{"seq":2}', "t1"), Numbered(3, b'{"seq":3}', "t2"),
              Numbered(9, b'{"seq":9}', "t1")]
    stands, frame_ = talk.subscribed(request, 5, "e1", snapshot, missed)
    body = reply(frame_)
    assert stands and body["seq"] == 5 and body["recovered"] is True and body["epoch"] == "e1"
    assert body["missed"] == [{"seq": 2}]  # not another table's, not past the snapshot
    stands, frame_ = talk.subscribed(request, 5, "e1", OrderSnapshot(order("o1", "t2"), []),
                                     None)
    assert not stands and error_code(frame_) == "FORBIDDEN"


# --- replies ---------------------------------------------------------------------------------

def test_reply_shapes() -> None:
    talk = served()
    acquire = talk.receive(frame("lock.acquire", id="a", order_id="o1", kind="order"))
    assert isinstance(acquire, Apply)
    body = reply(apply(talk, acquire, record()))
    assert list(body)[:2] == ["id", "ok"] and "enforced" not in body  # omitted when true
    assert body["lock"]["token"] > NOW - 1 and body["order"]["order_id"] == "o1"
    assert error_code(apply(talk, acquire, None)) == "NOT_FOUND"
    check = talk.receive(frame("check", id="c", order_id="o1", action="edit"))
    assert isinstance(check, Apply)
    assert reply(apply(talk, check, record())) == {"id": "c", "ok": True, "allowed": True}
    assert reply(talk.pong(Ping(id=1), NOW)) == {"id": 1, "ok": True, "server_time": NOW}
    assert reply(talk.left(Unsubscribe(id=2, channel="store:s1"))) == {"id": 2, "ok": True}


def test_backend_failures_become_unavailable() -> None:
    talk = served()
    ping = Ping(id=1)
    assert error_code(talk.failed(ping, Unavailable("down"))) == "UNAVAILABLE"
    unknown = reply(talk.failed(ping, OutcomeUnknown("lost reply")))
    assert unknown["error"]["outcome"] == "unknown"
    internal = reply(talk.failed(ping, RuntimeError("bug")))
    assert internal["error"]["message"].endswith("(internal error)")


# --- the token's end ---------------------------------------------------------------------

def test_token_refresh_moves_the_end_for_the_same_terminal_only() -> None:
    talk = served()
    before = talk.conn.expires_at
    later = int(time.time()) + 7200
    body = reply(talk.receive(frame("token.refresh", id=1, token=token("erp_main", "erp_main1",
                                                                        ttl_s=7200))))
    assert body["ok"] is True and abs(body["expires_at"] - later * 1000) <= 2000
    assert talk.conn.expires_at > before
    other = talk.receive(frame("token.refresh", id=2, token=token("erp_main", "someone")))
    assert reply(other)["error"]["message"].endswith("(the new token names another terminal)")
    assert error_code(talk.receive(frame("token.refresh", id=3, token="x"))) == "AUTH_FAILED"


def test_hello_names_the_terminal_of_the_token_and_attaches_nothing() -> None:
    talk = new_talk()
    said = talk.hello(hello(token("h5", "p1", "t1")))
    assert isinstance(said, Welcome)
    assert (said.terminal.terminal_id, said.terminal.table_id) == ("p1", "t1")
    assert talk.conn.terminal is None  # attaching is the driver's (the hub's) job


# --- the upgrade --------------------------------------------------------------------------

def test_browsers_connect_from_the_own_origin_or_an_allowed_one() -> None:
    def scope(origin: bytes | None, scheme: str = "ws") -> dict[str, Any]:
        headers = [(b"host", b"broker:8080")] + ([(b"origin", origin)] if origin else [])
        return {"headers": headers, "scheme": scheme}

    assert origin_allowed(scope(None), [])  # not a browser
    assert origin_allowed(scope(b"http://broker:8080"), [])
    assert origin_allowed(scope(b"https://broker:8080", "wss"), [])
    assert not origin_allowed(scope(b"http://broker:8080", "wss"), [])
    assert not origin_allowed(scope(b"https://evil.example"), [])
    assert origin_allowed(scope(b"https://pos.example"), ["https://pos.example"])
    assert origin_allowed(scope(b"https://any.example"), ["*"])
