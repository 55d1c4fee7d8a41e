"""The relay's lifecycle: reload on SIGHUP, drain on stop.

`makeService` (tap.py) builds the tree under a `RelayService`: its public
listeners, certificate watchers, the metrics listener and the SIGHUP service.
Stopping drains: stop accepting, let in-flight requests finish for up to
`drain_timeout`, then close tunnels with 1001.  A reload re-reads the static
tokens (closing tunnels whose token was revoked) and the certificates.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mcpr.common.protocol import CloseCode
from mcpr.common.settings import ConfigError
from mcpr.relay.auth import Authenticator
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.metrics import RequestStats
from mcpr.relay.registry import Registry
from mcpr.relay.settings import RelaySettings
from mcpr.relay.tls import CertificateStore

log = Logger()

# After the tunnels were told to close: time for their close frames to leave before the reactor stops.
CLOSE_GRACE = 0.2


class RelayService(MultiService):
    """The root of the relay's tree; its own jobs are `reload` (SIGHUP) and the drain (stop)."""

    def __init__(self, clock: IReactorTime, settings: RelaySettings, *, auth: Authenticator, registry: Registry,
                 forwarder: TunnelForwarder, stats: RequestStats,
                 read: Callable[[], RelaySettings] | None = None) -> None:
        """`read` gives fresh settings for a reload (None: only certificates are reloaded)."""
        super().__init__()
        self._clock = clock
        self._settings = settings
        self._auth = auth
        self._registry = registry
        self._forwarder = forwarder
        self._stats = stats
        self._read = read
        self._listeners: list[StreamServerEndpointService] = []
        self.certificates: list[CertificateStore] = []

    def add_listener(self, listener: StreamServerEndpointService) -> None:
        """A public listener: the drain stops these first, and the rest of the tree last."""
        listener.setServiceParent(self)
        self._listeners.append(listener)

    def startService(self) -> None:
        super().startService()
        log.info("auth mode: {mode}", mode=self._settings.auth_mode)
        for warning in self._settings.warnings:
            log.warn("{warning}", warning=warning)

    async def reload(self) -> None:
        """Re-read static tokens (closing tunnels whose token was revoked) and certificates."""
        log.info("reloading (SIGHUP)")
        if self._read is not None:
            try:
                fresh = self._read()
            except ConfigError as e:
                log.error("reload failed, keeping the current settings: {why}", why=str(e))
            else:
                self._apply_tokens(fresh)
        for store in self.certificates:
            await store.reload()

    def _apply_tokens(self, fresh: RelaySettings) -> None:
        self._auth.reload_static(fresh.tokens)
        if fresh.tokens or self._settings.tokens:
            valid = self._auth.static_owners()
            for tunnel in list(self._registry):
                if tunnel.owner not in valid:
                    log.info("tunnel {subdomain}: token revoked", subdomain=tunnel.subdomain)
                    tunnel.close(CloseCode.AUTH_FAILED, "token revoked")

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self._forwarder.draining = True
        log.info("draining: {n} request(s) in flight, {t} tunnel(s)", n=self._stats.in_flight,
                 t=len(self._registry))
        await DeferredList([listener.stopService() for listener in self._listeners if listener.running])
        idle = self._stats.when_idle()
        idle.addTimeout(self._settings.drain_timeout, self._clock)
        try:
            await idle
        except defer.TimeoutError:
            log.warn("drain timeout: {n} request(s) still in flight", n=self._stats.in_flight)
        for tunnel in list(self._registry):
            tunnel.close(CloseCode.GOING_AWAY, "relay shutting down")
        await deferLater(self._clock, CLOSE_GRACE, lambda: None)
        await super().stopService()
        await self._auth.close()
