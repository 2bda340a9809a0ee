"""The Python SDK against a real broker over real sockets: reconnects, mirrors, locks, errors."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import tablelock_client as tl
from tablelock_client import sync as tl_sync

from .conftest import Store
from .support import BrokerProcess, WsClient, mint, order, unique

FAST = {"backoff_initial": 0.05, "backoff_max": 0.5}

Factory = Callable[..., Awaitable[tl.Client]]


@pytest.fixture
async def sdk(store: Store) -> AsyncIterator[Factory]:
    """Opens SDK clients on the test's store (or another url) and closes them after."""
    made: list[tl.Client] = []

    async def make(role: str = "erp_main", sub: str | None = None, table: str | None = None,
                   *, url: str | None = None, **options: Any) -> tl.Client:
        token = mint(store.store_id, role, sub or unique(role), table)
        client = await tl.connect(url or store.broker.url, token, locale="en",
                                  **{**FAST, **options})
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def change(stream: tl.ChangeStream, event: str, timeout: float = 5.0,
                 where: Callable[[tl.Change], bool] | None = None) -> tl.Change:
    """The next change named `event` (skipping others)."""
    async with asyncio.timeout(timeout):
        async for seen in stream:
            if seen.event == event and (where is None or where(seen)):
                return seen
    raise AssertionError(f"the stream ended before {event}")


async def until_fresh(stream: tl.ChangeStream, timeout: float = 10.0) -> list[tl.Change]:
    """Every change up to and including the next `fresh`."""
    seen: list[tl.Change] = []
    async with asyncio.timeout(timeout):
        async for seen_change in stream:
            seen.append(seen_change)
            if seen_change.event == "fresh":
                return seen
    raise AssertionError("the stream ended before fresh")


def fetch_from(orders: dict[str, dict[str, Any]]) -> Callable[[dict[str, str]], Any]:
    """An ERP's order.fetch handler over a dict of its orders."""
    def handler(params: dict[str, str]) -> dict[str, Any] | None:
        if "order_id" in params:
            return orders.get(params["order_id"])
        return next((o for o in orders.values() if o["table_id"] == params.get("table_id")),
                    None)
    return handler


def payment_service(client: tl.Client) -> tl.PaymentService:
    """The platform's payment service of `client`'s store and broker, with a service token."""
    http = client._session.connection.url.replace("ws://", "http://").removesuffix("/ws")
    return tl.PaymentService(http, mint(client.store_id, "service", "payment-service"))


def lock_keys(locks: Any) -> list[tuple[str, str, int]]:
    items = locks.values() if isinstance(locks, dict) else locks
    return sorted((lk["order_id"], lk["kind"], lk["token"]) if isinstance(lk, dict)
                  else (lk.order_id, lk.kind, lk.token) for lk in items)


