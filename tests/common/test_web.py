"""Oversized request bodies are refused while they arrive, not after."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from mcpr.common.web import CappedSite


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request):
        return b"got %d" % len(request.content.read())


class CapTests(SynchronousTestCase):
    """CappedSite's body cap, over an in-memory connection."""

    def setUp(self) -> None:
        self.refused: list = []
        # A Clock of its own: the channels' idle timeouts must not land on the global reactor,
        # where the next trial TestCase would find them and fail as dirty.
        self.site = CappedSite(Echo(), max_request_body=100, reactor=Clock(),
                              too_large=lambda request, method, path: self.refused.append((method, path)))
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def test_declared_length_refused_before_body(self) -> None:
        self.send(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n")
        response = self.transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b'"code": -32600', response)
        self.assertTrue(self.transport.disconnecting)
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
