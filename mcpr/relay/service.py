"""The relay's lifecycle: reload on SIGHUP, drain on stop.

`makeService` (tap.py) builds the tree under a `RelayService`: its public
listeners, certificate watchers, the metrics listener and the SIGHUP service.
Stopping drains: stop accepting, let in-flight requests finish for up to
`drain_timeout`, then close tunnels with 1001.  A reload re-reads the static
tokens (closing tunnels whose token was revoked, and forgetting the names
reserved for it) and the certificates.  At start, the reservations of the
previous run are loaded from the `ReservationStore` (registrations wait for
them); at stop it is the last to go, after the tunnels.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mcpr.common.protocol import CloseCode
from mcpr.common.settings import ConfigError
from mcpr.common.startup import Daemon
from mcpr.relay.auth import Authenticator
from mcpr.relay.cluster.node import ClusterNode
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.metrics import RequestStats
from mcpr.relay.registry import Registry
from mcpr.relay.reservations import ReservationStore, Row
from mcpr.relay.settings import RelaySettings
from mcpr.relay.tls import CertificateStore

log = Logger()

# After the tunnels were told to close: time for their close frames to leave before the reactor stops.
CLOSE_GRACE = 0.2


class RelayService(Daemon):
    """The root of the relay's tree; its own jobs are `reload` (SIGHUP) and the drain (stop), and,
    as a `Daemon`, the one line that ends `twist` when a listener cannot listen."""

    def __init__(self, clock: IReactorTime, settings: RelaySettings, *, auth: Authenticator, registry: Registry,
                 forwarder: TunnelForwarder, stats: RequestStats,
                 read: Callable[[], RelaySettings] | None = None, store: ReservationStore | None = None,
                 cluster: ClusterNode | None = None, freeze_heap: bool = False) -> None:
        """`read` gives fresh settings for a reload (None: only certificates are reloaded); `store`
        keeps the registry's reservations across restarts (None: in memory only); `cluster`: this
        node's part in a cluster, which the drain leaves first; `freeze_heap`: `Daemon`'s."""
        super().__init__("mcpr-relay", freeze_heap=freeze_heap)
        self._clock = clock
        self._settings = settings
        self._auth = auth
        self._registry = registry
        self._forwarder = forwarder
        self._stats = stats
        self._read = read
        self._listeners: list[StreamServerEndpointService] = []
        self.certificates: list[CertificateStore] = []
        self._store = store
        self._cluster = cluster
        if store is not None:
            store.setServiceParent(self)  # the first child: stopped last, once the tunnels are closed

    def add_listener(self, listener: StreamServerEndpointService) -> None:
        """A public listener: the drain stops these first, and the rest of the tree last."""
        listener.setServiceParent(self)
        self._listeners.append(listener)

    def startService(self) -> None:
        super().startService()
        log.info("auth mode: {mode}", mode=self._settings.auth_mode)
        for warning in self._settings.warnings:
            log.warn("{warning}", warning=warning)
        if self._store is not None:
            Deferred.fromCoroutine(self._restore(self._store)).addErrback(
                lambda failure: log.failure("restoring the reservations failed", failure))

    async def _restore(self, store: ReservationStore) -> None:
        """Give the registry the reservations of the previous run (none if the file cannot be
        used: the relay runs on, without them); in static mode, only those of listed tokens."""
        rows: list[Row] = []
        try:
            rows = await store.load(self._clock.seconds(), self._settings.reservation_grace)
        except Exception as e:
            log.error("reservations: cannot use {path} ({why}); names are reserved in memory only until "
                      "the relay stops", path=store.path, why=str(e))
        owners = self._auth.static_owners()
        self._registry.restore(rows, (lambda owner: owner in owners) if owners else (lambda owner: True))

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
            for tunnel in self._registry.revoke_all_but(self._auth.static_owners()):
                log.info("tunnel {subdomain}: token revoked", subdomain=tunnel.subdomain)
                tunnel.close(CloseCode.AUTH_FAILED, "token revoked")

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self._forwarder.draining = True
        log.info("draining: {n} request(s) in flight, {t} tunnel(s)", n=self._stats.in_flight,
                 t=len(self._registry))
        if self._cluster is not None:
            await self._cluster.leave()
        await DeferredList([listener.stopService() for listener in self._listeners if listener.running])
        idle = self._stats.when_idle()
        idle.addTimeout(self._settings.drain_timeout, self._clock)
        try:
            await idle
        except defer.TimeoutError:
            log.warn("drain timeout: {n} request(s) still in flight", n=self._stats.in_flight)
        # The relay closes these tunnels, not their gateways: their names stay "held" in the store,
        # so their owners get the whole grace period after the next start, however long the relay
        # is down.
        self._registry.stop_recording()
        for tunnel in list(self._registry):
            tunnel.close(CloseCode.GOING_AWAY, "relay shutting down")
        await deferLater(self._clock, CLOSE_GRACE, lambda: None)
        await super().stopService()
        self._stats.access_log.close()
        await self._auth.close()
        if self._cluster is not None:
            await self._cluster.close()
