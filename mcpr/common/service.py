"""Listening on endpoint strings, and saying where.

Tests and users both need the real address (`tcp:0` picks a free port), so
each listener logs it once bound; a port that cannot be bound at start makes
`twist` fail at once instead of running without a listener.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def address_of(port: IListeningPort) -> str:
    host = port.getHost()
    name = getattr(host, "host", None)
    if name is None:
        return str(host)
    return f"[{name}]:{host.port}" if ":" in name else f"{name}:{host.port}"


class ListeningService(Service):
    """Like StreamServerEndpointService, plus a log line with the bound address."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory,
                 announce: Callable[[IListeningPort], None]) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self._announce = announce
        self.port: IListeningPort | None = None
        self._listening: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        d = self.endpoint.listen(self.factory)
        early: list = []
        d.addBoth(lambda result: early.append(result) or result)
        if early and isinstance(early[0], Failure):
            d.addErrback(lambda f: None)
            early[0].raiseException()
        d.addCallback(self._bound)
        d.addErrback(self._failed)
        self._listening = d

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self._announce(port)
        return port

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("cannot listen", failure)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        listening.cancel()
        return listening.addCallback(lambda port: port.stopListening() if port is not None else None)
