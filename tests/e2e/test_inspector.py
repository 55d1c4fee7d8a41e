"""The inspector of a real gateway under `twist`: how it starts (and when it cannot), its live feed
over a real connection, and replay through the proxy core to the example MCP server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from mcpr.gateway.settings import DEFAULT_INSPECTOR
from mcpr.common.bodies import BytesProducer
from tests.e2e.test_inspector_browser import HELD, HeldSession
from tests.support.processes import Process, start_gateway, start_upstream, twist

MCP = "http://127.0.0.1:1/mcp"  # nothing listens there


class Events(Protocol):
    """A Server-Sent Events stream, parsed; `next(check)` fires with the first event that passes."""

    def __init__(self) -> None:
        self._buffer = b""
        self.events: list[tuple[str, dict]] = []
        self._waiting: list[tuple[Callable[[str, dict], bool], Deferred[dict]]] = []
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
            if "event" in fields:
                self._add(fields["event"], json.loads(fields["data"]))

    def _add(self, name: str, data: dict) -> None:
        self.events.append((name, data))
        for waiter in list(self._waiting):
            if waiter[0](name, data):
                self._waiting.remove(waiter)
                waiter[1].callback(data)

    def next(self, check: Callable[[str, dict], bool]) -> Deferred[dict]:
        for name, data in self.events:
            if check(name, data):
                return succeed(data)
        d: Deferred[dict] = Deferred()
        self._waiting.append((check, d))
        return d

    def connectionLost(self, reason: Failure) -> None:
        for _, d in self._waiting:
            d.errback(reason)
        self.closed.callback(None)


class InspectorStartTests(TestCase):
    """As users meet it: where it is, and what happens when its port is taken."""

    def run_twist(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1", *args),
                              capture_output=True, text=True, env=env or dict(os.environ), timeout=30,
                              stdin=subprocess.DEVNULL, cwd=self.mktemp_dir())

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def taken(self, port: int | None = None) -> int:
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", port or 0))
        s.listen()
        return s.getsockname()[1]

    def test_an_endpoint_asked_for_that_cannot_be_bound_is_one_line_at_start(self) -> None:
        port = self.taken()
        result = self.run_twist("--inspector", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual((result.returncode, result.stdout, result.stderr.splitlines()), (64, "", [
            f"mcpr: option --inspector: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use: "
            "another process listens there (another gateway or relay?): stop it, or choose another port"]))
        result = self.run_twist("--inspector", "tcp:0:interface=0.0.0.0")
        self.assertEqual((result.returncode, result.stdout), (64, ""))
        self.assertRegex(result.stderr, r"^mcpr: option --inspector: tcp:0:interface=0.0.0.0 listens on 0.0.0.0, not on "
                                        r"loopback: .* \(interface=127.0.0.1 or ::1\)\n$")
        result = self.run_twist("--inspector", "tpc:4040")
        self.assertEqual(result.returncode, 64)
        self.assertIn("mcpr: option --inspector: cannot use endpoint \"tpc:4040\"", result.stderr)

    async def test_the_default_port_taken_is_a_warning_and_the_gateway_serves(self) -> None:
        try:
            self.taken(4040)
        except OSError:
            pass  # another process holds it already: the same case
        # MCPR_INSPECTOR empty: as for a user who set nothing (the tests' "off" left out).
        gateway = Process(self, twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1"), name="gateway",
                          env={"MCPR_INSPECTOR": ""})
        line = gateway.wait_for(" -> " + MCP)
        warning = gateway.wait_for("running without the inspector")
        self.assertIn(f"--inspector (the default, {DEFAULT_INSPECTOR}): cannot listen on {DEFAULT_INSPECTOR}: "
                      "Address already in use", warning)
        base = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        response = await Agent(reactor).request(b"GET", f"{base}/healthz".encode())
        self.assertEqual(response.code, 200)
        await readBody(response)
        self.assertEqual(gateway.popen.poll(), None)

    def test_off_and_without_a_store(self) -> None:
        gateway = Process(self, twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1", "--no-store",
                                      "--inspector", "tcp:0:interface=127.0.0.1"), name="gateway")
        gateway.wait_for("inspector: off, as it shows the event store and --no-store keeps none")
        quiet = Process(self, twist("mcpr", "--mcp", MCP, "--listen", "tcp:0:interface=127.0.0.1",
                                    "--inspector", "off"), name="quiet")
        quiet.wait_for("Starting reactor")
        self.assertNotIn("inspector:", quiet.output())
        self.assertNotIn("[mcpr.gateway.inspector", quiet.output())


class InspectorLiveTests(TestCase):
    """A call through a real gateway reaches the live feed; its replay reaches the server again."""

    timeout = 60

    async def test_live_feed_and_replay_through_the_proxy_core(self) -> None:
        _, mcp = start_upstream(self)
        gateway, base = start_gateway(self, mcp, "--inspector", "tcp:0:interface=127.0.0.1")
        inspector = re.search(r"inspector: (http://\S+)/", gateway.wait_for("inspector: http")).group(1)
        agent = Agent(reactor)

        live = Events()
        response = await agent.request(b"GET", f"{inspector}/api/live?after=0".encode())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        response.deliverBody(live)
        self.addCleanup(lambda: (live.transport.stopProducing(), live.closed)[1])

        held = HeldSession()
        reactor.spawnProcess(held, sys.executable, [sys.executable, HELD, f"{base}/mcp", "add", '{"a": 40, "b": 2}'],
                             env=dict(os.environ))
        self.addCleanup(held.end)
        called = await held.called
        call = await live.next(lambda name, r: name == "request" and r["tool"] == "add")
        self.assertEqual((call["via"], call["session_id"], call["status"]), ("direct", called["session_id"], 200))

        async def get(path: str, **kwargs: Any) -> tuple[int, Any]:
            response = await agent.request(b"GET", f"{inspector}{path}".encode(), **kwargs)
            return response.code, json.loads(await readBody(response))

        code, detail = await get(f"/api/requests/{call['id']}")
        self.assertEqual(detail["request_body"]["json"]["params"]["arguments"], {"a": 40, "b": 2})
        code, _ = await get("/api/info", headers=Headers({b"host": [b"rebound.example:4040"]}))
        self.assertEqual(code, 403)

        response = await agent.request(b"POST", f"{inspector}/api/requests/{call['id']}/replay".encode(),
                                       Headers({b"content-type": [b"application/json"]}), BytesProducer(b"{}"))
        result = json.loads(await readBody(response))
        self.assertEqual(response.code, 200, result)
        (event,) = result["answer"]["body"]["events"]
        self.assertEqual(event["json"]["result"]["content"][0]["text"], "42")
        replayed = await live.next(lambda name, r: name == "request" and r["via"] == "replay")
        self.assertEqual((replayed["tool"], replayed["session_id"], replayed["status"]),
                         ("add", called["session_id"], 200))
        code, page = await get("/api/requests?tool=add")
        self.assertEqual([r["via"] for r in page["requests"]], ["replay", "direct"])
        self.assertEqual(await held.end(), 0)
