"""The relay as a service tree: listeners, registry, auth, TLS, metrics, drain and reload.

Stopping drains (stop accepting, let in-flight requests finish for up to
`drain_timeout`, then close tunnels with 1001); SIGHUP reloads static tokens
and certificates, because `twist` alone would die on it.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.server import Site

from mcpr import __version__
from mcpr.common.protocol import CloseCode, label_of
from mcpr.common.service import address_of, announced, listener
from mcpr.common.settings import ConfigError
from mcpr.common.web import CappedSite
from mcpr.relay.auth import Authenticator
from mcpr.relay.front import RelayFront
from mcpr.relay.identity import token_hint
from mcpr.relay.metrics import RelayMetrics
from mcpr.relay.registration import registration_resource
from mcpr.relay.registry import Registry
from mcpr.relay.settings import RelaySettings, load_relay
from mcpr.relay.tls import CertificateWatcher, SNIServerEndpoint, listen_description

log = Logger()

# Refusals counted under their own label; any other close code is a protocol error.
_REFUSAL_LABELS = frozenset({CloseCode.AUTH_FAILED, CloseCode.IN_USE, CloseCode.INVALID_SUBDOMAIN,
                             CloseCode.TOO_MANY})


class RelayService(MultiService):
    def __init__(self, settings: RelaySettings, reactor, *, reload_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self._reload_args = reload_args
        self.metrics = RelayMetrics()
        self.registry = Registry(settings.max_tunnels_per_token)
        self.auth = Authenticator(reactor, settings.tokens, settings.auth_provider,
                                  settings.auth_provider_secret)
        self.front = RelayFront(reactor, settings.domain, self.registry, self.metrics,
                                registration_resource(self, reactor), max_in_flight=settings.max_in_flight,
                                headers_timeout=settings.headers_timeout)
        self.site = CappedSite(self.front, max_request_body=settings.max_request_body, via="relay",
                              too_large=self.front.too_large)
        self.site.displayTracebacks = False
        self.certificates = []
        self.listeners: list[StreamServerEndpointService] = []
        for description in settings.listen:
            service = strports.service(listen_description(description), self.site, reactor=reactor)
            if isinstance(service.endpoint, SNIServerEndpoint):
                self.certificates.append(service.endpoint.store)
                CertificateWatcher(service.endpoint.store, clock=reactor).setServiceParent(self)
            announced(service, self._announce).setServiceParent(self)
            self.listeners.append(service)
        if settings.metrics:
            metrics_site = Site(self.metrics.resource())
            metrics_site.noisy = False
            listener(settings.metrics, metrics_site, self._announce_metrics, reactor).setServiceParent(self)
        self._previous_hup = None

    # -- what the registration endpoint reports

    def public_url(self, subdomain: str) -> str:
        template = self.settings.public_url
        return template.replace("*", subdomain, 1)

    def registered(self, tunnel, token: str, peer: str | None) -> None:
        self.metrics.registrations.labels("ok").inc()
        self.metrics.tunnels.set(len(self.registry))
        log.info("tunnel {subdomain} registered (token {hint}, from {peer}): {url}", subdomain=tunnel.subdomain,
                 hint=token_hint(token), peer=peer, url=self.public_url(tunnel.subdomain))

    def unregistered(self, tunnel) -> None:
        if self.registry.release(tunnel):
            log.info("tunnel {subdomain} disconnected", subdomain=tunnel.subdomain)
        self.metrics.tunnels.set(len(self.registry))

    def refused(self, code: int, reason: str, hint: str | None, peer: str | None) -> None:
        result = label_of(code) if code in _REFUSAL_LABELS else "protocol_error"
        self.metrics.registrations.labels(result).inc()
        log.info("registration refused ({code} {reason}; token {hint}, from {peer})", code=code, reason=reason,
                 hint=hint or "-", peer=peer)

    # -- lifecycle

    def _announce(self, port: IListeningPort) -> None:
        log.info("mcpr relay {version} for {domain}: listening on {address}", version=__version__,
                 domain=self.settings.domain, address=address_of(port))

    def _announce_metrics(self, port: IListeningPort) -> None:
        log.info("metrics on http://{address}/metrics", address=address_of(port))

    def startService(self) -> None:
        super().startService()
        log.info("auth mode: {mode}", mode=self.settings.auth_mode)
        for warning in self.settings.warnings:
            log.warn("{warning}", warning=warning)
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._sighup)
        except ValueError:
            self._previous_hup = None  # not the main thread (tests): reload() is still callable

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(lambda: Deferred.fromCoroutine(self.reload()))

    async def reload(self) -> None:
        """Re-read static tokens (closing tunnels whose token was revoked) and certificates."""
        log.info("reloading (SIGHUP)")
        if self._reload_args is not None:
            try:
                fresh = load_relay(**self._reload_args)
            except ConfigError as e:
                log.error("reload failed, keeping the current settings: {why}", why=str(e))
                fresh = None
            if fresh is not None:
                self.auth.reload_static(fresh.tokens)
                if fresh.tokens or self.settings.tokens:
                    valid = self.auth.static_owners()
                    for tunnel in list(self.registry):
                        if tunnel.owner not in valid:
                            log.info("tunnel {subdomain}: token revoked", subdomain=tunnel.subdomain)
                            tunnel.close(CloseCode.AUTH_FAILED, "token revoked")
        for store in self.certificates:
            await store.reload()

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        self.front.draining = True
        log.info("draining: {n} request(s) in flight, {t} tunnel(s)", n=self.front.in_flight, t=len(self.registry))
        await DeferredList([Deferred.fromCoroutine(_stop(listener)) for listener in self.listeners])
        deadline = self.reactor.seconds() + self.settings.drain_timeout
        while self.front.in_flight and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.1, lambda: None)
        if self.front.in_flight:
            log.warn("drain timeout: {n} request(s) still in flight", n=self.front.in_flight)
        for tunnel in list(self.registry):
            tunnel.close(CloseCode.GOING_AWAY, "relay shutting down")
        await deferLater(self.reactor, 0.2, lambda: None)
        await super().stopService()
        self.auth.close()


async def _stop(listener: StreamServerEndpointService) -> None:
    if listener.running:
        await listener.stopService()

