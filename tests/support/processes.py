"""Real child processes for end-to-end tests: the daemons under `twist`, the example MCP server,
the SDK client; their output goes to a file that the test can wait on and show on failure."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A real child process whose output is captured to a file, stopped at cleanup."""

    def __init__(self, testcase, args: list[str], *, name: str, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = Path(testcase.mktemp() + f"-{name}.log").resolve()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        # Each relay keeps its name reservations apart, and each gateway its event store (in
        # ~/.local/state they would carry over from one test to the next); a test's own env,
        # --state-dir or --db still wins.
        self.state_home = f"{self.log_path}.xdg"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "MCPR_STATE_DIR": f"{self.log_path}.state",
                    "XDG_STATE_HOME": self.state_home, **(env or {})}
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                      env=full_env, stdin=subprocess.DEVNULL)
        testcase.addCleanup(self.stop)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _line_with(self, needle: str) -> str | None:
        for line in self.output().splitlines():
            if needle in line:
                return line
        return None

    def _exited(self) -> AssertionError | None:
        if self.popen.poll() is None:
            return None
        return AssertionError(f"process exited ({self.popen.returncode}):\n{self.output()}")

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        """Block until `needle` appears in the output (start-up only; the reactor is not running
        anything of ours yet); returns the line that holds it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (line := self._line_with(needle)) is not None:
                return line
            if (exited := self._exited()) is not None:
                raise exited
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen within {timeout} s:\n{self.output()}")

    def line(self, needle: str, timeout: float = 20.0) -> Deferred[str]:
        """The first line of the output that holds `needle`, once there is one.

        For a test that waits on the process while the reactor runs.  The
        output is a file, which says nothing when it grows, so this looks at it
        every 50 ms: the one place the tests poll while the reactor runs.  Fails
        when the process exits first or `timeout` passes; cancelling stops it.
        """
        deadline = reactor.seconds() + timeout
        found: list[str] = []

        def look() -> None:
            if (line := self._line_with(needle)) is not None:
                found.append(line)
                loop.stop()
            elif (exited := self._exited()) is not None:
                raise exited
            elif reactor.seconds() > deadline:
                raise AssertionError(f"{needle!r} not seen within {timeout} s:\n{self.output()}")

        def stopped(_: object) -> None:
            if found:  # else a cancel stopped the loop, and fails `seen` itself
                seen.callback(found[0])

        loop = LoopingCall(look)
        seen: Deferred[str] = Deferred(lambda _: loop.stop() if loop.running else None)
        loop.start(0.05).addCallbacks(stopped, seen.errback)
        return seen

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def twist(*args: str) -> list[str]:
    return [sys.executable, "-m", "twisted", "--log-format=text", *args]


def start_upstream(testcase) -> tuple[Process, str]:
    server = Process(testcase, python(str(ROOT / "examples" / "demo_server.py"), "--port", "0"), name="server")
    url = server.wait_for("LISTENING").split()[-1]
    return server, url


def start_relay(testcase, domain: str, *args: str, env: dict[str, str] | None = None) -> tuple[Process, int]:
    """`twist mcpr-relay` for `domain` on a free loopback port: the process and the port it took."""
    relay = Process(testcase, twist("mcpr-relay", "--domain", domain, "--listen", "tcp:0:interface=127.0.0.1",
                                    *args), name="relay", env=env)
    line = relay.wait_for("listening on 127.0.0.1:")
    return relay, int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))


def start_gateway(testcase, mcp: str, *extra: str, cwd: Path | None = None) -> tuple[Process, str]:
    if cwd is None:
        cwd = Path(testcase.mktemp())
        cwd.mkdir()
    gateway = Process(testcase, twist("mcpr", "--mcp", mcp, "--listen", "tcp:0:interface=127.0.0.1", *extra),
                      name="gateway", cwd=str(cwd))
    line = gateway.wait_for(" -> " + mcp)
    address = re.search(r"http://(127\.0\.0\.1:\d+)", line).group(1)
    return gateway, f"http://{address}"


async def run_session(url: str, *args: str) -> dict:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [str(ROOT / "examples" / "mcp_session.py"), url, "--json", *args], env=dict(os.environ))
    if code != 0:
        raise AssertionError(f"client failed ({code}): {err.decode()}\n{out.decode()}")
    return json.loads(out)


MCPR = ("-c", "from mcpr.cli import main; main()")  # the `mcpr` console script, whether installed or not


async def run_mcpr(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`mcpr ARGS` (a query command) to its end: exit status, standard output and error."""
    out, err, code = await getProcessOutputAndValue(sys.executable, [*MCPR, *args], env={**os.environ, **(env or {})},
                                                    path=str(cwd) if cwd else None)
    return code, out.decode(), err.decode()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakRSS:
    """Samples a process's resident memory every 20 ms while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss_kib(pid)
        self.peak = self.start
        self._call = reactor.callLater(0.02, self._sample)

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_kib(self.pid))
        self._call = reactor.callLater(0.02, self._sample)

    def stop(self) -> int:
        """Growth in MiB."""
        if self._call.active():
            self._call.cancel()
        return (self.peak - self.start) // 1024
