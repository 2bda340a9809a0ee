"""Every Python and shell snippet of the README and of the Python SDK's README runs as written.

Snippets are read out of the Markdown at test time, so a README cannot drift from what works.
The one change made to them: the broker's address (127.0.0.1:8080, and the Redis example's
ports) becomes a free port, since other brokers may be running on this machine. Shell snippets
run in bash from a directory whose `.venv` is the environment running these tests, as a user's
shell runs them from a clone with `.venv` installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .redis_support import RedisServer
from .support import ROOT, SECRET, BrokerProcess, free_port, http_json, mint

README = ROOT / "README.md"
SDK_README = ROOT / "client_sdk" / "python" / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)


@dataclass(frozen=True)
class Snippet:
    path: Path
    lang: str
    code: str
    section: str  # the `## ` heading it is under
    before: str  # the prose between the previous block and this one

    @property
    def saved_as(self) -> str:
        """The file name the prose tells the reader to save it as (`watch.py`, say)."""
        names = re.findall(r"[Ss]ave\s+(?:this|it)\s+as\s+`(\w+\.py)`", self.before)
        assert names, f"no file name before the snippet in {self.path.name}: {self.code[:60]!r}"
        return names[-1]


def snippets(path: Path) -> list[Snippet]:
    text = path.read_text()
    found, previous_end = [], 0
    for match in FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[:match.start()], re.M)
        found.append(Snippet(path, match.group(1), match.group(2),
                             headings[-1] if headings else "",
                             text[previous_end:match.start()]))
        previous_end = match.end()
    return found


def runnable(path: Path) -> list[Snippet]:
    return [s for s in snippets(path) if s.lang in ("python", "sh")]


def in_section(path: Path, section: str) -> list[Snippet]:
    return [s for s in runnable(path) if s.section == section]


def at_port(code: str, port: int) -> str:
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


# Snippets no test here runs, and why.
SETUP = runnable(README)[0]
NOT_RUN_HERE = {
    SETUP.code.splitlines()[1]: ".ci/run runs it: it is the command that runs these tests",
    next(s for s in runnable(README) if s.section == "Benchmark").code:
        "a 25-minute benchmark; tests/test_bench_smoke.py runs its --quick form",
}


@pytest.fixture
def shell_dir(tmp_path: Path) -> Path:
    """A directory like a clone's: `.venv` is the environment running the tests."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return tmp_path


def shell_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABLELOCK_")}
    return {**env, "PYTHONUNBUFFERED": "1", "TABLELOCK_LOG_LEVEL": "WARNING", **extra}


@pytest.fixture
def session_cleanup() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Shells started in their own session; whatever they left running is stopped after."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_shell(script: str, cwd: Path, env: dict[str, str], out: Path,
                started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=cwd, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    started.append(proc)
    return proc


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes],
               timeout: float, out: Path) -> None:
    """Poll `condition` (an HTTP probe) until it holds; fail early if the shell failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() not in (None, 0):
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s\n{out.read_text()[-3000:]}")


def healthy(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return http_json("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
        except OSError:
            return False
    return probe


def port_open(port: int) -> bool:
    return healthy(port)()


# --- the main README -------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_the_first_line_installs_and_serves(tmp_path: Path,
                                            session_cleanup: list[subprocess.Popen[bytes]],
                                            ) -> None:
    """`python3 -m venv .venv && pip install -e . && tablelock serve`, in a copy of the tree."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".*_cache", "node_modules"))
    port = free_port()
    out = tmp_path / "out.txt"
    proc = start_shell(SETUP.code.splitlines()[0], clone, shell_env(TABLELOCK_PORT=str(port)),
                       out, session_cleanup)
    wait_until(healthy(port), "the installed broker answering /healthz", proc, 540, out)


def test_a_first_minute(shell_dir: Path, tmp_path: Path,
                        session_cleanup: list[subprocess.Popen[bytes]]) -> None:
    start, watch, pay, run = in_section(README, "A first minute")
    assert (start.lang, watch.lang, pay.lang, run.lang) == ("sh", "python", "python", "sh")
    assert (watch.saved_as, pay.saved_as) == ("watch.py", "pay.py")
    port = free_port()
    for snippet in (watch, pay):
        (shell_dir / snippet.saved_as).write_text(at_port(snippet.code, port))
    out = tmp_path / "out.txt"
    # The reader waits a moment between steps; the script waits for the same things.
    broker_up = f"until (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; do sleep 0.05; done"
    watching = f"until grep -q snapshot {out}; do sleep 0.05; done"
    lines = [start.code, broker_up]
    for line in run.code.splitlines():
        lines.append(line)
        if "watch.py &" in line:
            lines.append(watching)
    proc = start_shell("\n".join(lines), shell_dir, shell_env(TABLELOCK_PORT=str(port)), out,
                       session_cleanup)
    assert proc.wait(90) == 0, out.read_text()[-3000:]
    printed = out.read_text()
    # The watcher in the background and pay.py share the terminal: their lines may interleave.
    assert re.search(r"payment lock, fencing token \d+", printed), printed
    assert re.search(r"paid$", printed, re.M), printed
    assert "ORDER_PAID This order has already been paid." in printed
    events = re.findall(r'"event":\s*"([\w.]+)"', printed)
    assert events == ["order.updated", "lock.acquired", "order.paid", "lock.released"], printed
    assert re.search(r'"reason":\s*"paid"', printed)
    assert "Traceback" not in printed
    wait_until(lambda: not port_open(port), "the broker stopped by `kill`", proc, 30, out)


