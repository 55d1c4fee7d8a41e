"""A real redis-server (Debian's package) for the cluster tests, on a free loopback port.

It keeps nothing on disk (`--save "" --appendonly no`), so `stop()` followed
by `start()` is a Redis restart that lost every key: what the relay must
survive.  Start-up blocks until the server answers PING (some milliseconds),
like `Process.wait_for`; nothing of the test needs the reactor meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time

from twisted.trial.unittest import SkipTest

from tests.support.processes import Process, free_port

INSTALL = "redis-server is not installed: apt-get install redis-server (.ci/run does)"


class RedisServer:
    """redis-server on 127.0.0.1:`port`, started at once and killed at the test's cleanup;
    `args` are more of its options (e.g. `--requirepass`)."""

    def __init__(self, testcase, *args: str) -> None:
        path = shutil.which("redis-server")
        if path is None:
            raise SkipTest(INSTALL)
        self._testcase = testcase
        self._command = [path, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", *args]
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: Process | None = None
        self.start()

    def start(self, timeout: float = 10.0) -> None:
        """Run the server (again, on the same port and empty) and wait until it answers PING."""
        assert self._process is None, "already running"
        self._process = Process(self._testcase, [*self._command, "--port", str(self.port)], name="redis")
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer PING:\n{self._process.output()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def freeze(self) -> None:
        """Stop the server without closing its sockets (SIGSTOP): a Redis that hangs until
        `thaw()`, or the test's cleanup, lets it go on."""
        assert self._process is not None, "not running"
        pid = self._process.popen.pid
        os.kill(pid, signal.SIGSTOP)
        self._testcase.addCleanup(_thaw, pid)

    def thaw(self) -> None:
        assert self._process is not None, "not running"
        _thaw(self._process.popen.pid)

    def stop(self) -> None:
        """Kill the server (SIGKILL: a crash, nothing flushed) and wait until it is gone."""
        process, self._process = self._process, None
        if process is not None:
            process.popen.kill()
            process.popen.wait()
            process.stop()


def _thaw(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # stopped (killed) since
        os.kill(pid, signal.SIGCONT)
