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
    then happy eyeballs across its addresses), and then straight to the address that connection
    reached.

    - Connects that start while the first resolution is under way wait for its address rather
      than resolve again each: a burst of requests is what opens many connections at once.
    - After `REMEMBER` seconds one connect resolves again while the others keep to the address
      known until then, so a name that moves is followed without stalling a burst.
    - A connect to a remembered address that fails forgets it and goes through
      `HostnameEndpoint` again: the name may have moved, or another of its addresses may be the
      one that answers now.  A first resolution that fails fails its waiters alike; a refresh
      that fails falls back to the address known so far.
    """

    def __init__(self, reactor: Any, host: str, port: int, *, timeout: float) -> None:
        self._reactor = reactor
        self._port = port
        self._timeout = timeout
        self._literal = isIPAddress(host) or isIPv6Address(host)
        self._address: str | None = host if self._literal else None
        self._until = math.inf if self._literal else 0.0
        self._resolving = None if self._literal else HostnameEndpoint(reactor, host, port, timeout=timeout)
        self._under_way = False  # a connect through HostnameEndpoint has not ended yet
        self._waiting: list[Deferred[str | None]] = []  # connects waiting for the first address

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        address = self._address
        if address is None:
            if self._under_way:
                waiting: Deferred[str | None] = Deferred(self._waiting.remove)
                self._waiting.append(waiting)
                return waiting.addCallback(self._after, protocolFactory)
            return self._resolve(protocolFactory)
        if self._reactor.seconds() >= self._until and not self._under_way:
            return self._resolve(protocolFactory)
        return self._direct(address, protocolFactory)

    def _after(self, address: str | None, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """A waiter's connect, once the first one ended: to its address, or (None: it reached one
        that is not remembered) through HostnameEndpoint."""
        return self._direct(address, factory) if address is not None else self._resolve(factory)

    def _direct(self, address: str, factory: IProtocolFactory) -> Deferred[IProtocol]:
        family = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        connecting = family(self._reactor, address, self._port, timeout=self._timeout).connect(factory)
        if not self._literal:
            connecting.addErrback(self._again, factory, address)
        return connecting

    def _resolve(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        assert self._resolving is not None
        self._under_way = True
        return self._resolving.connect(factory).addCallbacks(self._reached, self._unreached,
                                                             errbackArgs=(factory,))

    def _reached(self, protocol: IProtocol) -> IProtocol:
        self._under_way = False
        peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
        # A link-local IPv6 address needs its scope, which getPeer gives apart: not remembered.
        if isinstance(peer, IPv4Address) or (isinstance(peer, IPv6Address) and not peer.scopeID):
            self._address, self._until = peer.host, self._reactor.seconds() + REMEMBER
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(self._address)
        return protocol

    def _unreached(self, failure: Failure, factory: IProtocolFactory) -> Deferred[IProtocol] | Failure:
        self._under_way = False
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(failure)
        address = self._address
        if address is None or failure.check(CancelledError):
            return failure
        # A refresh that failed (the name no longer resolves, or its new address refuses): the
        # address known so far may still answer, and is kept a while longer.
        self._until = self._reactor.seconds() + REMEMBER
        return self._direct(address, factory)

    def _again(self, failure: Failure, factory: IProtocolFactory, address: str) -> Deferred[IProtocol] | Failure:
        if failure.check(CancelledError):
            return failure
        if self._address == address:
            self._address = None
        return self._resolve(factory)
