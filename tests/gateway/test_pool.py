"""The gateway's pooled sockets over in-memory transports: the upgrade, the site behind it, and how
refusals and closes are retried."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
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


class LanePoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        site = CappedSite(Hello(), max_request_body=1024, via="tunnel", reactor=self.clock)
        self.pool = LanePool(self.clock, self.endpoint, host="relay.test:8080", path="/_tunnel/pool",
                             subdomain="a", key="k" * 43, size=3, site=site)

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
