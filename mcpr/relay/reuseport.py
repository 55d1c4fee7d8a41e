# -*- test-case-name: tests.relay.test_reuseport -*-
"""Several relay processes on one port: a TCP listener with `SO_REUSEPORT`.

A relay process runs on one core (one reactor thread).  To use N cores of a
machine, run N relays on the same public port: with `SO_REUSEPORT` set on each
listening socket before `bind()`, Linux lets them all bind the same address
and port, and spreads incoming connections between them (by a hash of each
connection's addresses and ports).  A process that dies takes only its own
socket out of the group: the others keep accepting.  Only sockets of the same
user may join a group, so another user's process cannot take a share of the
relay's connections.

Only Linux spreads connections that way.  macOS and the BSDs accept the option
but do not balance connections between the sockets (FreeBSD has another
option for that, SO_REUSEPORT_LB), which would leave processes idle without a
word, so elsewhere the endpoint refuses to start (`ValueError`, which the
relay reports as a mistake in its settings).

How the socket is made.  Neither Twisted's TCP endpoints nor `listenTCP` take
socket options on Twisted 26.4, the oldest mcpr supports (setup.cfg); 26.10
adds `tcp.makeBinding(..., reusePort=True)` for `listenTCP`, documented by an
`IReactorTCP2` that no reactor declares yet.  Rather than subclassing
`twisted.internet.tcp.Port` (a module its docstring keeps for the reactors'
own use) to override `createInternetSocket` (documented "internal"), this
module makes, configures, binds and puts in listening state the socket itself
with the standard library, and hands it to the reactor through
`IReactorSocket.adoptStreamPort`: a public interface, the one Twisted's own
`systemd:` endpoint uses for sockets that systemd made.  The reactor then runs
it as any TCP listener (same port class, accept loop and file-descriptor
reserve).  Once every supported Twisted has `makeBinding`, `listenTCP` with a
binding can replace `_bound`.

A listener that closes (a relay stopping, its drain's first step) resets the
connections still waiting in its own accept queue: Linux does not move them to
the other sockets.  The reactor accepts eagerly, so the queue is short or empty.

Endpoint strings: `reuseport:<port>[:interface=][:backlog=]` (the parser
plugin in `twisted/plugins/mcpr_plugins.py` calls `reuseport_endpoint`), and
`sni:<directory>:...:reuseport=yes`, which puts the relay's TLS over a
`ReusePortEndpoint` (`mcpr.relay.tls.sni_endpoint`).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from mcpr.common.service import DEFAULT_BACKLOG


def _check_platform() -> None:
    """Raise ValueError, saying why and what to do, where `SO_REUSEPORT` would not spread connections."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError(f"reuseport needs Linux, whose SO_REUSEPORT spreads connections between processes "
                         f"(this is {sys.platform}): run one relay process per port instead")


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP listener with `SO_REUSEADDR` and `SO_REUSEPORT` set before `bind()`.

    `interface` is an IPv4 or IPv6 address: "" (the default) is every IPv4
    address, as for Twisted's `TCP4ServerEndpoint`; `::` is every IPv6 address
    and, on Linux (unless net.ipv6.bindv6only is set), every IPv4 one too.  A
    port that cannot be bound fails `listen` with `CannotListenError`, as any
    TCP endpoint does; a platform where the option would not spread
    connections fails the constructor with ValueError.
    """

    def __init__(self, reactor: Any, port: int, backlog: int = DEFAULT_BACKLOG, interface: str = "") -> None:
        """`reactor` must provide IReactorSocket (every reactor on Linux does)."""
        _check_platform()
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface
        self._family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        bound = self._bound()
        try:
            port: IListeningPort = self._reactor.adoptStreamPort(bound.fileno(), self._family, factory)
        finally:
            bound.close()  # the reactor listens on a duplicate of the descriptor
        return port

    def _bound(self) -> socket.socket:
        """A non-blocking socket listening on the port, the options set before bind() (they have no
        effect after it)."""
        bound = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's TCP ports do
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            bound.bind(self._address())
            bound.listen(self._backlog)
            bound.setblocking(False)
        except OSError as e:
            bound.close()
            raise CannotListenError(self._interface, self._port, e) from None
        return bound

    def _address(self) -> tuple[Any, ...]:
        if self._family == socket.AF_INET:
            return self._interface, self._port
        # getaddrinfo, not the bare string: it keeps the scope of a link-local address (fe80::1%eth0).
        return socket.getaddrinfo(self._interface, self._port, self._family, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST)[0][4]


def reuseport_endpoint(reactor: Any, *args: str, **kwargs: str) -> ReusePortEndpoint:
    r"""The endpoint of `reuseport:<port>[:interface=][:backlog=]` (the parser plugin's job).

    The options mean what they mean for `tcp:`: the interface defaults to ""
    (every IPv4 address; `interface=\:\:` for IPv6 and IPv4), the backlog to
    `DEFAULT_BACKLOG`.  A malformed description raises ValueError saying what
    is wrong, in one line, as the relay shows it.
    """
    where = "a reuseport: listener"
    unknown = sorted(set(kwargs) - {"port", "interface", "backlog"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in {where}")
    given = [*args, kwargs["port"]] if "port" in kwargs else list(args)
    if args and "port" in kwargs:
        raise ValueError(f"port given twice in {where}")
    if len(given) != 1 or not given[0]:
        raise ValueError("expected reuseport:<port>[:interface=<address>][:backlog=<n>], "
                         "e.g. reuseport:8080:interface=127.0.0.1")
    port = listen_port(given[0], where)
    backlog = listen_backlog(kwargs.get("backlog", str(DEFAULT_BACKLOG)), where)
    return ReusePortEndpoint(reactor, port, backlog, kwargs.get("interface", ""))


def listen_port(value: str, where: str) -> int:
    """A port of an endpoint string, 0 to 65535; ValueError naming `where` (e.g. "a reuseport: listener")."""
    if not value.isdecimal() or int(value) > 65535:
        raise ValueError(f"bad port {value!r} in {where}")
    return int(value)


def listen_backlog(value: str, where: str) -> int:
    """A backlog of an endpoint string, a whole number; ValueError naming `where`."""
    if not value.isdecimal():
        raise ValueError(f"bad backlog {value!r} in {where}")
    return int(value)