def test_the_python_sdk_section(broker_factory: Callable[..., BrokerProcess],
                                tmp_path: Path) -> None:
    (snippet,) = [s for s in in_section(README, "The SDKs") if s.lang == "python"]
    broker = broker_factory().start()
    script = tmp_path / snippet.saved_as
    script.write_text(at_port(snippet.code, broker.port))
    env = {**os.environ, "CASHIER": mint("s1", "erp_main", "cashier-1", name="Cashier 1")}
    first = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"paid under fencing token \d+\n", first.stdout), first.stdout
    again = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "This order has already been paid.\n"


def test_see_it_work(shell_dir: Path, tmp_path: Path,
                     session_cleanup: list[subprocess.Popen[bytes]]) -> None:
    (snippet,) = in_section(README, "See it work")
    port = free_port()
    out = tmp_path / "out.txt"
    proc = start_shell(snippet.code, shell_dir, shell_env(TABLELOCK_PORT=str(port)), out,
                       session_cleanup)
    wait_until(healthy(port), "the demo broker answering /healthz", proc, 60, out)
    assert f"http://127.0.0.1:{port}/app/dashboard.html" in out.read_text()


def test_many_brokers_one_redis(shell_dir: Path, tmp_path: Path,
                                redis_server: RedisServer,
                                session_cleanup: list[subprocess.Popen[bytes]]) -> None:
    (snippet,) = in_section(README, "Many brokers, one Redis")
    ports = free_port(), free_port()
    code = snippet.code.replace("redis://127.0.0.1:6379/0", redis_server.url)
    code = code.replace("--port 8081", f"--port {ports[0]}")
    code = code.replace("--port 8082", f"--port {ports[1]}")
    assert code.count(redis_server.url) == 2 and "8081" not in code and "8082" not in code
    out = tmp_path / "out.txt"
    proc = start_shell(code, shell_dir, shell_env(), out, session_cleanup)
    for port in ports:
        wait_until(healthy(port), f"the broker on {port}", proc, 60, out)
        assert http_json("GET", f"http://127.0.0.1:{port}/readyz") == (200, {"ready": True})


# --- the Python SDK's README ------------------------------------------------------------------

def test_the_python_sdk_readme(broker_factory: Callable[..., BrokerProcess], shell_dir: Path,
                               ) -> None:
    tokens, *programs = runnable(SDK_README)
    assert tokens.lang == "sh" and all(p.lang == "python" for p in programs)
    assert [p.saved_as for p in programs] == ["erp.py", "phone.py", "erp_sync.py"]
    broker = broker_factory().start()
    minted = subprocess.run(
        ["bash", "-e", "-c", tokens.code + '\nprintf "%s\\n" "$CASHIER" "$PHONE" "$SERVICE"'],
        cwd=shell_dir, env=shell_env(TABLELOCK_SECRET=SECRET), capture_output=True, text=True,
        timeout=60)
    assert minted.returncode == 0, minted.stderr
    cashier, phone, service = minted.stdout.split()
    env = {**os.environ, "CASHIER": cashier, "PHONE": phone, "SERVICE": service}

    def run(program: Snippet) -> str:
        script = shell_dir / program.saved_as
        script.write_text(at_port(program.code, broker.port))
        done = subprocess.run([sys.executable, script], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    erp, phone_py, erp_sync = programs
    assert re.fullmatch(r"editing o7 under token (\d+) \1\n", run(erp))
    assert run(phone_py).splitlines() == [
        "A phone never records a payment: it holds the payment lock while the customer pays "
        "through the payment provider, and the platform's payment service records the "
        "payment with this lock's token (tablelock_client.PaymentService, role service).",
        "paid"]
    paid_again = "This order has already been paid.\n"
    assert run(phone_py) == paid_again
    assert run(erp) == paid_again
    printed = run(erp_sync).splitlines()
    assert printed[:2] == ["True order.updated", "paid"], printed
    assert re.fullmatch(r"events seen: [1-9]\d*", printed[2]), printed
    assert run(erp_sync).splitlines()[0] == paid_again.strip()


# --- nothing is left out ---------------------------------------------------------------------

def test_every_snippet_is_run_or_excused() -> None:
    """A snippet added to either README must be run by a test above, or excused here."""
    run_here = [
        *in_section(README, "A first minute"),
        *(s for s in in_section(README, "The SDKs") if s.lang == "python"),
        *in_section(README, "See it work"),
        *in_section(README, "Many brokers, one Redis"),
        *runnable(SDK_README),
    ]
    for snippet in runnable(README) + runnable(SDK_README):
        if snippet in run_here:
            continue
        lines = [line for line in snippet.code.splitlines()
                 if line not in NOT_RUN_HERE and line != SETUP.code.splitlines()[0]]
        if snippet.code in NOT_RUN_HERE or not lines:
            continue
        raise AssertionError(f"{snippet.path.name}: a snippet no test runs: {snippet.code!r}")
    # .ci/run runs the second line of the first block: it must still be the test command.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "awk '/^```/{n++; next} n==1{print}' README.md | sed -n 2p" in ci
    assert "pytest" in SETUP.code.splitlines()[1]
