"""The HTTP/1.1 front in memory: the body cap, the request-head rules, deadlines, refusals that
linger, and the connection caps."""

from __future__ import annotations

import weakref

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport, ITransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import directlyProvides, implementer

from mcpr.common import web
from mcpr.common.web import (
    CappedSite,
    ChannelTimeouts,
    ConnectionLimits,
    Refusal,
    TrustedProxies,
    check_framing,
    peer_key,
    request_target,
)


class Echo(Resource):
    """Answers with what it saw: the method, the path, the Host and the body's size."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        return b"%s %s host=%s got %d" % (request.method, request.uri, request.getHeader(b"host") or b"-", len(body))


class HalfClosing(StringTransport):
    """A TCP-like transport: it can close its write side alone."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class ChannelTestBase(SynchronousTestCase):
    timeouts = ChannelTimeouts()
    limits: ConnectionLimits | None = None

    def setUp(self) -> None:
        self.refused: list = []
        self.reported: list = []
        # A Clock of its own: the channels' timers must not land on the global reactor,
        # where the next trial TestCase would find them and fail as dirty.
        self.clock = Clock()
        self.site = CappedSite(Echo(), max_request_body=100, reactor=self.clock, timeouts=self.timeouts,
                               limits=self.limits,
                               too_large=lambda request, method, path: self.refused.append((method, path)),
                               refused=lambda *report: self.reported.append(report))
        self.transport, self.channel = self.connect()

    def connect(self, addr=None):
        transport = HalfClosing()
        channel = self.site.buildProtocol(addr)
        channel.makeConnection(transport)
        return transport, channel

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def status(self) -> bytes:
        return self.transport.value().split(b"\r\n", 1)[0]


class CapTests(ChannelTestBase):
    def test_declared_length_refused_before_body(self) -> None:
        self.send(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 101\r\n\r\n")
        response = self.transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b'"code": -32600', response)
        self.assertNotIn(b"100 Continue", response)
        self.assertIn(b"\r\nConnection: close\r\n", response)
        self.assertEqual(self.refused, [(b"POST", b"/mcp")])

    def test_chunked_body_refused_when_it_passes_the_cap(self) -> None:
        self.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.send(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.send(b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
        response = self.transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"text/plain", response)
        self.assertEqual(self.refused, [(b"POST", b"/up")])

    def test_body_at_cap_is_served(self) -> None:
        self.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"b" * 100)
        self.assertIn(b"got 100", self.transport.value())
        self.assertEqual(self.refused, [])


