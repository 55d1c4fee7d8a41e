"""`twist mcpr-relay`: options and the service of the relay daemon."""

from __future__ import annotations

import resource
import sys
from urllib.parse import urlsplit
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import IService
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from mcpr import __version__
from mcpr.common.accesslog import LineWriter
from mcpr.common.service import SighupService, address_of, listener
from mcpr.common.settings import ConfigError, cli_values, listen_origin, options_from
from mcpr.common.startup import DaemonOptions, SettingError, one_line_errors
from mcpr.common.text_log import plain_autobahn_log
from mcpr.common.web import CappedSite, ChannelTimeouts, ConnectionLimits, TrustedProxies
from mcpr.relay.auth import Authenticator
from mcpr.relay.cluster.directory import Directory, Heartbeat, redacted_redis_url, redis_connection
from mcpr.relay.cluster.node import ClusterNode
from mcpr.relay.cluster.peers import InternalResource, PeerClient
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.front import RelayFront
from mcpr.relay.metrics import RegistrationStats, RelayMetrics, RequestStats
from mcpr.relay.registration import RegistrationFactory, RegistrationRate
from mcpr.relay.registry import Registry
from mcpr.relay.reservations import ReservationStore
from mcpr.relay.service import RelayService
from mcpr.relay.settings import RELAY_SETTINGS, RelaySettings, load_relay
from mcpr.relay.tls import CertificateWatcher, SNIServerEndpoint, listen_description
from mcpr.relay.tunnels.guard import TunnelLimits

log = Logger()


