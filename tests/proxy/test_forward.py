"""The Forwarder: its client, which works out each URL once, against twisted.web's server."""

from __future__ import annotations


from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from mcpr.proxy.forward import Forwarder, UpstreamUnavailable


class EchoHost(Resource):
    isLeaf = True

    def render(self, request):
        return b"%s %s" % (request.getHeader(b"host"), request.uri)


class ForwarderTests(TestCase):
    """The Forwarder's client, which works out each URL once, against twisted.web's server."""

    async def test_host_and_path_as_a_server_reads_them_the_callers_headers_untouched(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(EchoHost()))
        self.addCleanup(port.stopListening)
        forwarder = Forwarder(reactor, headers_timeout=5)
        self.addCleanup(forwarder.close)
        url = b"http://127.0.0.1:%d/mcp?x=1" % port.getHost().port
        headers = [(b"accept", b"application/json")]
        for _ in range(2):  # worked out, then taken from the table
            response = await forwarder.send(b"GET", url, headers, None)
            self.assertEqual(await readBody(response), b"127.0.0.1:%d /mcp?x=1" % port.getHost().port)
        self.assertEqual(headers, [(b"accept", b"application/json")])

    async def test_a_url_that_cannot_be_sent_is_refused(self) -> None:
        forwarder = Forwarder(reactor, headers_timeout=5)
        self.addCleanup(forwarder.close)
        with self.assertRaises(UpstreamUnavailable):
            await forwarder.send(b"GET", b"ftp://127.0.0.1/", [], None)
        with self.assertRaises(ValueError):
            await forwarder.send(b"GET", b"http://127.0.0.1/a b", [], None)
