"""docs/deploy/ works as shipped: the alert rules and the dashboard name only metrics a real
broker exports, the files parse, nginx accepts its config and carries WebSockets to two
brokers in turn, and systemd accepts the unit."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tablelock.settings import Settings

from .conftest import Store
from .support import ROOT, BrokerProcess, WsClient, free_port, mint, unique

DEPLOY = ROOT / "docs" / "deploy"
NGINX = "/usr/sbin/nginx"
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


# --- nginx -------------------------------------------------------------------------------------

needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")


def nginx_main(tmp_path: Path, site: Path) -> Path:
    """An nginx.conf of the test's own that includes the site config, as conf.d would."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir(exist_ok=True)
    main = tmp_path / "nginx.conf"
    main.write_text(f"""
worker_processes 2;
error_log {tmp_path}/error.log;
pid {tmp_path}/nginx.pid;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {site};
}}
""")
    return main


@needs_nginx
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    main = nginx_main(tmp_path, DEPLOY / "nginx.conf")
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(main)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@needs_nginx
async def test_nginx_carries_websockets_to_two_brokers_in_turn(
        tmp_path: Path, broker_factory: BrokerFactory) -> None:
    brokers = [broker_factory().start(), broker_factory().start()]
    port = free_port()
    site = (DEPLOY / "nginx.conf").read_text()
    # The shipped config, only pointed at the test's brokers and port.
    for shipped, here in [("10.0.0.11:8080", f"127.0.0.1:{brokers[0].port}"),
                          ("10.0.0.12:8080", f"127.0.0.1:{brokers[1].port}"),
                          ("listen 80;", f"listen 127.0.0.1:{port};")]:
        assert site.count(shipped) == 1, shipped
        site = site.replace(shipped, here)
    (tmp_path / "site.conf").write_text(site)
    main = nginx_main(tmp_path, tmp_path / "site.conf")
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(main),
                              "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert nginx.poll() is None, nginx.stderr.read() if nginx.stderr else ""
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)
        front = f"127.0.0.1:{port}"
        store = unique()
        clients = [await WsClient.connect(f"ws://{front}/ws", mint(store, "manager", f"m{n}"))
                   for n in range(2)]
        for client in clients:  # requests and replies go both ways through the proxy
            assert "server_time" in await client.request("ping")
        for broker in brokers:  # one each: round-robin
            text = (await asyncio.to_thread(get, f"{broker.http}/metrics"))[1]
            assert 'tablelock_connections{role="manager"} 1.0' in text, text
        assert get(f"http://{front}/metrics")[0] == 403
        assert get(f"http://{front}/healthz") == (200, '{"status":"ok"}')
        for client in clients:
            await client.close()
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()


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