class LingeringTests(ChannelTestBase):
    """D13: a refused client that is still writing reads the answer, not a reset."""

    timeouts = ChannelTimeouts(lingering_time=5, lingering_size=1000)

    def test_the_rest_is_read_and_dropped_then_the_connection_closes(self) -> None:
        self.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n")
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "))
        self.assertTrue(self.transport.write_closed)  # FIN after the answer
        self.assertFalse(self.transport.disconnecting)  # but still reading
        self.send(b"x" * 500 + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.transport.value(), answer)  # dropped: nothing else is answered
        self.clock.advance(5)
        self.assertTrue(self.transport.disconnected)

    def test_the_size_bound_ends_it_sooner(self) -> None:
        self.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        self.send(b"x" * 900)
        self.assertFalse(self.transport.disconnected)
        self.send(b"x" * 200)
        self.assertTrue(self.transport.disconnected)

    def test_a_client_that_closes_ends_it(self) -> None:
        self.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeadRuleTests(ChannelTestBase):
    """S2, D8, D9, D10: what cannot be forwarded, or could be read two ways, is refused at the head."""

    def assert_refused(self, request: bytes, status: int) -> bytes:
        transport, channel = self.connect()
        channel.dataReceived(request)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 %d " % status), (request, response[:200]))
        self.assertIn(b"\r\nContent-Length: ", response)
        self.assertNotIn(b" got ", response)
        return response

    def test_targets_and_methods(self) -> None:
        response = self.assert_refused(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405)
        self.assertIn(b"\r\nAllow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n", response)
        self.assert_refused(b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405)
        self.assert_refused(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"GET foo HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"GET example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"GET http://u@x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"GET / b HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assert_refused(b"G:T / HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        for byte in (0x7F, 0x80, 0xB0, 0xFF):
            self.assert_refused(b"GET /" + bytes([byte]) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400)

    def test_fields(self) -> None:
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
        self.assert_refused(b"GET / HTTP/1.1\r\n\r\n", 400)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", 400)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", 400)

    def test_framing(self) -> None:
        te = b"POST / HTTP/1.1\r\nHost: x\r\n"
        self.assert_refused(te + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)
        self.assert_refused(te + b"Transfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc", 400)
        self.assert_refused(te + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400)
        self.assert_refused(te + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400)
        self.assert_refused(te + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400)
        self.assert_refused(te + b"Content-Length: +3\r\n\r\nabc", 400)
        self.assert_refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)

    def test_sizes(self) -> None:
        self.assert_refused(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414)
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431)
        many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 900) for i in range(20))
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n", 431)
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(600))
        self.assert_refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 431)

    def test_a_refusal_is_reported_with_what_arrived(self) -> None:
        self.assert_refused(b"GET /p?secret=1 HTTP/1.1\r\nHost: a.example\r\nHost: b\r\n\r\n", 400)
        self.assertEqual(self.reported, [(400, b"GET", b"/p?secret=1", b"a.example", "more than one Host header")])

    def test_a_json_request_is_refused_in_json_rpc(self) -> None:
        response = self.assert_refused(b"POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 2\r\n\r\n{}", 400)
        self.assertIn(b'"code": -32600', response)

    def test_absolute_form_names_the_host(self) -> None:
        self.send(b"GET HTTP://Other.Example:8080?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"GET /?q=1 host=Other.Example:8080 got 0", self.transport.value())

    def test_close_among_other_connection_tokens(self) -> None:
        self.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: te, close\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_valid_requests_pass(self) -> None:
        for request in (b"PROPFIND /a%20b?x=1&y=%7F HTTP/1.1\r\nHost: [::1]:80\r\nX-A: caf\xc3\xa9\tok\r\n\r\n",
                        b"GET / HTTP/1.0\r\n\r\n",
                        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                        b"OPTIONS /x HTTP/1.1\r\nHost: \r\n\r\n"):
            transport, channel = self.connect()
            channel.dataReceived(request)
            self.assertIn(b" got ", transport.value(), request)


class RuleFunctionTests(SynchronousTestCase):
    def test_request_target(self) -> None:
        self.assertEqual(request_target(b"GET", b"/a?b"), (b"/a?b", None))
        self.assertEqual(request_target(b"GET", b"https://h:1"), (b"/", b"h:1"))
        self.assertEqual(request_target(b"GET", b"http://h/p?q"), (b"/p?q", b"h"))
        for method, target in ((b"GET", b"http://h#f"), (b"GET", b"http:///p"), (b"CONNECT", b"/")):
            self.assertRaises(Refusal, request_target, method, target)

    def test_framing(self) -> None:
        check_framing(b"HTTP/1.0", Headers())
        self.assertRaises(Refusal, check_framing, b"HTTP/1.1", Headers())


class HeaderDeadlineTests(ChannelTestBase):
    """D1: the head has a deadline that trickled bytes do not move."""

    timeouts = ChannelTimeouts(header=10, body=10, min_body_rate=100)

    def test_a_trickled_head_gets_408(self) -> None:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            self.send(bytes([byte]))
            self.clock.advance(0.3)
            if self.transport.value():
                break
        self.assertAlmostEqual(self.clock.seconds(), 10.2)
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")
        self.assertEqual(self.reported[0][:2], (408, b"GET"))

    def test_an_idle_connection_closes_silently(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_the_deadline_starts_again_for_the_next_request(self) -> None:
        self.clock.advance(9)
        self.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"got 0", self.transport.value())
        self.clock.advance(9)
        self.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"GET /2", self.transport.value())
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)


