"""The gateway's end of an HTTP/2 tunnel: Twisted's own HTTP/2 server over WebSocket messages.

Tunnel streams are served by twisted.web's `H2Connection` and the same
`ProxyResource` as direct mode, so routing, sessions, events and CSP are
identical and there is no loopback HTTP hop.  All it needs is a transport
whose writes become binary WebSocket messages.
"""

from __future__ import annotations

from typing import Iterable

from autobahn.twisted.websocket import WebSocketClientProtocol
from h2.settings import SettingCodes, Settings
from twisted.internet.interfaces import IAddress, IConsumer, IProducer, IProtocol, IReactorTime, ITransport
from twisted.web._http2 import H2Connection  # private: see serve_streams
from twisted.web.server import Site
from zope.interface import implementer

from mcpr.common import protocol as wire


@implementer(ITransport, IConsumer)
class MessageTransport:
    """An ITransport over a WebSocket: the HTTP/2 byte stream, cut into binary messages.

    No producer is registered on the socket: the relay's HTTP/2 windows
    already bound what the gateway may send (CONNECTION_WINDOW), and a paused
    H2Connection buffers its WINDOW_UPDATEs and aborts the whole tunnel once
    17 KiB of them pile up, which a large upload in the other direction does.
    """

    disconnecting = False

    def __init__(self, websocket: WebSocketClientProtocol) -> None:
        self._ws = websocket

    def write(self, data: bytes) -> None:
        if data and not self.disconnecting:
            for part in wire.split(data):
                self._ws.sendMessage(part, isBinary=True)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._ws.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._ws.dropConnection(abort=True)

    def getPeer(self) -> IAddress:
        assert self._ws.transport is not None
        return self._ws.transport.getPeer()

    def getHost(self) -> IAddress:
        assert self._ws.transport is not None
        return self._ws.transport.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def serve_streams(websocket: WebSocketClientProtocol, site: Site, reactor: IReactorTime) -> IProtocol:
    """An HTTP/2 server connection for `site`, writing into `websocket`.

    Feed it with `dataReceived`; `connectionLost` ends every stream, whose
    requests then see their client leave.
    """
    # Private Twisted API, on purpose and only here (checked against Twisted 26.10):
    # twisted.web has no public HTTP/2 server connection.  Its only public road
    # to `twisted.web._http2.H2Connection` is the channel `Site.buildProtocol`
    # makes, on a transport whose `negotiatedProtocol` (ALPN) is h2: that channel
    # swaps in an H2Connection, wires it to the site with the same attributes
    # as below (twisted/web/http.py, `_GenericHTTPChannelProtocol.dataReceived`)
    # and connects it at once, so h2's default settings (100 streams, 64 KiB
    # windows) go out before anyone can change them.  So the connection is built
    # here, and our settings are put on its h2 state machine (`conn`, driven
    # through the `h2` library's public API) before `makeConnection` sends the
    # preface.
    connection = H2Connection(reactor)
    # The relay multiplexes every public request of this gateway onto one
    # connection: allow more concurrent streams than h2's default 100 (the
    # relay's per-tunnel in-flight cap is 256 by default and queues beyond this).
    # Larger windows for request bodies too, as the relay grants for responses.
    connection.conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: wire.MAX_STREAMS,
        SettingCodes.INITIAL_WINDOW_SIZE: wire.STREAM_WINDOW,
    })
    connection.requestFactory = site.requestFactory  # type: ignore[attr-defined]
    connection.site = site  # type: ignore[assignment]
    connection.factory = site  # type: ignore[assignment]
    connection.timeOut = None  # liveness is the WebSocket pings' job; SSE streams may idle for hours
    transport = MessageTransport(websocket)
    connection.makeConnection(transport)
    connection.conn.increment_flow_control_window(wire.CONNECTION_WINDOW - 65535)  # from h2's default
    transport.write(connection.conn.data_to_send())
    return connection
