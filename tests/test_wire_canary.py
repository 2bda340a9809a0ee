"""wire.py writes frames through uvicorn's websockets-sansio internals (not public API).

The canary fails loudly when an installed uvicorn changes them; the fallback (the ASGI path a
protocol without them gets) is forced in a real broker and carries a whole round trip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any, Self

import pytest
from packaging.requirements import Requirement

from tablelock import wire

from .conftest import Store
from .support import ROOT, SECRET, BrokerProcess

# `tablelock serve`, with `hub.direct_writer` reporting what it saw of each connection's
# protocol (one JSON line per connection); WIRE_FORCE_FALLBACK plays a uvicorn that renamed
# one of the attributes wire.py reads.
LAUNCHER = r"""
import json, os, sys
import uvicorn
import tablelock.hub as hub
import tablelock.wire as wire

if os.environ.get("WIRE_FORCE_FALLBACK"):
    wire.SANSIO_ATTRIBUTES += ("renamed_by_a_newer_uvicorn",)
found = hub.direct_writer

def names(value):
    return [f"{c.__module__}.{c.__qualname__}" for c in type(value).__mro__]

def reporting(send):
    writer = found(send)
    protocol = getattr(send, "__self__", None)
    report = {
        "uvicorn": uvicorn.__version__,
        "direct": writer is not None,
        "protocol": names(protocol),
        "attributes": {name: names(getattr(protocol, name))
                       for name in wire.SANSIO_ATTRIBUTES if hasattr(protocol, name)},
        "handshake_complete": getattr(protocol, "handshake_complete", None),
        "unsent": len(getattr(getattr(protocol, "conn", None), "writes", ())),
    }
    with open(os.environ["WIRE_REPORT"], "a") as out:
        out.write(json.dumps(report) + "\n")
    return writer

