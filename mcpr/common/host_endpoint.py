"""TCP to a host and port, resolving a host name once in a while rather than on every connect.

Twisted's `HostnameEndpoint` resolves the host on every connect, through
`getaddrinfo` in the reactor's thread pool (an IP literal included), and
declares a class for each connect.  Kept-alive connections make connects
rare, but a burst of simultaneous requests opens one connection each: in a
burst of 1,000, `HostnameEndpoint` and its resolver thread were 40 % of the
gateway's CPU (docs/PERFORMANCE.md, "The burst").
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

REMEMBER = 30.0
"""Seconds a host name's address is used without resolving it again: long enough that a burst
resolves once, short enough to follow a name that moves."""


@implementer(IStreamClientEndpoint)
class HostEndpoint:
    """TCP to `host`:`port`: an IP literal straight; a name through `HostnameEndpoint` (resolution,
    then happy eyeballs across its addresses), and then, for `REMEMBER` seconds, straight to the
    address that connection reached.  A connect to a remembered address that fails forgets it and
    goes through `HostnameEndpoint` again: the name may have moved, or another of its addresses
    may be the one that answers now."""

    def __init__(self, reactor: Any, host: str, port: int, *, timeout: float) -> None:
        self._reactor = reactor
        self._port = port
        self._timeout = timeout
        self._literal = isIPAddress(host) or isIPv6Address(host)
        self._address: str | None = host if self._literal else None
        self._until = math.inf if self._literal else 0.0
        self._resolving = None if self._literal else HostnameEndpoint(reactor, host, port, timeout=timeout)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        address = self._address
        if address is None or self._reactor.seconds() >= self._until:
            return self._resolve(protocolFactory)
        family = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        connecting = family(self._reactor, address, self._port, timeout=self._timeout).connect(protocolFactory)
        if not self._literal:
            connecting.addErrback(self._again, protocolFactory, address)
        return connecting

    def _resolve(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        assert self._resolving is not None
        return self._resolving.connect(factory).addCallback(self._reached)

    def _reached(self, protocol: IProtocol) -> IProtocol:
        peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
        # A link-local IPv6 address needs its scope, which getPeer gives apart: not remembered.
        if isinstance(peer, IPv4Address) or (isinstance(peer, IPv6Address) and not peer.scopeID):
            self._address, self._until = peer.host, self._reactor.seconds() + REMEMBER
        return protocol

    def _again(self, failure: Failure, factory: IProtocolFactory, address: str) -> Deferred[IProtocol] | Failure:
        if failure.check(CancelledError):
            return failure
        if self._address == address:
            self._address = None
        return self._resolve(factory)
