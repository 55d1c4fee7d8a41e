"""The gateway's pooled sockets over in-memory transports: the upgrade, the site behind it, and how
refusals and closes are retried."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from mcpr.common.web import CappedSite
from mcpr.gateway.pool import RETRY_FIRST, SHORT_LIVED, LanePool

SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: mcpr-pool\r\n\r\n"


class Hello(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"via":"' + request.channel.site.via.encode() + b'","body":' + request.content.read() + b"}"


class Endpoint:
    """Connects each protocol to a fresh StringTransport, or fails while `refusing`."""

    def __init__(self) -> None:
        self.connected: list[tuple[Any, StringTransport]] = []
        self.refusing = False
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.refusing:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connected.append((protocol, transport))
        return succeed(protocol)


REQUEST = b"POST /mcp HTTP/1.1\r\nHost: a.relay.test\r\nContent-Length: 2\r\n\r\n{}"


class LanePoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        site = CappedSite(Hello(), max_request_body=1024, via="tunnel", reactor=self.clock)
        self.pool = LanePool(self.clock, self.endpoint, host="relay.test:8080", path="/_tunnel/pool",
                             subdomain="a", key="k" * 43, size=3, site=site)
        self.logs: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    def told(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.logs
                if e.get("log_namespace") == "mcpr.gateway.pool" and e.get("log_level") == level]

    def retry_delay(self) -> float:
        (call,) = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    def test_each_socket_asks_for_the_upgrade_with_the_key(self) -> None:
        self.pool.start()
        self.assertEqual(len(self.endpoint.connected), 3)
        _, transport = self.endpoint.connected[0]
        self.assertEqual(transport.value(), (
            b"GET /_tunnel/pool HTTP/1.1\r\nHost: relay.test:8080\r\nConnection: Upgrade\r\n"
            b"Upgrade: mcpr-pool\r\nx-mcpr-pool: a " + b"k" * 43 + b"\r\n\r\n"))

    def test_once_upgraded_the_site_answers_on_the_socket(self) -> None:
        self.pool.start()
        socket, transport = self.endpoint.connected[0]
        transport.clear()
        request = b"POST /mcp HTTP/1.1\r\nHost: a.relay.test\r\nContent-Length: 2\r\n\r\n{}"
        socket.dataReceived(SWITCHING + request)  # the first request may come with the 101
        self.assertIsNotNone(socket.opened_at, "the relay took it")
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertTrue(answer.endswith(b'{"via":"tunnel","body":{}}'))
        transport.clear()
        socket.dataReceived(request)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), "kept alive for the next one")

    def test_a_refusal_is_retried_later_not_in_a_loop(self) -> None:
        self.pool.start()
        for socket, transport in self.endpoint.connected:
            socket.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            self.assertTrue(transport.disconnecting)
            socket.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.endpoint.attempts, 3, "nothing retried at once")
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(self.endpoint.attempts, 6, "one retry for the three")

    def test_failed_connects_back_off(self) -> None:
        self.endpoint.refusing = True
        self.pool.start()
        delays = []
        for _ in range(4):
            before = self.clock.seconds()
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - before)
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST, 8 * RETRY_FIRST])
        self.endpoint.refusing = False
        self.clock.advance(16 * RETRY_FIRST)
        self.assertEqual(len(self.endpoint.connected), 3)

    def test_a_socket_that_lived_is_replaced_at_once(self) -> None:
        self.pool.start()
        socket, _ = self.endpoint.connected[0]
        socket.dataReceived(SWITCHING)
        self.clock.advance(SHORT_LIVED + 1)
        socket.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.endpoint.connected), 4)

    def test_one_closed_at_once_waits(self) -> None:
        self.pool.start()
        socket, _ = self.endpoint.connected[0]
        socket.dataReceived(SWITCHING)
        socket.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.endpoint.connected), 3)
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(len(self.endpoint.connected), 4)

    def test_an_answer_that_never_ends_is_not_kept(self) -> None:
        self.pool.start()
        socket, transport = self.endpoint.connected[0]
        socket.dataReceived(b"HTTP/1.1 101 ok\r\n" + b"x" * 9000)
        self.assertTrue(transport.disconnecting)

    def test_stop_closes_every_socket_and_the_retry(self) -> None:
        self.pool.start()
        socket, _ = self.endpoint.connected[0]
        socket.dataReceived(b"HTTP/1.1 429 Too Many\r\n\r\n")
        self.pool.stop()
        self.assertTrue(all(transport.disconnecting for _, transport in self.endpoint.connected))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_relay_asks_for_more_within_the_limit(self) -> None:
        site = CappedSite(Hello(), max_request_body=1024, via="tunnel", reactor=self.clock)
        pool = LanePool(self.clock, self.endpoint, host="relay.test", path="/_tunnel/pool", subdomain="a",
                        key="k" * 43, size=2, limit=5, site=site)
        pool.start()
        self.assertEqual(len(self.endpoint.connected), 2)
        pool.grow(4)
        self.assertEqual(len(self.endpoint.connected), 4)
        pool.grow(1000)
        self.assertEqual(len(self.endpoint.connected), 5, "never beyond its own limit")
        pool.grow(3)
        self.assertEqual(len(self.endpoint.connected), 5, "asking for fewer closes none")

    def test_a_socket_closed_after_its_request_is_replaced_at_once_and_quietly(self) -> None:
        # A public client that leaves mid-request makes the relay abort the pooled socket carrying
        # it, however young: that is load, not a relay refusing the pool.
        self.pool.start()
        socket, _ = self.endpoint.connected[0]
        socket.dataReceived(SWITCHING + REQUEST)
        self.clock.advance(0.1)
        socket.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.endpoint.connected), 4, "another opened at once")
        self.assertEqual(self.clock.getDelayedCalls(), [], "no backoff")
        self.assertEqual(self.told(LogLevel.warn) + self.told(LogLevel.info), [])

    def test_a_relay_that_drops_every_socket_after_the_101_is_backed_off_and_warned_of_once(self) -> None:
        self.pool.start()
        delays = []
        for _ in range(5):
            for socket, _ in self.endpoint.connected[-3:]:
                socket.dataReceived(SWITCHING)
            for socket, _ in self.endpoint.connected[-3:]:
                socket.connectionLost(Failure(ConnectionLost()))
            delays.append(self.retry_delay())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [RETRY_FIRST * 2 ** n for n in range(5)], "a 101 alone does not reset it")
        self.assertEqual(len(self.told(LogLevel.warn)), 1, self.told(LogLevel.warn))
        self.assertEqual(len(self.told(LogLevel.info)), 1, "the first failure, before the retry told more")

    def test_a_failure_the_retry_cures_is_no_warning(self) -> None:
        self.pool.start()
        socket, _ = self.endpoint.connected[0]
        socket.dataReceived(SWITCHING)
        socket.connectionLost(Failure(ConnectionLost()))  # e.g. the tunnel closing at the relay
        self.clock.advance(RETRY_FIRST)
        socket, _ = self.endpoint.connected[3]
        socket.dataReceived(SWITCHING + REQUEST)
        self.assertEqual(self.told(LogLevel.warn), [])
        (info,) = self.told(LogLevel.info)
        self.assertIn("before sending a request", info)

    def test_a_socket_that_lives_after_failures_resets_the_backoff(self) -> None:
        self.pool.start()
        for _ in range(3):
            socket, _ = self.endpoint.connected[-1]
            socket.dataReceived(SWITCHING)
            socket.connectionLost(Failure(ConnectionLost()))
            self.clock.advance(self.retry_delay())
        self.assertIn("before sending a request", "".join(self.told(LogLevel.warn)))
        socket, _ = self.endpoint.connected[-1]
        socket.dataReceived(SWITCHING)
        self.clock.advance(SHORT_LIVED)  # it stayed, idle: the relay keeps the pool after all
        self.assertEqual(self.told(LogLevel.info)[-1], "tunnel: pooled sockets open again")
        other, _ = self.endpoint.connected[0]  # never answered until now
        other.dataReceived(SWITCHING)
        other.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.retry_delay(), RETRY_FIRST)