hub.direct_writer = reporting
from tablelock.cli import main
main(sys.argv[1:])
"""

SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol"
# What each attribute must be for direct_writer to be right (a class among its type's MRO).
EXPECTED_TYPES = {
    "conn": "websockets.server.ServerProtocol",
    "writable": "asyncio.locks.Event",
    "close_sent": "builtins.bool",
    "disconnected": "builtins.bool",
    "handshake_complete": "builtins.bool",
}


class ReportingBroker(BrokerProcess):
    """A real `tablelock serve` through LAUNCHER."""

    def __init__(self, report: Path, force_fallback: bool) -> None:
        env = {"WIRE_REPORT": str(report)}
        if force_fallback:
            env["WIRE_FORCE_FALLBACK"] = "1"
        super().__init__(env=env)
        self.report = report

    def spawn(self) -> Self:
        env = {**os.environ, "TABLELOCK_SECRET": SECRET, "TABLELOCK_DRAIN_WINDOW_S": "0",
               "TABLELOCK_LOG_LEVEL": "WARNING", **self.env}
        cmd = [sys.executable, "-c", LAUNCHER, "serve", "--port", str(self.port),
               "--backend", self.backend]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        return self

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.report.read_text().splitlines()]


def internals_changed(report: dict[str, Any]) -> list[str]:
    """What differs from the uvicorn internals wire.py was written against."""
    problems = []
    if SANSIO not in report["protocol"]:
        problems.append(f"the broker's protocol is no longer {SANSIO}: {report['protocol'][0]}")
    for name in wire.SANSIO_ATTRIBUTES:
        if name not in report["attributes"]:
            problems.append(f"the protocol has no `{name}`")
    for name, expected in EXPECTED_TYPES.items():
        found = report["attributes"].get(name)
        if found is not None and expected not in found:
            problems.append(f"`{name}` is a {found[0]}, not a {expected}")
    transport = report["attributes"].get("transport")
    if transport is not None and not any("Transport" in name for name in transport):
        problems.append(f"`transport` is a {transport[0]}")
    if report["handshake_complete"] is not True:
        problems.append("the handshake is not complete once the socket is accepted")
    if report["unsent"]:
        # direct_writer writes past the protocol's own buffer: it must be empty between calls.
        problems.append(f"the protocol's output buffer holds {report['unsent']} writes")
    if not report["direct"]:
        problems.append("direct_writer found no writer")
    return problems


def loudly(report: dict[str, Any], problems: list[str]) -> str:
    return (f"uvicorn {report['uvicorn']} changed the internals server/tablelock/wire.py writes "
            f"through: {'; '.join(problems)}. The broker still works (the ASGI path) but "
            "slower: adapt wire.py, measure (bench/README.md) and move the uvicorn pin in "
            "pyproject.toml.")


def pinned_uvicorn() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(Requirement(dep) for dep in project["dependencies"]
                if Requirement(dep).name == "uvicorn")


def test_the_installed_uvicorn_is_in_the_pinned_range() -> None:
    pin = pinned_uvicorn()
    assert pin.specifier.contains(version("uvicorn")), (
        f"uvicorn {version('uvicorn')} is outside {pin}: run this canary, then move the pin")
    assert wire._SansIO is not None, (
        "uvicorn no longer has websockets_sansio_impl.WebSocketsSansIOProtocol")


@pytest.fixture
def broker_with(tmp_path: Path) -> Any:
    started: list[ReportingBroker] = []

    def start(force_fallback: bool) -> ReportingBroker:
        broker = ReportingBroker(tmp_path / f"wire-{len(started)}.jsonl", force_fallback)
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()


async def round_trip(broker: BrokerProcess) -> None:
    """Lock, events to two subscribers (one fan-out), release: every frame on the wire."""
    store = Store(broker)
    try:
        cashier = await store.erp("cashier")
        await store.publish(cashier, order_id="o1")
        screens = [await store.connect("erp_secondary", f"screen-{n}") for n in range(2)]
        for screen in screens:
            assert (await screen.request("subscribe", channel=store.channel()))["ok"]
        lock = await cashier.request("lock.acquire", order_id="o1", kind="payment")
        assert lock["ok"], lock
        for screen in screens:
            seen = await screen.event("lock.acquired")
            assert seen["lock"]["token"] == lock["lock"]["token"]
        released = await cashier.request("lock.release", order_id="o1", kind="payment",
                                         token=lock["lock"]["token"])
        assert released["ok"], released
        for screen in screens:
            await screen.event("lock.released")
    finally:
        await store.close()


async def test_canary_uvicorn_internals_are_what_wire_py_reads(broker_with: Any) -> None:
    broker = broker_with(force_fallback=False)
    await round_trip(broker)
    reports = broker.reports()
    assert len(reports) == 3  # the cashier and two screens
    for report in reports:
        problems = internals_changed(report)
        assert not problems, loudly(report, problems)


def test_the_canary_catches_a_changed_internal() -> None:
    good = {
        "uvicorn": "0.55.0", "direct": True, "protocol": [SANSIO], "handshake_complete": True,
        "unsent": 0,
        "attributes": {**{name: [EXPECTED_TYPES.get(name, "builtins.object")]
                          for name in wire.SANSIO_ATTRIBUTES},
                       "transport": ["uvloop.loop.TCPTransport", "asyncio.transports.Transport"]},
    }
    assert internals_changed(good) == []
    renamed = {**good, "attributes": {k: v for k, v in good["attributes"].items()
                                      if k != "writable"}}
    assert internals_changed(renamed) == ["the protocol has no `writable`"]
    retyped = {**good, "attributes": {**good["attributes"], "conn": ["builtins.object"]}}
    assert "`conn` is a builtins.object" in internals_changed(retyped)[0]
    assert internals_changed({**good, "unsent": 2})
    assert internals_changed({**good, "direct": False})


async def test_the_forced_fallback_carries_a_real_round_trip(broker_with: Any) -> None:
    broker = broker_with(force_fallback=True)
    await round_trip(broker)
    reports = broker.reports()
    assert len(reports) == 3
    # Every connection went the ASGI way: a uvicorn without an attribute gets no writer.
    assert [r["direct"] for r in reports] == [False, False, False]


def test_sansio_protocol_refuses_a_send_of_another_server() -> None:
    async def send(message: dict[str, Any]) -> None:
        del message

    assert wire.direct_writer(send) is None
    wire.shed_handshake(send)  # nothing to shed, nothing raised