class TakeOver(Resource):
    """Takes the transport over, as Autobahn's WebSocketResource does for an upgrade, and as the
    relay's registration socket then does, registers a producer of its own (`_guard_socket`)."""

    isLeaf = True

    def render(self, request):
        transport, request.channel.transport = request.channel.transport, None
        transport.protocol = None
        transport.unregisterProducer()
        return NOT_DONE_YET


class TakenOverTests(ChannelTestBase):
    """A channel whose transport a resource took over lets go of itself at once: its head timer
    and the upgraded request would otherwise keep it and its buffers alive (for every tunnel)."""

    timeouts = ChannelTimeouts(header=10)

    def test_the_channel_lets_go(self) -> None:
        self.site.resource = TakeOver()
        self.send(b"GET /_tunnel/register HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [], "the head timer went")
        channel = weakref.ref(self.channel)
        del self.channel
        self.assertIsNone(channel(), "the channel and its request are not kept")


class BodyDeadlineTests(ChannelTestBase):
    timeouts = ChannelTimeouts(header=10, body=2, min_body_rate=10)

    def start(self, length: int = 100) -> None:
        self.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)

    def test_a_pause_longer_than_the_body_timeout_is_408(self) -> None:
        self.start()
        self.send(b"x" * 30)
        self.clock.advance(1.9)
        self.send(b"x" * 30)
        self.clock.advance(1.9)
        self.assertEqual(self.transport.value(), b"")
        self.clock.pump([0.5] * 8)
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")

    def test_a_body_below_the_minimum_rate_is_408(self) -> None:
        self.start()
        for _ in range(30):  # 1 byte every 0.5 s: never a long pause, but 2 B/s
            self.send(b"x")
            self.clock.advance(0.5)
            if self.transport.value():
                break
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")
        self.assertLess(self.clock.seconds(), 10)

    def test_a_body_at_the_rate_is_served(self) -> None:
        self.start()
        for _ in range(10):  # 10 B/s
            self.send(b"x" * 10)
            self.clock.advance(1)
        self.assertIn(b"got 100", self.transport.value())


class ConnectionCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = ConnectionLimits(total=4, per_peer=2)
        self.site = CappedSite(Echo(), max_request_body=100, reactor=self.clock, limits=self.limits,
                               trusted=TrustedProxies(["10.9.0.0/16"]), timeouts=ChannelTimeouts(header=30))

    def connect(self, host: str) -> StringTransport:
        transport = StringTransport()
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 1234)
        transport.protocol = self.site.buildProtocol(address)
        transport.protocol.makeConnection(transport)
        return transport

    def test_per_peer(self) -> None:
        first, second, third = (self.connect("10.0.0.1") for _ in range(3))
        self.assertFalse(first.disconnecting or second.disconnecting)
        self.assertTrue(third.disconnected)  # dropped at once, nothing written
        self.assertEqual(third.value(), b"")
        self.assertFalse(self.connect("10.0.0.2").disconnecting)

    def test_trusted_proxies_are_not_capped_per_peer(self) -> None:
        transports = [self.connect("10.9.1.1") for _ in range(4)]
        self.assertFalse(any(t.disconnecting for t in transports))

    def test_ipv6_counts_by_64(self) -> None:
        self.assertEqual(peer_key("2001:db8:1:2:3::4"), "2001:db8:1:2::/64")
        self.assertEqual(peer_key("::ffff:10.0.0.1"), "10.0.0.1")
        self.connect("2001:db8::1")
        self.connect("2001:db8::2")
        self.assertTrue(self.connect("2001:db8::3").disconnected)

    def test_at_the_total_cap_the_oldest_idle_connection_makes_room(self) -> None:
        idle = [self.connect(f"10.0.0.{i}") for i in range(1, 4)]
        busy = self.connect("10.0.0.4")
        self.site_request(busy)
        newcomer = self.connect("10.0.0.5")
        self.assertTrue(idle[0].disconnected)
        self.assertFalse(newcomer.disconnecting or busy.disconnecting or idle[1].disconnecting)

    def site_request(self, transport: StringTransport) -> None:
        transport.protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")

    def test_with_none_idle_the_new_one_is_dropped(self) -> None:
        for i in range(4):
            self.site_request(self.connect(f"10.0.0.{i}"))
        self.assertTrue(self.connect("10.0.0.9").disconnected)

    def test_tls_is_seen_through_the_counting_wrapper_but_not_claimed_by_it(self) -> None:
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        wrapper = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        wrapper.makeConnection(transport)
        self.assertTrue(wrapper.wrappedProtocol.isSecure())
        self.assertFalse(ISSLTransport.providedBy(wrapper))  # Autobahn would want Twisted's TLS protocol

    def test_a_tls_transport_class_is_seen_through_every_wrapper_alike(self) -> None:
        """The declaration less ISSLTransport is worked out once per transport class."""
        wrappers = []
        for i in range(2):
            wrapper = self.site.buildProtocol(IPv4Address("TCP", f"10.0.0.{i}", 1))
            wrapper.makeConnection(_TLSTransport())
            wrappers.append(wrapper)
        for wrapper in wrappers:
            self.assertTrue(wrapper.wrappedProtocol.isSecure())
            self.assertFalse(ISSLTransport.providedBy(wrapper))
            self.assertTrue(ITransport.providedBy(wrapper))
        self.assertIs(web._without_tls(_TLSTransport()), web._without_tls(_TLSTransport()))

    def test_closed_connections_free_their_place(self) -> None:
        transports = [self.connect("10.0.0.1") for _ in range(2)]
        for t in transports:
            t.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.open, 0)
        self.assertFalse(self.connect("10.0.0.1").disconnecting)


