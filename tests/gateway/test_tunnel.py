"""The gateway's tunnel client: backoff, refusals that end the loop, and offer/pick."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpr.common import protocol as wire
from mcpr.common.protocol import CloseCode
from mcpr.gateway.tunnel import REGISTRATION_ANSWER_TIMEOUT, Backoff, NoChoice, TunnelClient, websocket_url
from mcpr.proxy.events import EventLog
from tests.support.loopback import TrackingSite, listen, sleep
from tests.support.processes import Process, start_relay, twist


class BackoffTests(SynchronousTestCase):
    """The reconnect delays: growth, cap and jitter."""

    def test_grows_and_caps(self) -> None:
        backoff = Backoff(initial=0.25, factor=2, cap=4, jitter=0)
        self.assertEqual([backoff.delay(n) for n in range(1, 8)], [0.25, 0.5, 1, 2, 4, 4, 4])

    def test_jitter_bounds(self) -> None:
        backoff = Backoff(initial=1, factor=2, cap=30, jitter=0.2)
        self.assertAlmostEqual(backoff.delay(1, rng=lambda: 0.0), 0.8)
        self.assertAlmostEqual(backoff.delay(1, rng=lambda: 1.0), 1.2)


class WebSocketURLTests(SynchronousTestCase):
    """The registration URL derived from --relay-url."""

    def test_urls(self) -> None:
        """Scheme, host, default port and a base path of the relay URL."""
        self.assertEqual(websocket_url("https://tunnel.example.com"),
                         ("wss://tunnel.example.com/_tunnel/register", "tunnel.example.com", 443, True))
        self.assertEqual(websocket_url("http://127.0.0.1:8080/"),
                         ("ws://127.0.0.1:8080/_tunnel/register", "127.0.0.1", 8080, False))
        self.assertEqual(websocket_url("https://r.example/base"),
                         ("wss://r.example/base/_tunnel/register", "r.example", 443, True))

    def test_websocket_schemes(self) -> None:
        """ws:// and wss:// (as the relay's status page shows them) are used as they are, with or
        without the registration path."""
        self.assertEqual(websocket_url("wss://tunnel.example.com"),
                         ("wss://tunnel.example.com/_tunnel/register", "tunnel.example.com", 443, True))
        self.assertEqual(websocket_url("wss://tunnel.example.com/_tunnel/register"),
                         ("wss://tunnel.example.com/_tunnel/register", "tunnel.example.com", 443, True))
        self.assertEqual(websocket_url("ws://localhost:8711/_tunnel/register/"),
                         ("ws://localhost:8711/_tunnel/register", "localhost", 8711, False))
        self.assertEqual(websocket_url("ws://[::1]:8711"), ("ws://[::1]:8711/_tunnel/register", "::1", 8711, False))


PORT = 4321
URL = "https://a.tunnel.example"

Answer = Callable[["MemoryRelay", dict], None]


def register(relay: MemoryRelay, message: dict) -> None:
    relay.sendMessage(json.dumps({"url": URL, "subdomain": message.get("subdomain") or "a"}).encode())


def refuse(code: int, reason: str) -> Answer:
    return lambda relay, message: relay.sendClose(int(code), reason)


class MemoryRelay(WebSocketServerProtocol):
    """The relay's end of a registration, as the test scripts it."""

    factory: MemoryRelayFactory

    def onConnect(self, request: Any) -> str:
        self.factory.connections.append(self)
        return wire.SUBPROTOCOL

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:  # binary messages are the gateway's HTTP/2 stream
            message = json.loads(payload)
            self.factory.messages.append(message)
            self.factory.answer(self, message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closes.append(code)


class MemoryRelayFactory(WebSocketServerFactory):
    protocol = MemoryRelay

    def __init__(self, clock: MemoryReactorClock) -> None:
        super().__init__(f"ws://127.0.0.1:{PORT}", reactor=clock)
        self.answer: Answer = register
        self.connections: list[MemoryRelay] = []
        self.messages: list[dict] = []
        self.closes: list[int | None] = []


class Events:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def emit(self, type: str, ts: float, **fields: Any) -> None:
        self.records.append({"type": type, **fields})

    def states(self) -> list[str]:
        return [e["state"] for e in self.records]

    def of(self, state: str, field: str) -> list:
        return [e[field] for e in self.records if e["state"] == state]


class ReconnectPolicyTests(SynchronousTestCase):
    """ClientService's loop with the tunnel's policy, on a MemoryReactorClock: no sockets, no waiting."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        # Autobahn runs its timers (handshake, close, pings) on txaio's loop, not on the factory's reactor.
        self.patch(txaio.config, "loop", self.clock)
        self.relay = MemoryRelayFactory(self.clock)
        self.clock.listenTCP(PORT, self.relay)
        self.tcp = ConnectionCompleter(self.clock)
        self.events = Events()
        self.urls: list[str] = []

    def start(self, **kwargs: Any) -> TunnelClient:
        client = TunnelClient(self.clock, f"http://127.0.0.1:{PORT}", "token", None, Site(Resource()), self.events,
                              self.urls.append, backoff=Backoff(initial=1, factor=2, cap=8, jitter=0), **kwargs)
        client.startService()
        return client

    def refuse_tcp(self) -> None:
        """The relay's address (an IP literal: connected to straight, so refused at once) refuses."""
        self.tcp.failOnce()

    def accept_tcp(self) -> IOPump:
        pump = self.tcp.succeedOnce()
        assert pump is not None, "no connection attempt to accept"
        pump.flush()
        return pump

    def test_refused_connections_back_off(self) -> None:
        self.start()
        for delay in (1, 2, 4, 8, 8):
            self.refuse_tcp()
            self.assertEqual(self.events.of("reconnecting", "delay_s")[-1], delay)
            self.clock.advance(delay * 0.9)
            self.assertEqual(self.clock.tcpClients, [], "retried before the delay was over")
            self.clock.advance(delay * 0.2)
            self.assertEqual(len(self.clock.tcpClients), 1)
        self.assertEqual(self.events.of("connecting", "attempt"), [1, 2, 3, 4, 5, 6])

    def test_connections_that_do_not_register_back_off(self) -> None:
        """TCP connects, then the relay hangs up before registering: plain ClientService would
        call this a success and retry at its shortest delay."""
        self.relay.answer = lambda relay, message: relay.dropConnection(abort=True)
        client = self.start()
        for delay in (1, 2, 4):
            self.accept_tcp()
            self.clock.advance(delay)
        self.assertEqual(self.events.of("reconnecting", "delay_s"), [1, 2, 4])
        self.assertEqual(len(self.relay.messages), 3)
        self.assertNotIn("disconnected", self.events.states())
        self.assertEqual(client.state, "connecting")

    def test_a_completed_registration_resets_the_backoff(self) -> None:
        client = self.start()
        self.refuse_tcp()
        self.clock.advance(1)
        self.refuse_tcp()
        self.clock.advance(2)
        pump = self.accept_tcp()
        self.assertEqual((client.state, client.url, self.urls), ("connected", URL, [URL]))
        self.relay.connections[-1].dropConnection(abort=True)  # the relay restarts
        pump.flush()
        self.assertEqual(self.events.of("disconnected", "code"), [1006])
        self.assertEqual(self.events.of("reconnecting", "delay_s"), [1, 2, 1])
        self.clock.advance(1)
        self.refuse_tcp()
        self.assertEqual(self.events.of("reconnecting", "delay_s"), [1, 2, 1, 2])

    def test_the_assigned_subdomain_is_asked_for_again(self) -> None:
        self.start()
        pump = self.accept_tcp()
        self.relay.connections[-1].dropConnection(abort=True)
        pump.flush()
        self.clock.advance(1)
        self.accept_tcp()
        self.assertEqual(self.relay.messages, [{"token": "token", "subdomain": None},
                                               {"token": "token", "subdomain": "a"}])

    def test_another_name_assigned_than_asked_is_said_and_kept(self) -> None:
        """A relay gives a token for exactly one name that name, whatever was asked (docs/protocol.md)."""
        logs: list[dict] = []
        globalLogPublisher.addObserver(logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, logs.append)
        self.relay.answer = lambda relay, message: relay.sendMessage(
            json.dumps({"url": URL, "subdomain": "solo"}).encode())
        client = TunnelClient(self.clock, f"http://127.0.0.1:{PORT}", "token", "wanted", Site(Resource()), self.events,
                              self.urls.append, backoff=Backoff(initial=1, factor=2, cap=8, jitter=0))
        client.startService()
        self.accept_tcp()
        said = [formatEvent(e) for e in logs if e.get("log_namespace") == "mcpr.gateway.tunnel"]
        self.assertIn("tunnel: asked for the subdomain wanted, the relay assigned solo", said)
        self.assertEqual(self.events.records[-1]["subdomain"], "solo")

    def test_a_final_close_code_stops_the_service(self) -> None:
        self.relay.answer = refuse(CloseCode.AUTH_FAILED, "invalid token")
        client = self.start()
        self.accept_tcp()
        self.assertFalse(client.running)
        self.assertEqual(self.events.states(), ["connecting", "stopped"])
        self.assertEqual(self.events.records[-1]["code"], CloseCode.AUTH_FAILED)
        self.assertEqual(self.events.records[-1]["reason"], "invalid token")
        self.clock.advance(3600)
        self.assertEqual(self.clock.tcpClients, [])
        self.successResultOf(client.stopService())

    def test_a_relay_that_never_answers_the_registration_is_retried(self) -> None:
        """A relay that takes the socket and the hello but says nothing: the gateway gives up on
        that socket after REGISTRATION_ANSWER_TIMEOUT and tries again with its backoff."""
        self.relay.answer = lambda relay, message: None
        client = self.start()
        pump = self.accept_tcp()
        self.assertEqual(len(self.relay.connections), 1)
        self.clock.advance(REGISTRATION_ANSWER_TIMEOUT - 1)
        self.assertEqual(self.events.states(), ["connecting"])
        self.clock.advance(1)
        pump.flush()
        self.assertEqual(self.events.of("reconnecting", "delay_s"), [1])
        self.relay.answer = register
        self.clock.advance(1)
        self.accept_tcp()
        self.assertEqual((client.state, client.url), ("connected", URL))

    def test_an_auth_provider_outage_is_retried(self) -> None:
        """4001 `auth provider unavailable` says nothing about the token: the gateway retries it,
        and registers once the provider answers again."""
        self.relay.answer = refuse(CloseCode.AUTH_FAILED, "auth provider unavailable")
        client = self.start()
        for delay in (1, 2):
            self.accept_tcp()
            self.assertTrue(client.running)
            self.clock.advance(delay)
        self.relay.answer = register
        self.accept_tcp()
        self.assertEqual(self.events.of("reconnecting", "delay_s"), [1, 2])
        self.assertEqual((client.state, client.url), ("connected", URL))

    def test_a_name_held_by_another_token_is_retried_and_said_once(self) -> None:
        """4003 (and 4008) may clear up by themselves (S4): the gateway keeps trying with its backoff,
        warns once with what to do, and gets its name once it is free."""
        logs: list[dict] = []
        globalLogPublisher.addObserver(logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, logs.append)
        self.relay.answer = refuse(CloseCode.IN_USE, "subdomain reserved for another token for 540 s")
        client = self.start()
        for delay in (1, 2, 4, 8, 8):
            self.accept_tcp()
            self.assertTrue(client.running)
            self.clock.advance(delay)
        self.relay.answer = refuse(CloseCode.TOO_MANY, "relay full: too many tunnels")
        self.accept_tcp()
        self.clock.advance(8)
        self.relay.answer = register
        self.accept_tcp()
        self.assertEqual(self.events.of("reconnecting", "delay_s"), [1, 2, 4, 8, 8, 8])
        self.assertEqual((client.state, client.url), ("connected", URL))
        said = [formatEvent(e) for e in logs if e.get("log_namespace") == "mcpr.gateway.tunnel"
                and e["log_level"] >= LogLevel.info]
        taken = [line for line in said if "is taken" in line]
        self.assertEqual(len(taken), 1, said)
        self.assertIn("reserved for another token", taken[0])
        self.assertIn("--subdomain OTHER", taken[0])
        self.assertEqual(len([line for line in said if "takes no more tunnels" in line]), 1, said)
        self.assertFalse([line for line in said if "reconnecting in" in line], said)

    def test_eviction_after_registration_stops_the_service(self) -> None:
        client = self.start()
        pump = self.accept_tcp()
        self.relay.connections[-1].sendClose(int(CloseCode.EVICTED), wire.EVICTED_REASON)
        pump.flush()
        self.assertFalse(client.running)
        self.assertEqual(self.events.states(), ["connecting", "connected", "disconnected", "evicted"])
        self.clock.advance(3600)
        self.assertEqual(self.clock.tcpClients, [])

    def test_no_way_to_choose_a_subdomain_stops_the_service(self) -> None:
        def choose(patterns: list[str]) -> Deferred[str]:
            raise NoChoice(f"cannot choose among {patterns}")

        self.relay.answer = lambda relay, message: relay.sendMessage(json.dumps(
            {"subdomains": ["alpha-*", "beta"]}).encode())
        client = self.start(choose=choose)
        self.accept_tcp()
        self.assertFalse(client.running)
        self.assertEqual(self.relay.closes, [1000])
        self.assertEqual(self.events.records[-1], {"type": "tunnel", "state": "stopped", "relay": client.relay_url,
                                                   "code": CloseCode.POLICY,
                                                   "reason": "cannot choose among ['alpha-*', 'beta']"})

    def test_a_chosen_subdomain_is_sent_and_kept(self) -> None:
        offered: list[list[str]] = []
        chosen: Deferred[str] = Deferred()

        def choose(patterns: list[str]) -> Deferred[str]:
            offered.append(patterns)
            return chosen

        def answer(relay: MemoryRelay, message: dict) -> None:
            if message.get("subdomain") is None:
                relay.sendMessage(json.dumps({"subdomains": ["alpha-*", "beta"]}).encode())
            else:
                register(relay, message)

        self.relay.answer = answer
        client = self.start(choose=choose)
        self.accept_tcp()
        # The socket is closed while the person chooses: no relay timeout runs meanwhile.
        self.assertEqual(offered, [["alpha-*", "beta"]])
        self.assertEqual(self.relay.closes, [1000])
        self.assertEqual(self.events.states(), ["connecting", "choosing"])
        self.assertEqual(self.events.records[-1]["offered"], ["alpha-*", "beta"])
        self.clock.advance(3600)  # a person may take a while; nothing retries meanwhile
        self.assertEqual(self.events.states(), ["connecting", "choosing"])
        chosen.callback("alpha-dev")
        self.accept_tcp()
        self.assertEqual(self.relay.messages[1], {"token": "token", "subdomain": "alpha-dev"})
        self.assertEqual(self.events.records[-1]["state"], "connected")
        self.assertEqual(self.events.records[-1]["subdomain"], "alpha-dev")
        tunnel = self.successResultOf(client.whenConnected())
        self.assertEqual(tunnel.factory.subdomain, "alpha-dev")

    def test_stop_while_choosing_does_not_register(self) -> None:
        self.relay.answer = lambda relay, message: relay.sendMessage(json.dumps(
            {"subdomains": ["alpha-*", "beta"]}).encode())
        chosen: Deferred[str] = Deferred()
        client = self.start(choose=lambda patterns: chosen)
        self.accept_tcp()
        self.successResultOf(client.stopService())
        chosen.callback("alpha-dev")
        self.clock.advance(3600)
        self.assertEqual(self.events.states(), ["connecting", "choosing"])
        self.assertFalse(client.running)

    def test_terminal_closed_while_choosing_stops_the_tunnel(self) -> None:
        self.relay.answer = lambda relay, message: relay.sendMessage(json.dumps(
            {"subdomains": ["alpha-*", "beta"]}).encode())
        chosen: Deferred[str] = Deferred()
        client = self.start(choose=lambda patterns: chosen)
        self.accept_tcp()
        chosen.errback(NoChoice("no subdomain chosen on the terminal"))
        self.assertEqual(self.events.records[-1], {"type": "tunnel", "state": "stopped", "relay": client.relay_url,
                                                   "code": CloseCode.POLICY,
                                                   "reason": "no subdomain chosen on the terminal"})
        self.clock.advance(3600)
        self.assertEqual(self.events.states(), ["connecting", "choosing", "stopped"])

    def test_stop_during_a_backoff_sleep_cancels_it(self) -> None:
        client = self.start()
        self.refuse_tcp()
        self.assertEqual(client.state, "reconnecting")
        self.successResultOf(client.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(self.events.states(), ["connecting", "reconnecting"])

    def test_stop_while_connecting_cancels_the_attempt(self) -> None:
        client = self.start()
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.successResultOf(client.stopService())
        self.clock.advance(3600)
        self.assertEqual(self.events.states(), ["connecting"])

    def test_stop_while_registered_closes_cleanly(self) -> None:
        client = self.start()
        pump = self.accept_tcp()
        stopped = client.stopService()
        self.assertNoResult(stopped)
        pump.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.relay.closes, [1000])
        self.assertEqual(self.events.states(), ["connecting", "connected", "disconnected"])
        self.assertEqual(self.events.of("disconnected", "code"), [1000])
        self.clock.advance(3600)
        self.assertEqual(self.clock.tcpClients, [])

    def test_stop_drops_a_relay_that_does_not_answer_the_close(self) -> None:
        client = self.start()
        pump = self.accept_tcp()
        stopped = client.stopService()
        pump.clientIO.getOutBuffer()  # the close frame is lost: the relay hears nothing
        self.clock.advance(6)  # closeHandshakeTimeout (5 s), in Autobahn's 0.2 s timer buckets
        pump.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.events.states(), ["connecting", "connected", "disconnected"])

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
    """The tunnel client against a real socket that refuses every upgrade."""

    timeout = 30

    async def test_refused_upgrades_back_off_instead_of_hammering(self) -> None:
        """Only a completed registration resets the backoff: TCP connects that end in a
        refused upgrade count as failures (plain ClientService would retry at a fixed rate)."""
        site = _RefusesUpgrades()
        port = await listen(self, site)
        client = TunnelClient(reactor, f"http://127.0.0.1:{port}", "token", None, Site(Resource()),
                              EventLog(None), lambda url: None,
                              backoff=Backoff(initial=0.05, factor=2, cap=10, jitter=0))
        client.startService()
        self.addCleanup(client.stopService)
        await sleep(1.2)  # the thing under test: how many attempts fit in this window, and their spacing
        gaps = [b - a for a, b in zip(site.attempts, site.attempts[1:])]
        self.assertGreaterEqual(len(site.attempts), 3)
        self.assertLessEqual(len(site.attempts), 6, site.attempts)
        for earlier, later in zip(gaps, gaps[1:]):
            self.assertGreater(later, earlier * 1.5, gaps)
        self.assertEqual(client.state, "reconnecting")


