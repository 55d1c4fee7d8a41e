"""The gateway's end of an HTTP/2 tunnel: Twisted's own HTTP/2 server over WebSocket messages.

Tunnel streams are served by twisted.web's `H2Connection` and the same
`ProxyResource` as direct mode, so routing, sessions, events and CSP are
identical and there is no loopback HTTP hop.  All it needs is a transport
whose writes become binary WebSocket messages.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from twisted.web.server import Site
from zope.interface import implementer

from mcpr.tunnel import wire


@implementer(ITransport, IConsumer)
class MessageTransport:
    """An ITransport over a WebSocket: the HTTP/2 byte stream, cut into binary messages.

    Producers are registered on the socket's own TCP transport, so when the
    relay reads slowly, Twisted's HTTP/2 connection stops sending.
    """

    disconnecting = False

    def __init__(self, websocket) -> None:
        self._ws = websocket

    def write(self, data: bytes) -> None:
        if data and not self.disconnecting:
            for part in wire.split(data):
                self._ws.sendMessage(part, isBinary=True)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._ws.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._ws.dropConnection(abort=True)

    def getPeer(self):
        return self._ws.transport.getPeer()

    def getHost(self):
        return self._ws.transport.getHost()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._ws.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._ws.transport.unregisterProducer()


def serve_streams(websocket, site: Site, reactor) -> H2Connection:
    """An HTTP/2 server connection for `site`, writing into `websocket`; feed it with `dataReceived`."""
    connection = H2Connection(reactor)
    connection.site = site
    connection.factory = site
    connection.requestFactory = site.requestFactory
    connection.timeOut = None  # liveness is the WebSocket pings' job; SSE streams may idle for hours
    connection.makeConnection(MessageTransport(websocket))
    return connection


def stop_streams(connection: H2Connection, reason: Failure) -> None:
    """The socket is gone: every stream's request sees its client leave, so upstream calls are cancelled."""
    connection.connectionLost(reason)