@options_from(RELAY_SETTINGS)
class Options(DaemonOptions):
    """`twist mcpr-relay`'s options: the settings table's, plus `--config`, `--version` and the
    original mcpr's `--relay`."""

    program = "mcpr-relay"

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
        ["config", "c", None, "Config file (default: ./mcpr.toml or the nearest parent's)."],
    ]

    def opt_version(self) -> None:
        print(f"mcpr {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        args = {"cli": cli_values(RELAY_SETTINGS, self), "config": self["config"]}
        try:
            self["settings"] = load_relay(**args)
        except ConfigError as e:
            raise SettingError(str(e)) from None
        self["reload"] = args


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    plain_autobahn_log()
    with one_line_errors(Options.program):
        return _service_tree(options, reactor)


def _service_tree(options: usage.Options, reactor: Any) -> RelayService:
    """The relay's tree: a `RelayService` (reload, drain) over the reservations store, its
    listeners, certificate watchers, the metrics listener and SIGHUP; the parts below it share
    one registry."""
    if reactor is None:
        from twisted.internet import reactor
    settings: RelaySettings = options["settings"]
    reload_args = options["reload"]
    metrics = RelayMetrics()
    store = ReservationStore.in_thread(settings.state_dir, reactor)
    registry = Registry.for_settings(reactor, settings, store)
    auth = Authenticator(reactor, settings.tokens, settings.auth_provider, settings.auth_provider_secret)
    access_log = LineWriter(sys.stdout if settings.access_log == "-" else None, reactor, stamped=True)
    stats = RequestStats(metrics, reactor, access_log)
    cluster = _cluster_node(settings, reactor, registry) if settings.cluster else None
    forwarder = TunnelForwarder(reactor, registry, stats, max_in_flight=settings.max_in_flight,
                                headers_timeout=settings.headers_timeout, cluster=cluster)
    registration = RegistrationFactory(
        reactor, registry, auth, RegistrationStats(metrics, registry),
        rate=RegistrationRate(reactor, per_minute=settings.registration_rate, burst=settings.registration_burst),
        public_url=settings.public_url,
        registration_timeout=settings.registration_timeout, max_message_size=settings.max_message_size,
        ping_interval=settings.ping_interval, ping_timeout=settings.ping_timeout,
        limits=TunnelLimits(control_rate=settings.control_frame_rate, backlog=settings.gateway_backlog,
                           pool=settings.tunnel_pool),
        trusted=TrustedProxies(settings.trusted_proxies), cluster=cluster)
    heartbeat = Heartbeat(cluster.directory, cluster.placements, cluster.lost, reactor) if cluster is not None else None
    front = RelayFront(reactor, settings.domain, registry, forwarder, stats, WebSocketResource(registration),
                       public_url=settings.public_url, public_url_set=settings.public_url_set,
                       cluster=_cluster_health(settings, heartbeat) if heartbeat is not None else None)
    site = public_site(front, settings, reactor, connection_budget(settings.max_connections))
    relay = RelayService(reactor, settings, auth=auth, registry=registry, forwarder=forwarder, stats=stats,
                         read=lambda: load_relay(**reload_args), store=store, cluster=cluster,
                         freeze_heap=options.parent is not None)  # under twist, not in a test

    def announce(port: IListeningPort) -> None:
        log.info("mcpr relay {version} for {domain}: listening on {address}", version=__version__,
                 domain=settings.domain, address=address_of(port))

    for description in settings.listen:
        service = listener(description, site, announce, reactor, where=listen_origin(settings.sources),
                           translate=listen_description)
        endpoint = service.endpoint.wrapped
        if isinstance(endpoint, SNIServerEndpoint):
            relay.certificates.append(endpoint.store)
            CertificateWatcher(endpoint.store, clock=reactor).setServiceParent(relay)
        relay.add_listener(service)
    if cluster is not None and heartbeat is not None:
        _join_cluster(relay, cluster, heartbeat, settings, reactor, forwarder, metrics)
    if settings.metrics:
        metrics_site = Site(metrics.resource())
        metrics_site.noisy = False
        listener(settings.metrics, metrics_site, _announce_metrics, reactor,
                 where=settings.sources.get("metrics", "--metrics")).setServiceParent(relay)
    SighupService(reactor, relay.reload).setServiceParent(relay)
    return relay


def _cluster_node(settings: RelaySettings, reactor: Any, registry: Registry) -> ClusterNode:
    assert settings.cluster and settings.node_url and settings.cluster_secret
    directory = Directory(redis_connection(settings.cluster, reactor), settings.node_url, ttl=settings.cluster_ttl,
                          grace=settings.reservation_grace, clock=reactor)
    return ClusterNode(settings.node_url, registry, directory, PeerClient(reactor, settings.cluster_secret),
                       reactor)


def _cluster_health(settings: RelaySettings, heartbeat: Heartbeat) -> Callable[[], dict[str, Any]]:
    def health() -> dict[str, Any]:
        return {"node": settings.node_url, "registry": "up" if heartbeat.available else "down"}

    return health


def _join_cluster(relay: RelayService, cluster: ClusterNode, heartbeat: Heartbeat, settings: RelaySettings,
                  reactor: Any, forwarder: TunnelForwarder, metrics: RelayMetrics) -> None:
    """The cluster's parts of the tree: the heartbeat that keeps this node's claims alive, and
    the internal listener at `node_url`, where the other nodes forward requests and evictions."""
    assert settings.cluster_secret and settings.node_url
    heartbeat.setServiceParent(relay)
    metrics.watch_registry(lambda: heartbeat.available)
    internal = CappedSite(InternalResource(settings.cluster_secret, forwarder.forward_internal, cluster.evict),
                          max_request_body=settings.max_request_body, via="relay", reactor=reactor)
    internal.displayTracebacks = False
    internal.noisy = False

    def announce(port: IListeningPort) -> None:
        log.info("cluster node {node}: internal listener on {address}, registry {registry}", node=settings.node_url,
                 address=address_of(port), registry=redacted_redis_url(settings.cluster or ""))

    relay.add_listener(listener(node_endpoint(settings.node_url), internal, announce, reactor,
                                where=settings.sources.get("node_url", "--node-url")))


def node_endpoint(node_url: str) -> str:
    """The endpoint string of the internal listener: the node URL's address and port, nothing wider."""
    parts = urlsplit(node_url)
    interface = (parts.hostname or "").replace(":", "\\:")
    return f"tcp:{parts.port}:interface={interface}"


# File descriptors kept out of the public connections' budget: listeners, logs, the auth provider's
# connections, certificate files, and the sockets accepted in one reactor turn before the
# connections they replace at the cap are closed (Twisted's accept loop takes up to ~100 at a time).
FD_RESERVE = 128


def connection_budget(explicit: int | None) -> int:
    """The cap on public connections: below the process's open-file limit by a reserve, so that
    the relay keeps accepting (and answering) at the limit instead of failing accept() with
    EMFILE.  The soft limit is first raised to the hard one, as systemd expects of a daemon
    that needs many files (its soft default, 1024, exists for select(); Twisted uses epoll)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    reserve = max(FD_RESERVE, soft // 16)
    budget = soft - reserve if soft > 2 * reserve else max(soft // 2, 1)
    if explicit is not None and explicit > budget:
        log.warn("max_connections {explicit} is more than the open-file limit ({soft}) allows: capped at "
                 "{budget}", explicit=explicit, soft=soft, budget=budget)
    elif explicit is not None:
        budget = explicit
    return budget


def public_site(front: RelayFront, settings: RelaySettings, reactor: Any, max_connections: int) -> CappedSite:
    """The site of the public listeners: the front, with the body cap, deadlines, connection caps
    and trusted proxies of `settings`."""
    timeouts = ChannelTimeouts(header=settings.client_header_timeout, body=settings.client_body_timeout,
                               min_body_rate=settings.min_body_rate, lingering_time=settings.lingering_time,
                               lingering_size=settings.lingering_size)
    site = CappedSite(front, max_request_body=settings.max_request_body, via="relay", too_large=front.too_large,
                      refused=front.refused, timeouts=timeouts, trusted=TrustedProxies(settings.trusted_proxies),
                      limits=ConnectionLimits(total=max_connections, per_peer=settings.max_connections_per_ip),
                      reactor=reactor)
    site.displayTracebacks = False
    return site


def _announce_metrics(port: IListeningPort) -> None:
    log.info("metrics on http://{address}/metrics", address=address_of(port))
