"""docs/deploy/ works as shipped: the alert rules and the dashboard name only metrics a real
broker exports, the files parse, nginx and HAProxy accept their configs and carry WebSockets
to two brokers in turn, and systemd accepts the unit."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import NGINX, nginx_main_config
from tablelock.settings import Settings

from .conftest import Store
from .support import ROOT, BrokerProcess, WsClient, free_port, mint, unique

DEPLOY = ROOT / "docs" / "deploy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# Not the broker's: Prometheus' own `up`, and the blackbox exporter's `probe_success`.
SCRAPER_METRICS = {"up", "probe_success"}
METRIC_NAME = re.compile(r"\b(?:tablelock|process|python)_[a-z_]+\b|\b(?:up|probe_success)\b(?=\{)")
SELECTOR = re.compile(r"\b((?:tablelock|process)_[a-z_]+)\{([^}]*)\}")
LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus, not by the broker
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}

BrokerFactory = Callable[..., BrokerProcess]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return loaded


def dashboard_queries() -> list[str]:
    board = dashboard()
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in board["templating"]["list"]
                if variable["type"] == "query"]
    return queries


def kit_queries() -> list[str]:
    return [rule["expr"] for rule in alert_rules()] + dashboard_queries()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def answer(url: str) -> int | None:
    """The status, or None while nothing listens there."""
    try:
        return get(url)[0]
    except OSError:
        return None


# --- the files parse and say what they must ----------------------------------------------------

def test_alert_rules_parse_and_carry_what_an_alert_needs() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    assert {"TablelockRedisDown", "TablelockExpiryLag", "TablelockSlowConsumers",
            "TablelockBrokerDown"} <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
        assert METRIC_NAME.search(rule["expr"]), rule


def test_dashboard_parses_and_every_panel_asks_the_chosen_data_source() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert graphs
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(METRIC_NAME.search(t["expr"]) for t in panel["targets"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]


# --- every metric named exists in a real broker's /metrics ----------------------------------

@dataclass
class Exported:
    family: str  # the metric as its HELP and TYPE lines name it
    labels: set[str] = field(default_factory=set)


@pytest.fixture
async def scraped(broker_factory: BrokerFactory) -> dict[str, Exported]:
    """Every series name of a broker that has seen lock traffic, with its family and the
    labels its samples carry (a family that a quiet broker has no sample of, such as the
    Redis events, is known by its HELP and TYPE lines alone)."""
    broker = broker_factory().start()
    store = Store(broker)
    first = await store.erp("till-1")
    second = await store.erp("till-2", role="erp_secondary")
    await store.publish(first, order_id="o1")
    for _ in range(20):  # backend latency is measured on one call in 16
        assert (await first.request("lock.acquire", order_id="o1", kind="order"))["ok"]
        refused = await second.request("lock.acquire", order_id="o1", kind="order")
        assert refused["error"]["code"] == "ORDER_LOCKED"
        assert (await first.request("lock.release", order_id="o1", kind="order"))["ok"]
    status, text = await asyncio.to_thread(get, f"{broker.http}/metrics")
    await store.close()
    assert status == 200
    exported: dict[str, Exported] = {}
    for family in text_string_to_metric_families(text):
        names = {family.name, *(family.name + s for s in SUFFIXES.get(family.type, ()))}
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        for name in names | {sample.name for sample in family.samples}:
            exported[name] = Exported(family.name, labels)
    return exported


def test_every_metric_the_kit_names_is_exported(scraped: dict[str, Exported]) -> None:
    named = {name for query in kit_queries() for name in METRIC_NAME.findall(query)}
    ours = named - SCRAPER_METRICS
    assert ours and ours <= set(scraped), sorted(ours - set(scraped))
    for query in kit_queries():
        for name, matchers in SELECTOR.findall(query):
            wanted = set(LABEL.findall(matchers)) - TARGET_LABELS
            if scraped[name].labels:  # a family with samples: its labels are known
                assert wanted <= scraped[name].labels, (name, wanted, scraped[name])


def test_the_dashboard_shows_every_tablelock_metric(scraped: dict[str, Exported]) -> None:
    shown = {scraped[name].family for query in dashboard_queries()
             for name in METRIC_NAME.findall(query) if name in scraped}
    # *_created: prometheus-client's creation times of its counters and histograms.
    ours = {exported.family for exported in scraped.values()
            if exported.family.startswith("tablelock_")
            and not exported.family.endswith("_created")}
    assert ours <= shown, sorted(ours - shown)


# --- nginx and HAProxy -------------------------------------------------------------------------

HAPROXY = "/usr/sbin/haproxy"
needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
needs_haproxy = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed")


def nginx_main(tmp_path: Path, site: Path) -> Path:
    """An nginx.conf of the test's own that includes the site config, as conf.d would."""
    return nginx_main_config(tmp_path, site)


