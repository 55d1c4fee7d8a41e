"""`twist mcpr-relay`: options and the service of the relay daemon."""

from __future__ import annotations

import sys
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from mcpr import __version__
from mcpr.common.service import SighupService, address_of, announced, listener
from mcpr.common.settings import ConfigError
from mcpr.common.web import CappedSite
from mcpr.relay.auth import Authenticator
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.front import RelayFront
from mcpr.relay.metrics import RegistrationStats, RelayMetrics, RequestStats
from mcpr.relay.registration import RegistrationFactory
from mcpr.relay.registry import Registry
from mcpr.relay.service import RelayService
from mcpr.relay.settings import RelaySettings, load_relay
from mcpr.relay.tls import CertificateWatcher, SNIServerEndpoint, listen_description

log = Logger()


class Options(usage.Options):
    synopsis = "--domain tunnel.example.com [--listen ENDPOINT ...] [options]"
    longdesc = (
        "Run the mcpr relay: gateways register tunnels at /_tunnel/register and are served at "
        "https://<name>.<domain>. Settings: command line, then MCPR_AUTH_PROVIDER* environment variables, "
        "then the config file ([relay] and [[relay.tokens]] tables), then defaults."
    )
    optFlags = [
        ["version", None, "Print the version and exit."],
        ["relay", None, "Accepted for compatibility (the original mcpr's `--relay`); does nothing."],
    ]
    optParameters = [
        ["domain", None, None, "Base domain, e.g. tunnel.example.com (alias --relay-domain)."],
        ["port", None, None, "Shorthand for --listen tcp:N (default 8080)."],
        ["config", "c", None, "Config file (default: ./mcpr.toml or the nearest parent's)."],
        ["auth-provider", None, None, "Auth provider base URL (env MCPR_AUTH_PROVIDER)."],
        ["auth-provider-secret", None, None, "X-Relay-Secret for the provider (env MCPR_AUTH_PROVIDER_SECRET)."],
        ["metrics", None, None, "Endpoint for Prometheus metrics, e.g. tcp:9100:interface=127.0.0.1."],
        ["public-url", None, None, "Public URL template of tunnels (default https://*.<domain>)."],
        ["max-request-body", None, None, "Largest public request body (default 16MiB; 413 above)."],
        ["max-in-flight", None, None, "Concurrent requests per tunnel (default 256; 503 above)."],
        ["max-tunnels-per-token", None, None, "Tunnels one token may hold (default 8; close 4008 above)."],
        ["max-message-size", None, None, "Largest WebSocket message from a gateway (default 4MiB)."],
        ["registration-timeout", None, None, "Seconds a new socket has to register (default 10)."],
        ["headers-timeout", None, None, "Seconds to wait for a tunnel's response headers (default 30; 504)."],
        ["drain-timeout", None, None, "Seconds to let in-flight requests finish on stop (default 30)."],
        ["ping-interval", None, None, "Seconds between WebSocket pings (default 20)."],
        ["ping-timeout", None, None, "Seconds to wait for a pong before dropping a tunnel (default 10)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["static-token"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to serve on (repeatable): tcp:8080, or tls:/etc/mcpr/certs:port=443 (SNI over a PEM directory)."""
        self["listen"].append(endpoint)

    def opt_static_token(self, spec: str) -> None:
        """TOKEN:PATTERN[,PATTERN] a gateway may register with (repeatable)."""
        self["static-token"].append(spec)

    def opt_relay_domain(self, domain: str) -> None:
        """Alias of --domain (the original mcpr's spelling)."""
        self["domain"] = domain

    def opt_version(self) -> None:
        print(f"mcpr {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        names = ("domain", "port", "auth-provider", "auth-provider-secret", "metrics", "public-url",
                 "max-request-body", "max-in-flight", "max-tunnels-per-token", "max-message-size",
                 "registration-timeout", "headers-timeout", "drain-timeout", "ping-interval", "ping-timeout")
        cli: dict[str, Any] = {name.replace("-", "_"): self[name] for name in names}
        cli["listen"] = self["listen"] or None
        args = {"cli": cli, "static_tokens": tuple(self["static-token"]), "config": self["config"]}
        try:
            self["settings"] = load_relay(**args)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["reload"] = args


def makeService(options: usage.Options, reactor=None) -> IService:
    """The relay's tree: a `RelayService` (reload, drain) over its listeners, certificate
    watchers, the metrics listener and SIGHUP; the parts below it share one registry."""
    if reactor is None:
        from twisted.internet import reactor
    settings: RelaySettings = options["settings"]
    reload_args = options["reload"]
    metrics = RelayMetrics()
    registry = Registry(settings.max_tunnels_per_token)
    auth = Authenticator(reactor, settings.tokens, settings.auth_provider, settings.auth_provider_secret)
    stats = RequestStats(metrics, reactor)
    forwarder = TunnelForwarder(reactor, registry, stats, max_in_flight=settings.max_in_flight,
                                headers_timeout=settings.headers_timeout)
    registration = RegistrationFactory(
        reactor, registry, auth, RegistrationStats(metrics, registry), public_url=settings.public_url,
        registration_timeout=settings.registration_timeout, max_message_size=settings.max_message_size,
        ping_interval=settings.ping_interval, ping_timeout=settings.ping_timeout)
    front = RelayFront(reactor, settings.domain, registry, forwarder, stats, WebSocketResource(registration))
    site = CappedSite(front, max_request_body=settings.max_request_body, via="relay", too_large=front.too_large)
    site.displayTracebacks = False
    relay = RelayService(reactor, settings, auth=auth, registry=registry, forwarder=forwarder, stats=stats,
                         read=lambda: load_relay(**reload_args))

    def announce(port: IListeningPort) -> None:
        log.info("mcpr relay {version} for {domain}: listening on {address}", version=__version__,
                 domain=settings.domain, address=address_of(port))

    for description in settings.listen:
        service = strports.service(listen_description(description), site, reactor=reactor)
        if isinstance(service.endpoint, SNIServerEndpoint):
            relay.certificates.append(service.endpoint.store)
            CertificateWatcher(service.endpoint.store, clock=reactor).setServiceParent(relay)
        relay.add_listener(announced(service, announce))
    if settings.metrics:
        metrics_site = Site(metrics.resource())
        metrics_site.noisy = False
        listener(settings.metrics, metrics_site, _announce_metrics, reactor).setServiceParent(relay)
    SighupService(reactor, relay.reload).setServiceParent(relay)
    return relay


def _announce_metrics(port: IListeningPort) -> None:
    log.info("metrics on http://{address}/metrics", address=address_of(port))
