"""The gateway's tunnel client: backoff, refusals that end the loop, and offer/pick."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpr.gateway.tunnel import Backoff, TunnelClient, websocket_url
from mcpr.proxy.events import EventLog
from tests.support.loopback import TrackingSite, listen, sleep
from tests.support.processes import Process, free_port, twist


class BackoffTests(SynchronousTestCase):
    def test_grows_and_caps(self) -> None:
        backoff = Backoff(initial=0.25, factor=2, cap=4, jitter=0)
        self.assertEqual([backoff.delay(n) for n in range(1, 8)], [0.25, 0.5, 1, 2, 4, 4, 4])

    def test_jitter_bounds(self) -> None:
        backoff = Backoff(initial=1, factor=2, cap=30, jitter=0.2)
        self.assertAlmostEqual(backoff.delay(1, rng=lambda: 0.0), 0.8)
        self.assertAlmostEqual(backoff.delay(1, rng=lambda: 1.0), 1.2)


class WebSocketURLTests(SynchronousTestCase):
    def test_urls(self) -> None:
        self.assertEqual(websocket_url("https://tunnel.example.com"),
                         ("wss://tunnel.example.com/_tunnel/register", "tunnel.example.com", 443, True))
        self.assertEqual(websocket_url("http://127.0.0.1:8080/"),
                         ("ws://127.0.0.1:8080/_tunnel/register", "127.0.0.1", 8080, False))
        self.assertEqual(websocket_url("https://r.example/base"),
                         ("wss://r.example/base/_tunnel/register", "r.example", 443, True))


class _NotFound(Resource):
    def getChild(self, path, request):
        return self

    def render(self, request):
        request.setResponseCode(404)
        return b"no tunnels here"


class _RefusesUpgrades(TrackingSite):
    """A 'relay' that accepts TCP and answers every upgrade with 404, counting attempts."""

    def __init__(self) -> None:
        super().__init__(_NotFound())
        self.attempts: list[float] = []

    def buildProtocol(self, addr):
        self.attempts.append(time.monotonic())
        return super().buildProtocol(addr)


class ReconnectTests(TestCase):
    timeout = 30

    def test_refused_upgrades_back_off_instead_of_hammering(self):
        """Only a completed registration resets the backoff: TCP connects that end in a
        refused upgrade count as failures (plain ClientService would retry at a fixed rate)."""
        async def t():
            site = _RefusesUpgrades()
            port = await listen(self, site)
            client = TunnelClient(reactor, f"http://127.0.0.1:{port}", "token", None, Site(Resource()),
                                  EventLog(None), lambda url: None,
                                  backoff=Backoff(initial=0.05, factor=2, cap=10, jitter=0))
            client.startService()
            self.addCleanup(client.stopService)
            await sleep(1.2)
            gaps = [b - a for a, b in zip(site.attempts, site.attempts[1:])]
            self.assertGreaterEqual(len(site.attempts), 3)
            self.assertLessEqual(len(site.attempts), 6, site.attempts)
            for earlier, later in zip(gaps, gaps[1:]):
                self.assertGreater(later, earlier * 1.5, gaps)
            self.assertEqual(client.state, "reconnecting")
        return Deferred.fromCoroutine(t())


class RegistrationOutcomeTests(TestCase):
    timeout = 60

    def start(self, *relay_args: str) -> int:
        port = free_port()
        relay = Process(self, twist("mcpr-relay", "--domain", "localhost", "--listen",
                                    f"tcp:{port}:interface=127.0.0.1", *relay_args), name="relay")
        relay.wait_for("listening on")
        return port

    def gateway(self, port: int, *args: str, token: str) -> Process:
        return Process(self, twist("mcpr", "--mcp", "http://127.0.0.1:1/mcp", "--listen",
                                   "tcp:0:interface=127.0.0.1", "--relay-url", f"http://127.0.0.1:{port}", *args),
                       name="gateway", env={"MCPR_TUNNEL_TOKEN": token})

    def test_bad_token_stops_the_loop_and_keeps_serving_locally(self):
        async def t():
            port = self.start("--static-token", "good:team-*")
            gateway = self.gateway(port, "--subdomain", "team-a", token="bad")
            gateway.wait_for("tunnel stopped")
            self.assertIn("the relay refused the tunnel token (4001 invalid token)", gateway.output())
            await sleep(1.0)
            self.assertEqual(gateway.output().count("connecting to"), 1)
            self.assertIsNone(gateway.popen.poll())
        return Deferred.fromCoroutine(t())

    def test_single_concrete_pattern_is_taken(self):
        async def t():
            port = self.start("--static-token", "solo-token:solo")
            gateway = self.gateway(port, token="solo-token")
            line = gateway.wait_for("Tunnel: ")
            self.assertRegex(line, r"Tunnel: https://solo\.localhost$")
        return Deferred.fromCoroutine(t())

    def test_several_patterns_on_a_terminal_are_asked_for(self):
        async def t():
            port = self.start("--static-token", "tty-token:alpha-*,beta")
            master, slave = os.openpty()
            self.addCleanup(os.close, master)
            log_path = Path(self.mktemp())
            with log_path.open("wb") as log:
                child = subprocess.Popen(
                    twist("mcpr", "--mcp", "http://127.0.0.1:1/mcp", "--listen", "tcp:0:interface=127.0.0.1",
                          "--relay-url", f"http://127.0.0.1:{port}"),
                    stdin=slave, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "MCPR_TUNNEL_TOKEN": "tty-token"})
            os.close(slave)
            self.addCleanup(lambda: (child.terminate(), child.wait(10)))
            deadline = time.monotonic() + 20
            while "connecting to" not in log_path.read_text():
                self.assertLess(time.monotonic(), deadline)
                await sleep(0.05)
            os.write(master, b"gamma\nalpha-dev\n")  # the first answer matches no offered pattern
            while "Tunnel: " not in log_path.read_text():
                self.assertLess(time.monotonic(), deadline, log_path.read_text())
                await sleep(0.05)
            text = log_path.read_text()
            self.assertIn("Tunnel: https://alpha-dev.localhost", text)
            self.assertIn("'gamma' does not match any of: alpha-*, beta", text)
        return Deferred.fromCoroutine(t())

    def test_several_patterns_without_a_terminal_say_how_to_choose(self):
        async def t():
            port = self.start("--static-token", "many-token:alpha-*,beta")
            gateway = self.gateway(port, token="many-token")
            gateway.wait_for("tunnel stopped")
            self.assertTrue(re.search(r"offers the subdomains alpha-\*, beta; choose one with --subdomain NAME",
                                      gateway.output()), gateway.output())
        return Deferred.fromCoroutine(t())
