"""Helpers for tests that use real listeners on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import waitUntilAllDisconnected
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

ROOT = Path(__file__).resolve().parent.parent


class TrackingSite(Site):
    """A Site that remembers its connections, so a test can wait for them to close."""

    noisy = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections.append(getattr(protocol, "_channel", protocol))
        return protocol

    def log(self, request) -> None:
        pass


def track(site: Site) -> Site:
    """Give any Site (e.g. the gateway's) the same connection list."""
    original = site.buildProtocol
    site.connections = []

    def buildProtocol(addr):
        protocol = original(addr)
        site.connections.append(getattr(protocol, "_channel", protocol))
        return protocol

    site.buildProtocol = buildProtocol
    return site


async def listen(testcase, site: Site) -> int:
    """Serve `site` on 127.0.0.1:0; the test's cleanup closes it and waits for its connections."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)

    def close() -> Deferred:
        for protocol in site.connections:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return DeferredList([
            Deferred.fromCoroutine(_stop(port)),
            waitUntilAllDisconnected(reactor, list(site.connections)),
        ])

    testcase.addCleanup(close)
    return port.getHost().port


async def _stop(port) -> None:
    await port.stopListening()


def client_agent(testcase) -> Agent:
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return Agent(reactor, pool=pool)


async def sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A real child process whose output is captured to a file, stopped at cleanup."""

    def __init__(self, testcase, args: list[str], *, name: str, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = Path(testcase.mktemp() + f"-{name}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                      env=full_env, stdin=subprocess.DEVNULL)
        testcase.addCleanup(self.stop)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        """Block until `needle` appears in the output (start-up only; the reactor is not running
        anything of ours yet); returns the line that holds it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if needle in line:
                    return line
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited ({self.popen.returncode}):\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen within {timeout} s:\n{self.output()}")

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
