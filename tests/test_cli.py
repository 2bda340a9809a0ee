"""`tablelock` run as an operator runs it: whatever is wrong ends in one line that names it,
with no traceback; what starts says where it really listens; signals drain, then stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest

from tablelock.auth import Tokens
from tablelock.settings import SettingsError, parse_env_value

from .redis_support import RedisServer
from .support import ROOT, SECRET, BrokerProcess, WsClient, free_port, unique

TABLELOCK = (sys.executable, "-m", "tablelock")
# Runs `tablelock` in an interpreter where `import hiredis` fails, as without the extra.
WITHOUT_REDIS = """
import importlib.abc, runpy, sys

class NoRedis(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "hiredis":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoRedis())
sys.argv[0] = "tablelock"
runpy.run_module("tablelock", run_name="__main__")
"""


def environment(**variables: str) -> dict[str, str]:
    return {**os.environ, "TABLELOCK_SECRET": SECRET, "TABLELOCK_DRAIN_WINDOW_S": "0",
            **variables}


def run(*args: str, env: dict[str, str] | None = None,
        command: tuple[str, ...] = TABLELOCK) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], env=env or environment(), cwd=ROOT, text=True,
                          capture_output=True, timeout=60)


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The line a refused start ends in, once it is clear that nothing started."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening" not in result.stdout, result.stdout
    return result.stderr.strip().splitlines()[-1]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


# --- refused starts --------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--port", "70000"], {}, "argument --port: 70000 is not a port: use 0 to 65535"),
    (["--port", "http"], {}, "argument --port: 'http' is not a port number"),
    ([], {"TABLELOCK_PORT": "70000"}, "TABLELOCK_PORT=70000 is not a port: use 0 to 65535"),
    ([], {"TABLELOCK_PORT": "eighty"}, "TABLELOCK_PORT='eighty' is not a whole number"),
    ([], {"TABLELOCK_DRAIN_WINDOW_S": "soon"}, "TABLELOCK_DRAIN_WINDOW_S='soon' is not a number"),
    ([], {"TABLELOCK_RATE_PER_S": "-1"}, "TABLELOCK_RATE_PER_S='-1': use a number of 0 or more"),
    ([], {"TABLELOCK_LOG_LEVEL": "loud"}, "TABLELOCK_LOG_LEVEL='loud': use one of DEBUG"),
    ([], {"TABLELOCK_LOG_FORMAT": "xml"}, "TABLELOCK_LOG_FORMAT='xml': use json or text"),
    (["--backend", "mongodb://db"], {}, "unknown backend 'mongodb://db' (--backend, "
                                        "TABLELOCK_BACKEND): use memory or a Redis URL"),
    ([], {"TABLELOCK_BACKEND": "memcached"}, "unknown backend 'memcached'"),
])
def test_a_setting_that_cannot_work_is_named_in_one_line(
        args: list[str], env: dict[str, str], expected: str) -> None:
    line = refusal(run("serve", *args, env=environment(**env)))
    assert expected in line, line


@pytest.mark.parametrize(("raw", "value"), [("on", True), ("TRUE", True), ("1", True),
                                            ("off", False), ("no", False), ("0", False)])
def test_a_yes_or_no_setting_reads_as_one(raw: str, value: bool) -> None:
    # No setting is yes-or-no yet; bool("false") is True, so the first one must not go by it.
    assert parse_env_value("TABLELOCK_FLAG", raw, not value) is value


def test_a_yes_or_no_setting_that_is_neither_is_named() -> None:
    with pytest.raises(SettingsError, match=r"TABLELOCK_FLAG='maybe': use true or false"):
        parse_env_value("TABLELOCK_FLAG", "maybe", False)


def test_a_redis_url_without_the_redis_extra_says_what_to_install() -> None:
    result = run("serve", "--port", "0", "--backend", "redis://:hunter2@127.0.0.1:1/0",
                 command=(sys.executable, "-c", WITHOUT_REDIS))
    line = refusal(result)
    assert line == ("tablelock serve: backend redis://:***@127.0.0.1:1/0 needs the Redis client, "
                    "which is not installed: pip install 'tablelock[redis]'"), line
    assert "hunter2" not in result.stderr + result.stdout


def test_a_busy_port_is_one_error_and_never_said_to_listen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refusal(run("serve", "--port", str(port)))
    assert line == f"tablelock serve: cannot listen on 127.0.0.1:{port}: address already in use"


# --- what a start prints ---------------------------------------------------------------------

@contextmanager
def started(*args: str, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """`tablelock <args>` until its stdout has said where it listens; the lines it printed."""
    proc = subprocess.Popen([*TABLELOCK, *args], env=env or environment(), cwd=ROOT,
                            text=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not any("/healthz" in line or "/metrics" in line for line in lines):
            line = proc.stdout.readline()
            assert line, f"exited with {proc.wait()} after printing {lines}"
            lines.append(line.strip())
        yield lines
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_port_0_prints_the_port_the_system_chose(command: str) -> None:
    extra = ["--no-simulation"] if command == "demo" else []
    with started(command, "--port", "0", *extra) as lines:
        urls = [word for line in lines for word in line.replace("(", " ").split()
                if word.startswith(("ws://", "http://"))]
        assert urls, lines
        ports = {url.split("/")[2].rsplit(":", 1)[1] for url in urls}
        assert len(ports) == 1 and ports != {"0"}, lines
        assert status(f"http://127.0.0.1:{ports.pop()}/healthz") == 200


def test_listening_hides_the_redis_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}"  # nobody there: it starts all the same
    with started("serve", "--port", "0", "--backend", url) as lines:
        line = lines[-1]
        assert line.startswith("tablelock listening on ws://127.0.0.1:"), lines
        assert "backend: redis://:***@127.0.0.1:" in line and "hunter2" not in line, line
        port = line.split("127.0.0.1:")[1].split("/")[0]
        assert status(f"http://127.0.0.1:{port}/healthz") == 200  # no retry: it serves


def test_a_redis_that_answers_nothing_is_warned_about_and_retried(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    redis_port = free_port()
    broker = BrokerProcess(backend=f"redis://127.0.0.1:{redis_port}",
                           env={"TABLELOCK_LOG_FORMAT": "json"}).start(timeout=60)
    redis = RedisServer(tmp_path, port=redis_port)
    try:
        assert status(f"{broker.http}/readyz") == 503
        warned = [json.loads(line) for line in capfd.readouterr().err.splitlines()
                  if f"127.0.0.1:{redis_port} does not answer" in line]
        assert [record["level"] for record in warned] == ["warning"], warned
        assert "retrying" in warned[0]["msg"]
        redis.start()
        deadline = time.monotonic() + 30
        while status(f"{broker.http}/readyz") != 200:
            assert time.monotonic() < deadline, "never reached Redis once it came up"
            time.sleep(0.1)
    finally:
        broker.stop()
        redis.stop()


async def test_a_short_secret_is_warned_once_and_the_log_stays_json(
        capfd: pytest.CaptureFixture[str]) -> None:
    short = "twelve-bytes"
    broker = BrokerProcess(env={"TABLELOCK_SECRET": short, "TABLELOCK_LOG_FORMAT": "json",
                                "TABLELOCK_LOG_LEVEL": "INFO"}).start()
    try:
        with warnings.catch_warnings():  # PyJWT's own, in this process
            warnings.simplefilter("ignore")
            token = Tokens([short]).mint(store=unique(), role="manager", sub="m1")
        for _ in range(2):  # PyJWT warns on every verification
            client = await WsClient.connect(broker.url, token)
            await client.close()
    finally:
        broker.stop()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: PyJWT's would not parse
    short_warnings = [r for r in records if "secret 1 of 1 is 12 bytes" in r["msg"]]
    assert [r["level"] for r in short_warnings] == ["warning"], records
    assert not [r for r in records if "HMAC key" in r["msg"]], records


# --- tokens ----------------------------------------------------------------------------------

def test_token_ttl_without_a_unit_is_refused() -> None:
    line = refusal(run("token", "--store", "s1", "--role", "manager", "--sub", "m1",
                       "--ttl", "12"))
    assert "argument --ttl: bad duration '12': give a number and a unit (s, m, h or d)" in line


def test_token_ttl_with_a_unit_is_that_long() -> None:
    result = run("token", "--store", "s1", "--role", "manager", "--sub", "m1", "--ttl", "90m")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert abs(claims["exp"] - time.time() - 90 * 60) < 60, claims


def test_token_with_a_short_secret_warns_in_one_line() -> None:
    result = run("token", "--store", "s1", "--role", "manager", "--sub", "m1",
                 "--secret", "short")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "tablelock token: warning: secret 1 of 1 is 5 bytes, under the 32 HS256 needs: anyone "
        "holding a token can guess it offline. Make one with: "
        "python -c 'import secrets; print(secrets.token_urlsafe(32))'"], result.stderr


# --- signals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_drains_and_a_second_one_stops_at_once(
        sig: signal.Signals, capfd: pytest.CaptureFixture[str]) -> None:
    window = 60.0
    broker = BrokerProcess(env={"TABLELOCK_DRAIN_WINDOW_S": str(window),
                                "TABLELOCK_LOG_FORMAT": "text",
                                "TABLELOCK_LOG_LEVEL": "INFO"}).start()
    assert broker.proc is not None
    proc = broker.proc
    try:
        client = await WsClient.connect(broker.url, Tokens([SECRET]).mint(
            store=unique(), role="manager", sub="m1"))
        proc.send_signal(sig)
        assert await client.closed(timeout=10) == 1012  # draining: told to reconnect
        signalled = time.monotonic()
        proc.send_signal(sig)
        returncode = proc.wait(20)
        assert time.monotonic() - signalled < 10, "the second signal did not stop it"
        assert returncode == -sig, returncode  # ended by the signal itself
    finally:
        broker.stop(signal.SIGKILL)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert (f"INFO tablelock.cli: {sig.name}: draining: clients are told to reconnect (1012) "
            f"over 60 s (connections: 1), then the broker stops; a second SIGTERM or Ctrl-C "
            f"stops it at once") in err, err
    assert f"INFO tablelock.cli: {sig.name} again: stopping at once" in err, err
