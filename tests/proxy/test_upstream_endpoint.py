"""Upstream connections: Nagle off and reads acknowledged at once, for http and https alike."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mcpr.proxy import upstream_endpoint
from mcpr.proxy.upstream_endpoint import UpstreamEndpoint


class Received(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Socket:
    """What `getHandle()` gives: records the options set on it."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class AnswerReader(Received):
    """Reads one answer's head, as `UpstreamConnection` does: `exchange` is None once it is in."""

    exchange: object = "under way"

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.data.endswith(b"\r\n\r\n"):
            self.exchange = None


class TcpTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.socket = Socket()
        self.no_delay = False

    def getHandle(self) -> Socket:
        return self.socket

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects a factory's protocol to a `TcpTransport` at once, as a TCP endpoint would once connected."""

    def __init__(self) -> None:
        self.transport = TcpTransport()

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


# Linux's TCP_QUICKACK; the fake socket records it on any platform (the tests patch it in).
QUICKACK = upstream_endpoint._QUICKACK or 12


class UpstreamEndpointTests(SynchronousTestCase):
    """UpstreamEndpoint in memory: the socket options it sets, over TCP and TLS."""

    def connect(self, tls=None) -> tuple[MemoryEndpoint, Factory, Received]:
        tcp = MemoryEndpoint()
        factory = Factory.forProtocol(Received)
        protocol = self.successResultOf(UpstreamEndpoint(tcp, tls).connect(factory))
        return tcp, factory, protocol

    def setUp(self) -> None:
        self.patch(upstream_endpoint, "_QUICKACK", QUICKACK)

    def test_without_the_option_nothing_is_set(self) -> None:
        self.patch(upstream_endpoint, "_QUICKACK", None)  # not Linux
        tcp, _, protocol = self.connect()
        tcp.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual((tcp.transport.socket.options, protocol.data), ([], b"HTTP/1.1 200 OK\r\n"))

    def test_nagle_off_and_the_callers_own_protocol_back(self) -> None:
        for tls in (None, optionsForClientTLS("upstream.example")):
            tcp, factory, protocol = self.connect(tls)
            self.assertIsInstance(protocol, Received)
            self.assertTrue(tcp.transport.no_delay)

    def test_every_read_is_acknowledged_at_once_unless_the_reader_says_its_answer_is_in(self) -> None:
        tcp, _, protocol = self.connect()
        quick_ack = (socket.IPPROTO_TCP, QUICKACK, 1)
        for chunk in (b"HTTP/1.1 200 OK\r\n", b"\r\n"):
            tcp.protocol.dataReceived(chunk)
        self.assertEqual(tcp.transport.socket.options, [quick_ack, quick_ack])
        self.assertEqual(protocol.data, b"HTTP/1.1 200 OK\r\n\r\n")

    def test_a_read_that_ends_the_answer_is_not_acknowledged_at_once(self) -> None:
        tcp = MemoryEndpoint()
        self.successResultOf(UpstreamEndpoint(tcp).connect(Factory.forProtocol(AnswerReader)))
        for chunk in (b"HTTP/1.1 200 OK\r\n", b"Content-Length: 0\r\n", b"\r\n"):
            tcp.protocol.dataReceived(chunk)
        self.assertEqual(tcp.transport.socket.options, [(socket.IPPROTO_TCP, QUICKACK, 1)] * 2)

    def test_under_tls_the_tcp_socket_gets_the_option(self) -> None:
        tcp, _, _ = self.connect(optionsForClientTLS("upstream.example"))
        tcp.protocol.dataReceived(b"\x16\x03\x03\x00\x00")  # any bytes: TLS reads them off TCP
        self.assertEqual(tcp.transport.socket.options, [(socket.IPPROTO_TCP, QUICKACK, 1)])


class RealSocketTests(TestCase):
    """UpstreamEndpoint on a real loopback socket, as the kernel sees it."""

    async def test_the_kernel_socket_has_nagle_off(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        protocol = await UpstreamEndpoint(tcp).connect(Factory.forProtocol(Protocol))
        self.addCleanup(protocol.transport.loseConnection)
        self.assertNotEqual(protocol.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