@implementer(ISSLTransport)
class _TLSTransport(StringTransport):
    """A transport whose class (not the instance) declares TLS, as Twisted's TLS protocol does."""


class ContentTypeParseTests(SynchronousTestCase):
    """twisted.web's form parsing (through the email package) is skipped for non-form POSTs, and
    the resource still sees the request's Content-Type; forms are still parsed."""

    def render(self, body: bytes, content_type: bytes) -> dict:
        seen: dict = {}

        class Probe(Resource):
            isLeaf = True

            def render_POST(self, request):
                seen["type"] = request.getHeader(b"content-type")
                seen["args"] = dict(request.args)
                return b"ok"

        site = CappedSite(Probe(), max_request_body=1000, reactor=Clock())
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Type: " + content_type
                             + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        return seen

    def test_json_keeps_its_type_and_gets_no_form_parse(self) -> None:
        from twisted.web import http
        calls: list = []
        original = http._parseContentType
        self.patch(http, "_parseContentType", lambda ctype: calls.append(ctype) or original(ctype))
        seen = self.render(b'{"a": 1}', b"application/json")
        self.assertEqual((seen["type"], seen["args"], calls), (b"application/json", {}, []))

    def test_forms_are_still_parsed(self) -> None:
        seen = self.render(b"a=1", b"application/x-www-form-urlencoded")
        self.assertEqual(seen["args"], {b"a": [b"1"]})


class AddressTests(ChannelTestBase):
    """The channel asks its transport for the addresses and for TLS once, not for every request."""

    def test_each_request_sees_the_addresses_asked_once(self) -> None:
        expected = (self.transport.getHost(), self.transport.getPeer(), False)
        asked: list[str] = []
        for name in ("getHost", "getPeer"):
            original = getattr(self.transport, name)
            self.patch(self.transport, name, lambda name=name, original=original: asked.append(name) or original())
        seen = []

        class Where(Resource):
            isLeaf = True

            def render(self, request):
                seen.append((request.getHost(), request.getClientAddress(), request.isSecure()))
                return b"ok"

        self.site.resource = Where()
        for _ in range(3):
            self.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(seen, [expected] * 3)
        self.assertEqual(sorted(asked), ["getHost", "getPeer"])