class Terminal(ProcessProtocol):
    """A child process on a pseudo-terminal: what it printed, and a Deferred for what it has yet to."""

    def __init__(self) -> None:
        self.output = ""
        self.ended: Deferred[None] = Deferred()
        self._waiting: list[tuple[str, Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode(errors="replace")
        ready = [d for needle, d in self._waiting if needle in self.output]
        self._waiting = [(needle, d) for needle, d in self._waiting if needle not in self.output]
        for d in ready:
            d.callback(None)

    def seen(self, needle: str, timeout: float = 20.0) -> Deferred[None]:
        if needle in self.output:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((needle, d))
        return d.addTimeout(timeout, reactor, onTimeoutCancel=lambda _, seconds: Failure(AssertionError(
            f"{needle!r} not seen within {seconds} s:\n{self.output}")))

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class RegistrationOutcomeTests(TestCase):
    """How a real gateway process ends a registration: refused, one name taken, a choice asked or explained."""

    timeout = 60

    def start(self, *relay_args: str) -> int:
        _, port = start_relay(self, "localhost", *relay_args)
        return port

    def gateway_args(self, port: int, *args: str) -> list[str]:
        return twist("mcpr", "--mcp", "http://127.0.0.1:1/mcp", "--listen", "tcp:0:interface=127.0.0.1",
                     "--relay-url", f"http://127.0.0.1:{port}", *args)

    def gateway(self, port: int, *args: str, token: str) -> Process:
        return Process(self, self.gateway_args(port, *args), name="gateway", env={"MCPR_TUNNEL_TOKEN": token})

    async def test_bad_token_stops_the_loop_and_keeps_serving_locally(self) -> None:
        port = self.start("--static-token", "good:team-*")
        gateway = self.gateway(port, "--subdomain", "team-a", token="bad")
        await gateway.line("tunnel stopped")
        self.assertIn("the relay refused the tunnel token (4001 invalid token)", gateway.output())
        await sleep(1.0)  # the thing under test: no second attempt follows
        self.assertEqual(gateway.output().count("connecting to"), 1)
        self.assertIsNone(gateway.popen.poll())

    async def test_single_concrete_pattern_is_taken(self) -> None:
        port = self.start("--static-token", "solo-token:solo")
        gateway = self.gateway(port, token="solo-token")
        line = await gateway.line("Tunnel: ")
        self.assertRegex(line, r"Tunnel: https://solo\.localhost$")

    async def test_several_patterns_on_a_terminal_are_asked_for(self) -> None:
        """Under `twist`, on a real pty: the question shows before anyone types, and the person may
        take longer than the relay's registration timeout (1 s here) without a 1008."""
        relay, port = start_relay(self, "localhost", "--static-token", "tty-token:alpha-*,beta",
                                  "--registration-timeout", "1")
        terminal = Terminal()
        args = self.gateway_args(port)
        child = reactor.spawnProcess(terminal, args[0], args, env={**os.environ, "MCPR_TUNNEL_TOKEN": "tty-token"},
                                     usePTY=True)

        def stop() -> Deferred[None]:
            if not terminal.ended.called:
                child.signalProcess("TERM")
            return terminal.ended

        self.addCleanup(stop)
        await terminal.seen("The relay offers the subdomains alpha-*, beta for this token")
        await terminal.seen("Subdomain to use: ")  # the prompt, with no newline after it
        child.write(b"gamma\n")  # matches no offered pattern: asked again
        await terminal.seen("'gamma' does not match any of: alpha-*, beta\r\nSubdomain to use: ")
        await sleep(2.5)  # longer than the relay's registration timeout
        child.write(b"alpha-dev\n")
        await terminal.seen("Tunnel: ")
        self.assertIn("Tunnel: https://alpha-dev.localhost", terminal.output)
        self.assertIn("registering the subdomain alpha-dev (to skip the question next time: --subdomain alpha-dev)",
                      terminal.output)
        for where in (terminal.output, relay.output()):
            self.assertNotIn("1008", where)
            self.assertNotIn("registration timeout", where)
        self.assertEqual(terminal.output.count("connecting to"), 2)  # the offer's socket, then the pick's

    async def test_several_patterns_without_a_terminal_say_how_to_choose(self) -> None:
        port = self.start("--static-token", "many-token:alpha-*,beta")
        gateway = self.gateway(port, token="many-token")
        await gateway.line("tunnel stopped")
        self.assertTrue(re.search(r"offers the subdomains alpha-\*, beta; choose one with --subdomain NAME",
                                  gateway.output()), gateway.output())