class Proxy:
    """A TCP relay between a terminal and the broker that the test can cut and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self.swallow = False
        self.port = 0
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        link = (writer, up_writer)
        self._links.add(link)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       downstream: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if downstream and self.swallow:
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        self._links.discard(link)

    def blackhole(self) -> None:
        """Frames from the broker are swallowed on the way, as on a dying link."""
        self.swallow = True

    def cut(self) -> None:
        """The network goes: every link dies at once, and new ones are refused."""
        self.open = False
        for down, up in list(self._links):
            down.transport.abort()
            up.transport.abort()

    def restore(self) -> None:
        self.open = True
        self.swallow = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --- reconnects and mirrors -------------------------------------------------------------------

async def test_broker_restart_recovers_subscriptions_and_state(
        broker_factory: Callable[..., BrokerProcess]) -> None:
    # A short drain: the broker still says 1012 and refuses newcomers first, just not for 5 s.
    proc = broker_factory(env={"TABLELOCK_DRAIN_WINDOW_S": "0.5"}).start()
    store_id = unique()
    client = await tl.connect(proc.url, mint(store_id, "erp_main", "cashier-1"), locale="en",
                              **FAST)
    try:
        await client.publish_order(order("o1"), "modify")
        mirror = await client.subscribe_order("o1")
        store_mirror = await client.subscribe_store()
        lock = await client.acquire("o1", "order")
        assert mirror.locks["order"].token == lock.token  # its event came before the reply
        assert store_mirror.orders["o1"].version == 1 and not client.stale
        changes, store_changes = mirror.changes(), store_mirror.changes()
        epochs = (mirror.epoch, store_mirror.epoch)
        assert all(epochs)

        await asyncio.to_thread(proc.stop)
        await change(changes, "stale")
        await change(store_changes, "stale")
        assert mirror.stale and store_mirror.stale and client.stale and not client.connected
        assert not lock.lost.is_set()  # within the grace: not given up yet

        await asyncio.to_thread(proc.start)  # same port, empty memory
        await change(changes, "fresh", timeout=10)
        await change(store_changes, "fresh", timeout=10)
        await client.wait_fresh(5)
        assert not mirror.stale and not store_mirror.stale
        # The new broker numbers new streams: their epochs differ, so `since` was not
        # trusted and each mirror took the snapshot.
        assert mirror.epoch and store_mirror.epoch
        assert mirror.epoch != epochs[0] and store_mirror.epoch != epochs[1]
        # The new broker has never seen o1: the mirror says so rather than keep old locks,
        # and the lock handle learns that its lock is gone.
        assert mirror.order is None and mirror.locks == {}
        assert "o1" not in store_mirror.orders and store_mirror.locks == {}
        await asyncio.wait_for(lock.lost.wait(), 5)
        assert lock.lost_reason == "gone"

        # The mirror equals what the new broker says, and its subscriptions are live there.
        erp = await WsClient.connect(proc.url, mint(store_id, "erp_secondary", "pos-2"))
        try:
            reply = await erp.request("order.publish", order=order("o1", version=2),
                                      change="modify")
            assert reply["ok"], reply
            updated = await change(changes, "order.updated")
            assert updated.frame is not None and updated.frame["order"]["version"] == 2
            assert mirror.order is not None and mirror.order.version == 2
            snap = await erp.request("subscribe", channel=f"store:{store_id}")
            await change(store_changes, "order.updated")
            while store_mirror.seq < snap["seq"]:
                await change(store_changes, "terminal.online")
            assert store_mirror.seq == snap["seq"]
            assert {o.order_id: o.version for o in store_mirror.orders.values()} == {
                o["order_id"]: o["version"] for o in snap["snapshot"]["orders"]}
            assert lock_keys(store_mirror.locks) == lock_keys(snap["snapshot"]["locks"])
            assert sorted(store_mirror.terminals) == sorted(
                t["terminal_id"] for t in snap["snapshot"]["terminals"])
            assert {"cashier-1", "pos-2"} <= set(store_mirror.terminals)
        finally:
            await erp.close()
    finally:
        await client.close()


async def test_event_missed_during_a_short_drop_is_recovered_through_since(
        store: Store, sdk: Factory) -> None:
    proxy = await Proxy(store.broker.port).start()
    try:
        screen = await sdk("erp_secondary", "screen-1", url=proxy.url)
        cashier = await sdk("erp_main", "cashier-1")
        await cashier.publish_order(order("o1"), "modify")
        mirror = await screen.subscribe_order("o1")
        changes = mirror.changes()
        seq_before, epoch_before, session_before = mirror.seq, mirror.epoch, screen.session_id

        proxy.cut()
        await change(changes, "stale")
        # While the screen is away, the counter adds a dish.
        await cashier.publish_order(order("o1", version=2, amount_cents=1500), "add_items")
        assert mirror.order is not None and mirror.order.version == 1
        proxy.restore()

        seen = await until_fresh(changes)
        # Replayed from history, not papered over with a snapshot.
        assert [c.event for c in seen] == ["order.updated", "fresh"]
        assert seen[0].seq == seq_before + 1
        assert seen[0].frame is not None and seen[0].frame["order"]["version"] == 2
        # One way back: a new session, and the channel subscribed again at its position.
        assert screen.session_id != session_before and mirror.epoch == epoch_before
        assert mirror.order is not None and mirror.order.version == 2 and not mirror.stale
        assert mirror.seq == seq_before + 1
    finally:
        await proxy.close()


async def test_an_event_lost_on_a_dying_link_is_recovered(store: Store, sdk: Factory) -> None:
    """The broker wrote the event and the link lost it: a resume cannot know, `since` can."""
    proxy = await Proxy(store.broker.port).start()
    try:
        screen = await sdk("erp_secondary", "screen-1", url=proxy.url)
        cashier = await sdk("erp_main", "cashier-1")
        await cashier.publish_order(order("o1"), "modify")
        mirror = await screen.subscribe_order("o1")
        changes = mirror.changes()
        proxy.blackhole()
        await cashier.publish_order(order("o1", version=2), "modify")
        await cashier.ping()  # the broker has sent the event by now, into the void
        proxy.cut()
        await change(changes, "stale")
        proxy.restore()
        seen = await until_fresh(changes)
        assert [c.event for c in seen] == ["order.updated", "fresh"]
        assert mirror.order is not None and mirror.order.version == 2
    finally:
        await proxy.close()


async def test_a_dropped_socket_reconnects_and_keeps_its_lock(store: Store,
                                                               sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    await cashier.publish_order(order("o1"), "modify")
    mirror = await cashier.subscribe_order("o1")
    changes = mirror.changes()
    async with cashier.lock("o1", "payment") as lock:
        session = cashier.session_id
        await cashier._ws.close()
        await change(changes, "stale")
        await cashier.wait_fresh(5)
        assert cashier.session_id != session  # a new session: locks are the terminal's
        await change(changes, "fresh")
        # Back within the grace: the lock is still ours, and the mirror shows it.
        assert lock.held and not lock.lost.is_set()
        assert mirror.locks["payment"].token == lock.token
        paid = await lock.complete_payment("pay-1")
        assert paid.order.status == "paid"


async def test_a_seq_gap_is_answered_with_a_snapshot(store: Store, sdk: Factory) -> None:
    screen = await sdk("erp_secondary")
    cashier = await sdk("erp_main")
    await cashier.publish_order(order("o1"), "modify")
    mirror = await screen.subscribe_order("o1")
    changes = mirror.changes()
    lock = await cashier.acquire("o1", "order")
    await change(changes, "lock.acquired")
    # A frame that skips a seq, as if one were lost on the way: the mirror must not trust itself.
    forged = {"type": "event", "channel": mirror.channel, "seq": mirror.seq + 2,
              "event": "order.updated", "ts": 0, "order": order("o1", version=9)}
    screen._session.connection_frame(forged)
    assert mirror.stale
    await change(changes, "snapshot")
    await change(changes, "fresh")
    assert mirror.order is not None and mirror.order.version == 1
    assert mirror.locks["order"].token == lock.token


async def test_lock_lost_when_the_connection_stays_down_past_the_grace(
        store: Store, sdk: Factory) -> None:
    await store.config(disconnect_grace_ms=300)
    proxy = await Proxy(store.broker.port).start()
    try:
        cashier = await sdk("erp_main", "cashier-1", url=proxy.url)
        observer = await sdk("manager", "manager-1")
        await cashier.publish_order(order("o1"), "modify")
        watch = (await observer.subscribe_order("o1")).changes()
        lock = await cashier.acquire("o1", "order")
        proxy.cut()
        await asyncio.wait_for(lock.lost.wait(), 5)
        assert lock.lost_reason == "holder_disconnected"
        released = await change(watch, "lock.released")
        assert released.frame is not None and released.frame["reason"] == "holder_disconnected"
        proxy.restore()
        await cashier.wait_fresh(10)
        assert (await cashier.get_order("o1")).locks == []
    finally:
        await proxy.close()


# --- locks ---------------------------------------------------------------------------------------

async def test_erp_lock_is_renewed_past_its_ttl_and_h5_lock_is_not(
        broker_factory: Callable[..., BrokerProcess]) -> None:
    # It must wait out a TTL, so it runs once, on a broker of its own (memory backend).
    store = Store(broker_factory(env={"TABLELOCK_DRAIN_WINDOW_S": "0"}).start())
    await store.config(erp_lock_ttl_ms=10_000, h5_payment_lock_ttl_ms=5_000)
    cashier = await tl.connect(store.broker.url, store.token("erp_main", "cashier-1"),
                               locale="en", **FAST)
    phone = await tl.connect(store.broker.url, store.token("h5", "phone-1", table="t2"),
                             locale="en", **FAST)
    try:
        await renewal_scenario(cashier, phone)
    finally:
        await phone.close()
        await cashier.close()


async def renewal_scenario(cashier: tl.Client, phone: tl.Client) -> None:
    orders = {"o1": order("o1"), "o2": order("o2", table_id="t2")}
    cashier.serve_order_fetch(fetch_from(orders))
    for o in orders.values():
        await cashier.publish_order(o, "modify")
    assert cashier.config.erp_lock_ttl_ms == 10_000

    async with cashier.lock("o1", "order") as lock, phone.lock("o2", "payment") as paying:
        assert lock.renewable and not paying.renewable
        granted = lock.lock
        assert granted is not None and granted.expires_at - granted.acquired_at == 10_000
        # The h5 lock lapses at its TTL (nothing renews it) and its handle says so.
        await asyncio.wait_for(paying.lost.wait(), 8)
        assert paying.lost_reason == "expired"
        with pytest.raises(tl.LockExpired):  # the payment service comes too late
            await payment_service(phone).complete_payment(
                phone.store_id, "o2", token=paying.token, version=1, amount_cents=1000,
                payment_ref="late-pay")
        # The ERP lock outlives its TTL: the handle renews it at a third of it.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(lock.lost.wait(),
                                   (granted.expires_at - await cashier.ping()) / 1000 + 0.5)
        view = await cashier.get_order("o1")
        assert [(lk.kind, lk.token) for lk in view.locks] == [("order", granted.token)]
        assert view.locks[0].expires_at > granted.expires_at
        assert await cashier.ping() > granted.expires_at and lock.held
    # Leaving the block released it with its token.
    assert (await cashier.get_order("o1")).locks == []


@pytest.mark.parametrize("subscribed", [False, True], ids=["direct", "channel"])
async def test_lock_lost_on_a_forced_takeover(store: Store, sdk: Factory,
                                              subscribed: bool) -> None:
    cashier_a = await sdk("erp_main", "cashier-a")
    cashier_b = await sdk("erp_secondary", "cashier-b")
    await cashier_a.publish_order(order("o1"), "modify")
    if subscribed:
        await cashier_a.subscribe_order("o1")
    toasts = cashier_a.events()

    async with cashier_a.lock("o1", "payment") as mine:
        with pytest.raises(tl.PaymentLocked) as refused:
            await cashier_b.acquire("o1", "payment")
        err = refused.value
        assert isinstance(err, tl.TablelockError) and err.code == "PAYMENT_LOCKED"
        assert err.can_force and err.holder is not None and err.holder.terminal_id == "cashier-a"
        assert err.lock is not None and err.lock.token == mine.token
        assert err.message.startswith("This order is being checked out on another machine")
        contended = await change(toasts, "lock.contended")
        assert contended.frame is not None and contended.frame["by"]["terminal_id"] == "cashier-b"
        assert not mine.lost.is_set()

        theirs = await cashier_b.acquire("o1", "payment", force=True, operator="alice",
                                         reason="customer paid at the bar")
        await asyncio.wait_for(mine.lost.wait(), 5)
        assert mine.lost_reason == "forced" and not mine.held
        assert [lk.token for lk in theirs.forced_locks] == [mine.token]
        assert theirs.token is not None and mine.token is not None
        assert theirs.token > mine.token
        with pytest.raises(tl.Fenced):
            await mine.complete_payment("pay-a")
        paid = await theirs.complete_payment("pay-b")
        assert paid.order.status == "paid" and theirs.lost_reason == "paid"
    # Leaving the block did not try to release a lock that is no longer ours.
    assert (await cashier_a.get_order("o1")).order.status == "paid"  # type: ignore[union-attr]


async def test_typed_errors_for_each_refusal(store: Store, sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    orders: dict[str, dict[str, Any]] = {"o1": order("o1")}
    cashier.serve_order_fetch(fetch_from(orders))
    other = await sdk("erp_secondary", "cashier-2")
    phone = await sdk("h5", "phone-1", table="t1")
    await cashier.publish_order(orders["o1"], "modify")

    with pytest.raises(tl.NotFound):
        await other.acquire("nope", "order")
    with pytest.raises(tl.BadRequest):
        await other.check("o1", "dance")

    async with cashier.lock("o1", "order") as editing:
        with pytest.raises(tl.OrderLocked) as erp_refused:
            await other.acquire("o1", "payment")
        assert erp_refused.value.can_force
        assert erp_refused.value.holder == editing.lock.holder  # type: ignore[union-attr]
        with pytest.raises(tl.OrderLocked) as h5_refused:
            await phone.acquire("o1", "payment")
        assert not h5_refused.value.can_force
        assert h5_refused.value.message == ("The order is being changed at the counter. "
                                            "Please pay when it is done.")
        with pytest.raises(tl.Forbidden):
            await phone.acquire("o1", "payment", force=True)

    async with cashier.lock("o1", "presettle"):
        with pytest.raises(tl.PresettleLocked):
            await other.publish_order(order("o1", version=2), "add_items")

    await phone.subscribe_order("o1")
    paying = await phone.acquire("o1", "payment")  # pulls o1 from the cashier's handler
    assert paying.order is not None and paying.order.version == 1
    with pytest.raises(tl.PaymentLocked) as locked:
        await other.acquire("o1", "payment")
    assert locked.value.can_force and locked.value.holder.role == "h5"  # type: ignore[union-attr]
    accept = await other.check("o1", "accept")
    assert not accept.allowed and isinstance(accept.error, tl.AcceptBlocked)
    with pytest.raises(tl.StaleVersion):
        await other.publish_order(order("o1", version=1), "add_items")
    with pytest.raises(tl.NotHolder):
        await other.release("o1", "payment")
    assert paying.token is not None
    with pytest.raises(tl.Fenced):
        await other.complete_payment("o1", token=paying.token - 1, version=1, amount_cents=1000,
                                     payment_ref="pay-x")
    # The phone's payment is recorded by the payment service, with the phone's lock token.
    service = payment_service(phone)
    with pytest.raises(tl.AmountMismatch):
        await service.complete_payment(store.store_id, "o1", token=paying.token, version=1,
                                       amount_cents=1, payment_ref="pay-y")
    await service.complete_payment(store.store_id, "o1", token=paying.token, version=1,
                                   amount_cents=1000, payment_ref="pay-1")
    await asyncio.wait_for(paying.lost.wait(), 5)  # told by the event on its order channel
    assert paying.lost_reason == "paid"
    with pytest.raises(tl.OrderPaid):
        await cashier.acquire("o1", "order")

    # ERP_UNAVAILABLE: the cashier does not know the order, then its handler fails.
    with pytest.raises(tl.ErpUnavailable) as unknown:
        await phone.acquire("o9", "payment")
    assert unknown.value.message == "Could not get the latest order. Please pay at the front desk."

    def broken(params: dict[str, str]) -> Any:
        raise RuntimeError("ERP database is down")

    cashier.serve_order_fetch(broken)
    with pytest.raises(tl.ErpUnavailable):
        await phone.acquire("o9", "payment")


async def test_token_refresh(store: Store, sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    longer = mint(store.store_id, "erp_main", "cashier-1", ttl_s=7200)
    expires_at = await cashier.refresh_token(longer)
    assert abs(expires_at - (await cashier.ping() + 7_200_000)) < 5_000
    with pytest.raises(tl.AuthFailed):
        await cashier.refresh_token(mint(store.store_id, "erp_main", "someone-else"))


@pytest.mark.parametrize("kind", ["garbage", "expired"])
async def test_auth_failed_at_connect(store: Store, kind: str) -> None:
    token = ("not-a-token" if kind == "garbage"
             else mint(store.store_id, "erp_main", "x", ttl_s=-10))
    with pytest.raises(tl.AuthFailed) as auth:
        await tl.connect(store.broker.url, token, locale="en")
    assert isinstance(auth.value, tl.TablelockError) and auth.value.code == "AUTH_FAILED"
    assert auth.value.message.startswith("Authentication failed")


async def test_auth_failed_on_reconnect_stops_the_client(store: Store) -> None:
    tokens = iter([store.token("erp_main", "cashier-1"), "revoked"])
    client = await tl.connect(store.broker.url, lambda: next(tokens), locale="en", **FAST)
    try:
        mirror = await client.subscribe_order("o1")
        await client._ws.close()
        await asyncio.wait_for(client.wait_closed(), 5)
        assert isinstance(client.error, tl.AuthFailed) and client.closed and mirror.stale
        with pytest.raises(tl.Disconnected):
            await client.ping()
    finally:
        await client.close()


# --- the synchronous facade ---------------------------------------------------------------------

def test_sync_facade_from_a_plain_thread(broker: BrokerProcess) -> None:
    store_id = unique()
    outcome: dict[str, Any] = {}

    def erp_program() -> None:
        token = mint(store_id, "erp_main", "pos-1")
        with tl_sync.connect(broker.url, token, locale="en", **FAST) as pos:
            orders: dict[str, Any] = {}
            pos.serve_order_fetch(fetch_from(orders))  # runs in a worker thread
            published = pos.publish_order(order("o1"), "modify")
            orders["o1"] = order("o1")
            assert published.version == 1 and pos.terminal.terminal_id == "pos-1"
            with pos.lock("o1", "payment") as lock:
                assert lock.held and lock.token is not None and not lock.lost.is_set()
                outcome["paid"] = lock.complete_payment("till-1").order.status
            try:
                pos.acquire("o1", "order")
            except tl.OrderPaid as exc:
                outcome["after"] = exc.code

            # A second screen forces past a held lock: the first one's threading.Event fires.
            pos.publish_order(order("o2", table_id="t2"), "modify")
            orders["o2"] = order("o2", table_id="t2")
            with tl_sync.connect(broker.url, mint(store_id, "erp_secondary", "pos-2"),
                                 locale="en", **FAST) as other:
                with pos.lock("o2", "order") as editing:
                    try:
                        other.acquire("o2", "order")
                    except tl.OrderLocked as exc:
                        outcome["refused"] = (exc.code, exc.can_force)
                    taken = other.acquire("o2", "order", force=True, operator="manager")
                    outcome["lost"] = (editing.lost.wait(5), editing.lost_reason)
                # An h5 payment lock pulls o2 through pos's handler.
                with tl_sync.connect(broker.url, mint(store_id, "h5", "phone", table="t2"),
                                     locale="en", **FAST) as phone:
                    taken.release()
                    with phone.lock("o2", "payment") as paying:
                        outcome["h5"] = (paying.order.version if paying.order else None,
                                         paying.handle.renewable)
            outcome["stale"] = pos.stale
        outcome["closed"] = pos.client.closed

    errors: list[BaseException] = []

    def run() -> None:
        try:
            erp_program()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    assert outcome == {"paid": "paid", "after": "ORDER_PAID",
                       "refused": ("ORDER_LOCKED", True), "lost": (True, "forced"),
                       "h5": (1, False), "stale": False, "closed": True}


# --- lock handles used without `with`, and contention ------------------------------------------

async def test_a_lock_taken_without_with(store: Store, sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    other = await sdk("erp_secondary", "cashier-2")
    await cashier.publish_order(order("o1"), "modify")

    lock = await cashier.lock("o1", "order")  # awaiting the handle acquires it
    assert lock.held and lock.token is not None
    with pytest.raises(tl.OrderLocked):
        await other.acquire("o1", "order")
    await lock.release()
    assert not lock.held and (await cashier.get_order("o1")).locks == []

    # A handle neither awaited nor entered holds nothing, and says so rather than pretend.
    unacquired = cashier.lock("o1", "payment")
    with pytest.raises(RuntimeError, match="was not acquired"):
        _ = unacquired.token
    with pytest.raises(RuntimeError, match="was not acquired"):
        await unacquired.complete_payment("pay-1")
    with pytest.raises(RuntimeError, match="was not acquired"):
        await unacquired.release()
    with pytest.warns(RuntimeWarning, match="never acquired"):
        del unacquired
        gc.collect()
    assert (await cashier.get_order("o1")).locks == []


async def test_the_holder_hears_that_a_competitor_was_refused(store: Store,
                                                            sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    cashier.serve_order_fetch(fetch_from({"o1": order("o1")}))
    phone = await sdk("h5", "phone-1", table="t1")
    await cashier.publish_order(order("o1"), "modify")
    contended: asyncio.Queue[tl.Contention] = asyncio.Queue()

    async with cashier.lock("o1", "payment") as paying:
        paying.on_contended(contended.put_nowait)
        with pytest.raises(tl.PaymentLocked):
            await phone.acquire("o1", "payment")
        seen = await asyncio.wait_for(contended.get(), 5)
        assert seen.by.terminal_id == "phone-1" and seen.by.role == "h5"
        assert seen.lock.token == paying.token and seen.action


async def test_who_serves_order_fetch_is_what_the_capability_table_says(
        store: Store, sdk: Factory) -> None:
    manager = await sdk("manager", "manager-1")
    with pytest.raises(ValueError, match="never asked for orders"):
        manager.serve_order_fetch(fetch_from({}))

    # An erp_secondary may be the order authority: serving claims it from the next hello on.
    pos = await sdk("erp_secondary", "pos-2")
    pos.serve_order_fetch(fetch_from({"o1": order("o1", version=2, amount_cents=4200)}))
    await pos.publish_order(order("o1"), "modify")
    phone = await sdk("h5", "phone-1", table="t1")
    with pytest.raises(tl.ErpUnavailable):  # asked nobody: this hello claimed nothing
        await phone.acquire("o1", "payment")
    changes = (await pos.subscribe_order("o1")).changes()
    await pos._ws.close()
    await change(changes, "stale")
    await pos.wait_fresh(10)
    async with phone.lock("o1", "payment") as paying:  # pulled from pos-2 this time
        assert paying.order is not None and paying.order.amount_cents == 4200
        assert not paying.renewable  # an h5 lock ends at its TTL


# --- a phone never records a payment; the payment service does ----------------------------------

async def test_a_phone_pays_through_the_payment_service(store: Store, sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    cashier.serve_order_fetch(fetch_from({"o1": order("o1", amount_cents=4200)}))
    await cashier.publish_order(order("o1", amount_cents=4200), "modify")
    phone = await sdk("h5", "phone-1", table="t1")
    mirror = await phone.subscribe_order("o1")
    paying = await phone.acquire("o1", "payment")

    # The SDK does not offer a phone a call that would only be refused.
    with pytest.raises(tl.Forbidden, match="PaymentService"):
        await paying.complete_payment("wx-1")
    with pytest.raises(tl.Forbidden, match="PaymentService"):
        await phone.complete_payment("o1", token=paying.token, version=1, amount_cents=4200,
                                     payment_ref="wx-1")
    assert paying.held and mirror.order is not None and mirror.order.status == "open"

    service = payment_service(phone)
    with pytest.raises(tl.Forbidden):  # the route wants a service token
        await tl.PaymentService(service.base_url, store.token("erp_main")).complete_payment(
            store.store_id, "o1", token=paying.token, version=1, amount_cents=4200,
            payment_ref="wx-1")
    with pytest.raises(tl.StaleVersion) as stale:
        await service.complete_payment(store.store_id, "o1", token=paying.token, version=2,
                                       amount_cents=4200, payment_ref="wx-0")
    assert stale.value.code == "STALE_VERSION" and stale.value.message
    with pytest.raises(tl.NotFound):
        await service.complete_payment(store.store_id, "nope", token=paying.token, version=1,
                                       amount_cents=4200, payment_ref="wx-0")

    paid = await service.complete_payment(store.store_id, "o1", token=paying.token,
                                          version=1, amount_cents=4200, payment_ref="wx-1")
    assert paid.order.status == "paid" and paid.payment is not None
    assert paid.payment.payment_ref == "wx-1" and paid.payment.token == paying.token
    await asyncio.wait_for(paying.lost.wait(), 5)
    assert paying.lost_reason == "paid" and mirror.order.status == "paid"
    # A retry of the same payment is the same success; another payment is a second one.
    again = await asyncio.to_thread(
        service.complete_payment_blocking, store.store_id, "o1", token=paying.token,
        version=1, amount_cents=4200, payment_ref="wx-1")
    assert again.order.status == "paid"
    with pytest.raises(tl.OrderPaid):
        await service.complete_payment(store.store_id, "o1", token=paying.token, version=1,
                                       amount_cents=4200, payment_ref="wx-2")
    view = await service.get_order(store.store_id, "o1")
    assert view.order is not None and view.order.status == "paid" and view.locks == []


# --- UNAVAILABLE with "outcome": "unknown" -------------------------------------------------------

def answer_next_reply_with_outcome_unknown(client: tl.Client) -> None:
    """The broker answers the next request with UNAVAILABLE, outcome unknown (PROTOCOL.md 7).

    The request itself reaches the real broker and takes effect there; only its reply is
    replaced, at the SDK's decoding layer, as when the broker could not learn in time
    whether its backend applied the write.
    """
    conn = client._session.connection
    dispatch = conn._dispatch

    def replace_once(frame: dict[str, Any]) -> None:
        if "ok" in frame and frame.get("type") is None:
            conn._dispatch = dispatch  # type: ignore[method-assign]
            frame = {"id": frame["id"], "ok": False, "error": {
                "code": "UNAVAILABLE", "message": "The outcome is unknown.",
                "outcome": "unknown"}}
        dispatch(frame)

    conn._dispatch = replace_once  # type: ignore[method-assign]


async def test_an_unknown_outcome_is_reported_after_reading_the_order(
        store: Store, sdk: Factory) -> None:
    cashier = await sdk("erp_main", "cashier-1")
    other = await sdk("erp_secondary", "cashier-2")
    await cashier.publish_order(order("o1"), "modify")

    # A payment that was in fact recorded: the error carries the order as it now is.
    async with cashier.lock("o1", "payment") as paying:
        answer_next_reply_with_outcome_unknown(cashier)
        with pytest.raises(tl.OutcomeUnknown) as unknown:
            await paying.complete_payment("till-1")
    err = unknown.value
    assert isinstance(err, tl.Unavailable) and err.code == "UNAVAILABLE"
    assert err.view is not None and err.view.order is not None
    assert err.view.order.status == "paid" and err.view.locks == []
    assert paying.lost_reason == "paid"  # the handle learnt it from the view

    # An acquire that was in fact refused: the view shows who holds the lock.
    await cashier.publish_order(order("o2"), "modify")
    async with cashier.lock("o2", "order"):
        answer_next_reply_with_outcome_unknown(other)
        with pytest.raises(tl.OutcomeUnknown) as unknown:
            await other.acquire("o2", "order")
        view = unknown.value.view
        assert view is not None
        assert [(lk.kind, lk.holder.terminal_id) for lk in view.locks] == [
            ("order", "cashier-1")]

    # A publish that was applied: the view shows it.
    answer_next_reply_with_outcome_unknown(other)
    with pytest.raises(tl.OutcomeUnknown) as unknown:
        await other.publish_order(order("o3"), "modify")
    assert unknown.value.view is not None and unknown.value.view.order is not None
    assert unknown.value.view.order.version == 1  # the publish had been applied
    # Outside a write, UNAVAILABLE stays a plain Unavailable.
    assert type(tl.error_from({"code": "UNAVAILABLE"})) is tl.Unavailable


def test_sync_facade_mirrors_events_and_locks_without_with(broker: BrokerProcess) -> None:
    """The blocking facade has the asyncio client's calls: mirrors, events, contention."""
    store_id = unique()
    with tl_sync.connect(broker.url, mint(store_id, "erp_main", "pos-1"), locale="en",
                         **FAST) as pos, \
            tl_sync.connect(broker.url, mint(store_id, "erp_secondary", "pos-2"),
                            locale="en", **FAST) as other:
        pos.serve_order_fetch(fetch_from({"o1": order("o1")}))
        pos.publish_order(order("o1"), "modify")
        watched = pos.subscribe_order("o1")
        shop = pos.subscribe_store()
        assert pos.mirror(watched.channel) is not None and pos.mirror("order:x:y") is None
        assert watched.order is not None and watched.order.version == 1 and not watched.stale
        assert "o1" in shop.orders and "pos-1" in shop.terminals
        order_changes, shop_changes, frames = watched.changes(), shop.changes(), pos.events()
        raw: list[dict[str, Any]] = []
        seen_raw = threading.Event()
        stop = pos.on_event(lambda frame: (raw.append(frame), seen_raw.set()))

        # Without `with`, lock() takes the lock at once; release() gives it back.
        lock = pos.lock("o1", "payment")
        assert lock.held and lock.token is not None
        assert order_changes.get(5).event == "lock.acquired"
        assert seen_raw.wait(5) and raw[0]["event"] == "lock.acquired"
        assert watched.locks["payment"].token == lock.token
        next(c for c in shop_changes if c.event == "lock.acquired")  # the store channel's too
        assert shop.locks_of("o1")["payment"].token == lock.token

        contended: list[tl.Contention] = []
        heard = threading.Event()
        lock.on_contended(lambda c: (contended.append(c), heard.set()))
        try:
            other.lock("o1", "payment")
        except tl.PaymentLocked as exc:
            assert exc.can_force
        assert heard.wait(5) and contended[0].by.terminal_id == "pos-2"
        assert next(c for c in frames if c.event == "lock.contended").frame is not None

        lock.release()
        assert not lock.held
        assert order_changes.get(5).event == "lock.released" and watched.locks == {}
        stop()
        for stream in (frames, order_changes, shop_changes):
            stream.close()
        with other.lock("o1", "order") as editing:  # `with` still works, and releases
            assert editing.held
        assert not editing.held and other.get_order("o1").locks == []
        ending = watched.changes()
    assert [c.event for c in ending][-1] == "stale"  # closing the client ends the stream
