"""The services both daemons run beside their own: listeners that say where, and SIGHUP.

Listeners are Twisted's own `strports.service` (a port that cannot be bound at
start makes `twist` fail at once instead of running without a listener), plus
one log line with the bound address: tests and users both need it, since
`tcp:0` picks a free port.  A string that is no endpoint, and a port that cannot
be bound, are a `ConfigError` naming the option or key it came from, which
`mcpr.common.startup` turns into twist's one line.

`twist` leaves SIGHUP at its default action, which kills the process; each
daemon reloads on it instead, through `SighupService`.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Any, Callable

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpr.common.settings import ConfigError, show_value

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
    """Passes the port `wrapped` listens on to `announce` before anyone else sees it; a port that
    cannot be bound fails with a `ConfigError` naming `where` the endpoint `description` came from,
    the reason and what to do."""

    def __init__(self, wrapped: IStreamServerEndpoint, announce: Announce, *, where: str,
                 description: str, unbound: Callable[[str], None] | None = None) -> None:
        self.wrapped = wrapped
        self._announce = announce
        self._where = where
        self._description = description
        self._unbound = unbound

    # None when `unbound` took the failure: StreamServerEndpointService then has no port to stop.
    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort | None]:  # type: ignore[override]
        return self.wrapped.listen(factory).addCallbacks(self._bound, self._refused)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self._announce(port)
        return port

    def _refused(self, failure: Failure) -> None:
        failure.trap(CannotListenError)
        line = cannot_listen(self._where, self._description, failure.value)
        if self._unbound is None:
            raise ConfigError(line) from None
        self._unbound(line)  # StreamServerEndpointService stops a port of None as no port


# What to do about the bind() errors a user can cause, by errno.
_LISTEN_ADVICE = {
    errno.EADDRINUSE: "another process listens there (another gateway or relay?): stop it, or choose another port",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE: use a port from 1024 up, or start the "
                  "relay with its systemd unit, which grants the capability",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address: use one that `ip address` lists, or "
                         "0.0.0.0 (all IPv4) or :: (all)",
}


def cannot_listen(where: str, description: str, error: CannotListenError) -> str:
    """The one line for a listener that could not bind: where it was set, the endpoint, why, and
    what to do."""
    code = getattr(error.socketError, "errno", None)
    why = os.strerror(code) if code else str(error.socketError)
    advice = _LISTEN_ADVICE.get(code or 0, "check the endpoint")
    return f"{where}: cannot listen on {description}: {why}: {advice}"


# Twisted's stream listeners queue 50 pending connections by default; a burst of public clients
# (or gateways reconnecting after a relay restart) then loses SYNs and waits out their 1, 3, 7 s
# retransmits.  Like nginx (511), ask for more; the kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024
# `sni` and `reuseport` are the relay's parser plugins, known here by name only (common never
# imports the relay); their `backlog=` means what it means for `tcp`.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "tls", "unix", "sni", "reuseport")


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """`description` with `backlog=` added, for endpoint types that take one and don't name it."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def listener(description: str, factory: IProtocolFactory, announce: Announce, reactor: Any, *,
             where: str, translate: Callable[[str], str] = lambda d: d,
             unbound: Callable[[str], None] | None = None) -> StreamServerEndpointService:
    """A listener on an endpoint string that logs its address through `announce` once bound.

    `where` names the option or key the string came from, for the one-line `ConfigError` of a
    string that is no endpoint (here) or a port that cannot be bound (at start); `translate`
    maps the user's string to the one Twisted parses (the relay's `tls:` alias).  With
    `unbound`, a port that cannot be bound is not fatal: `unbound` gets the line instead and the
    daemon runs without this listener (for a default port another instance may hold)."""
    try:
        service = strports.service(with_backlog(translate(description)), factory, reactor=reactor)
    except Exception as e:  # whatever the endpoint's parser raises, the string is the user's mistake
        raise ConfigError(f"{where}: cannot use endpoint {show_value(description)}: {e}{_syntax_hint(e)}") from None
    service.endpoint = AnnouncingEndpoint(service.endpoint, announce, where=where, description=description,
                                          unbound=unbound)
    return service


def _syntax_hint(error: Exception) -> str:
    """For a malformed string (not, say, a certificate directory without a certificate): its shape."""
    if isinstance(error, (ValueError, TypeError, IndexError)):
        return "; expected an endpoint such as tcp:8080 or tcp:8080:interface=127.0.0.1"
    return ""


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
