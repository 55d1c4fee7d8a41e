"""Connections to the upstream: TCP (TLS on top for https) with the options a small exchange
needs: Nagle off and reads acknowledged at once; either missing costs ~40 ms.  The TCP part is
`mcpr.common.host_endpoint`'s, which resolves a host name once in a while, not per connect.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mcpr.common.web import no_delay

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def quick_ack(transport: Any) -> None:
    """Acknowledge at once (Linux).  An upstream that writes its headers and body
    separately without TCP_NODELAY (uvicorn+h11 does) holds the body until our
    ACK, and on a kept-alive connection the kernel delays that ACK by ~40 ms.
    The flag resets itself, so it is set again after every read."""
    handle = getattr(transport, "getHandle", None)
    if _QUICKACK is None or handle is None:
        return
    try:
        handle().setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except (OSError, AttributeError):
        pass


class _QuickAck(ProtocolWrapper):
    """Sits on the TCP connection, under TLS if any, to see every read the socket gives.

    Only a read that leaves an answer unfinished is acknowledged at once: the
    upstream is waiting for that ACK only if it has more to send, and the
    system call on every read was 2.6 % of a small request's CPU.
    """

    reader: Any = None
    """The protocol that reads the answers (set once connected), if it can tell it waits for more."""

    def dataReceived(self, data: bytes) -> None:
        self.wrappedProtocol.dataReceived(data)
        if getattr(self.reader, "exchange", True) is not None:
            quick_ack(self.transport)


class _QuickAckFactory(WrappingFactory):
    protocol = _QuickAck
    noisy = False


@implementer(IStreamClientEndpoint)
class UpstreamEndpoint:
    """TCP to one upstream (TLS on top for https) with Nagle off and reads acknowledged at once.

    Either alone costs ~40 ms on a small exchange (see `no_delay` and
    `quick_ack`).  The options go to the TCP transport itself, not through
    TLS, whose handle is not a socket; the caller gets its own protocol back.
    """

    def __init__(self, tcp: IStreamClientEndpoint, tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        self._tcp = tcp
        self._tls = tls

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = protocolFactory if self._tls is None else TLSMemoryBIOFactory(self._tls, True, protocolFactory)
        return self._tcp.connect(_QuickAckFactory(factory)).addCallback(self._opened)

    def _opened(self, connection: IProtocol) -> IProtocol:
        # Twisted buffers writes until the reactor's next turn: Nagle is off
        # before the first byte (of the TLS handshake or the request) leaves.
        assert isinstance(connection, _QuickAck)
        no_delay(connection.transport)
        protocol: Any = connection.wrappedProtocol
        inner = protocol if self._tls is None else protocol.wrappedProtocol
        connection.reader = inner
        return inner
