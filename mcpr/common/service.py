"""The services both daemons run beside their own: listeners that say where, and SIGHUP.

Listeners are Twisted's own `strports.service` (a port that cannot be bound at
start makes `twist` fail at once instead of running without a listener), plus
one log line with the bound address: tests and users both need it, since
`tcp:0` picks a free port.

`twist` leaves SIGHUP at its default action, which kills the process; each
daemon reloads on it instead, through `SighupService`.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

Announce = Callable[[IListeningPort], None]


def address_of(port: IListeningPort) -> str:
    """`host:port` (`[host]:port` for IPv6) of an IP listener, else the address as Twisted shows it."""
    address = port.getHost()
    name, number = getattr(address, "host", None), getattr(address, "port", None)
    if name is None:
        return str(address)
    return f"[{name}]:{number}" if ":" in name else f"{name}:{number}"


@implementer(IStreamServerEndpoint)
class AnnouncingEndpoint:
    """Passes the port `wrapped` listens on to `announce` before anyone else sees it."""

    def __init__(self, wrapped: IStreamServerEndpoint, announce: Announce) -> None:
        self.wrapped = wrapped
        self._announce = announce

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.wrapped.listen(factory).addCallback(self._bound)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self._announce(port)
        return port


def announced(service: StreamServerEndpointService, announce: Announce) -> StreamServerEndpointService:
    """`service`, announcing its port once bound (through its documented `endpoint` attribute)."""
    service.endpoint = AnnouncingEndpoint(service.endpoint, announce)
    return service


# Twisted's stream listeners queue 50 pending connections by default; a burst of public clients
# (or gateways reconnecting after a relay restart) then loses SYNs and waits out their 1, 3, 7 s
# retransmits.  Like nginx (511), ask for more; the kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "sni", "tls", "unix")


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """`description` with `backlog=` added, for endpoint types that take one and don't name it."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def listener(description: str, factory: IProtocolFactory, announce: Announce,
             reactor: Any) -> StreamServerEndpointService:
    """A listener on an endpoint string that logs its address through `announce` once bound."""
    return announced(strports.service(with_backlog(description), factory, reactor=reactor), announce)


class SighupService(Service):
    """Runs `callback` on the reactor thread at each SIGHUP while the service runs.

    The previous handler comes back on stop.  Off the main thread (tests that
    start a service tree in a worker) `signal.signal` raises ValueError: then
    no handler is installed and `callback` stays callable directly.  A failure
    of `callback` (or of the Deferred or coroutine it returns) is logged.
    """

    def __init__(self, reactor: IReactorFromThreads, callback: Callable[[], object]) -> None:
        self._reactor = reactor
        self._callback = callback
        self._installed = False
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
        except ValueError:
            return
        self._installed = True

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            self._installed = False
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)

    def _signalled(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._run)

    def _run(self) -> None:
        maybeDeferred(self._callback).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        log.failure("reload on SIGHUP failed", failure)