@needs_nginx
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    main = nginx_main(tmp_path, DEPLOY / "nginx.conf")
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(main)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@needs_haproxy
def test_haproxy_accepts_the_config() -> None:
    result = subprocess.run([HAPROXY, "-c", "-f", str(DEPLOY / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def proxy_command(kind: str, tmp_path: Path, brokers: list[BrokerProcess], port: int,
                  edits: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """The shipped config, only pointed at the test's brokers and port (and, for HAProxy,
    sized to the test machine's open-file limit), with `edits` (old, new) on top, and how
    to run it."""
    shipped = {"nginx": ("nginx.conf", [("listen 80;", f"listen 127.0.0.1:{port};")]),
               "haproxy": ("haproxy.cfg", [("bind :80\n", f"bind 127.0.0.1:{port}\n"),
                                           ("maxconn 100000", "maxconn 1000")])}
    name, local = shipped[kind]
    config = (DEPLOY / name).read_text()
    for old, new in [("10.0.0.11:8080", f"127.0.0.1:{brokers[0].port}"),
                     ("10.0.0.12:8080", f"127.0.0.1:{brokers[1].port}"), *local, *edits]:
        assert config.count(old) == 1, old
        config = config.replace(old, new)
    path = tmp_path / f"site-{name}"
    path.write_text(config)
    if kind == "nginx":
        main = nginx_main(tmp_path, path)
        return [NGINX, "-p", str(tmp_path), "-c", str(main), "-g", "daemon off;"]
    return [HAPROXY, "-db", "-f", str(path)]


@contextmanager
def running(command: list[str], front: str) -> Iterator[None]:
    """A proxy process, once it answers /healthz through to a broker."""
    proxy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while answer(f"http://{front}/healthz") != 200:
            assert proxy.poll() is None, proxy.stderr.read() if proxy.stderr else ""
            assert time.monotonic() < deadline, f"{command[0]} did not serve"
            time.sleep(0.1)
        yield
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


@pytest.mark.parametrize("kind", [pytest.param("nginx", marks=needs_nginx),
                                  pytest.param("haproxy", marks=needs_haproxy)])
async def test_the_proxy_carries_websockets_to_two_brokers_in_turn(
        kind: str, tmp_path: Path, broker_factory: BrokerFactory) -> None:
    brokers = [broker_factory().start(), broker_factory().start()]
    port = free_port()
    front = f"127.0.0.1:{port}"
    with running(proxy_command(kind, tmp_path, brokers, port), front):
        store = unique()
        clients = [await WsClient.connect(f"ws://{front}/ws", mint(store, "manager", f"m{n}"))
                   for n in range(2)]
        for client in clients:  # requests and replies go both ways through the proxy
            assert "server_time" in await client.request("ping")
        for broker in brokers:  # one each: round-robin
            text = (await asyncio.to_thread(get, f"{broker.http}/metrics"))[1]
            assert 'tablelock_connections{role="manager"} 1.0' in text, text
        assert get(f"http://{front}/metrics")[0] == 403
        for client in clients:
            await client.close()


@needs_haproxy
async def test_haproxy_takes_a_draining_broker_out_of_rotation(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    draining = broker_factory(env={"TABLELOCK_DRAIN_WINDOW_S": "60"}).start()
    brokers = [draining, broker_factory().start()]
    port = free_port()
    front = f"127.0.0.1:{port}"
    with running(proxy_command("haproxy", tmp_path, brokers, port), front):
        assert draining.proc is not None
        draining.proc.send_signal(signal.SIGTERM)  # its /readyz answers 503 from now on
        store = unique()
        deadline = asyncio.get_running_loop().time() + 20
        welcomed = 0
        while welcomed < 4:  # in a row: round-robin would send every other one to it
            assert asyncio.get_running_loop().time() < deadline, "still sent to the drainer"
            try:
                client = await WsClient.connect(f"ws://{front}/ws",
                                                mint(store, "manager", unique("m")))
            except (RuntimeError, OSError, websockets.ConnectionClosed):
                welcomed = 0  # the draining broker told it to go elsewhere (1012)
                await asyncio.sleep(0.2)
                continue
            welcomed += 1
            await client.close()


# --- systemd -----------------------------------------------------------------------------------

def unit_settings() -> dict[str, str]:
    unit = (DEPLOY / "tablelock.service").read_text()
    return dict(re.findall(r"^#?Environment=TABLELOCK_(\w+)=(.*)$", unit, re.MULTILINE))


def test_the_unit_sets_only_real_settings_and_outwaits_the_drain() -> None:
    known = {spec.name.upper() for spec in fields(Settings)} | {"LOG_FORMAT", "LOG_LEVEL"}
    settings = unit_settings()
    assert settings and set(settings) <= known, set(settings) - known
    unit = (DEPLOY / "tablelock.service").read_text()
    timeout = int(re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)[0])
    assert timeout >= float(settings["DRAIN_WINDOW_S"]) + 5


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit_and_rates_it_hardened(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = (DEPLOY / "tablelock.service").read_text()
    assert unit.count("ExecStart=/opt/tablelock/bin/tablelock serve") == 1
    # verify wants the program to exist: this checkout's.
    program = Path(sys.executable).with_name("tablelock")
    copy = tmp_path / "tablelock.service"
    copy.write_text(unit.replace("/opt/tablelock/bin/tablelock", str(program)))
    verified = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    # Exposure 0 (locked down) to 10 (unprotected); 2.0 and under is systemd's "OK".
    rated = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20",
                            str(copy)], capture_output=True, text=True, timeout=60)
    assert rated.returncode == 0, rated.stdout[-2000:] + rated.stderr
