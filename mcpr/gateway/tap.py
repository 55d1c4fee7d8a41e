"""`twist mcpr`: options and the service tree of the gateway."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from mcpr import __version__
from mcpr.common.accesslog import LineWriter
from mcpr.common.service import address_of, listener
from mcpr.common.settings import ConfigError, cli_values, listen_origin, options_from
from mcpr.common.startup import Daemon, DaemonOptions, SettingError, one_line_errors
from mcpr.common.text_log import plain_autobahn_log
from mcpr.common.web import CappedSite
from mcpr.gateway.inspector.service import inspector_service
from mcpr.gateway.reload import ReloadService
from mcpr.gateway.settings import GATEWAY_SETTINGS, GatewaySettings, load_gateway
from mcpr.gateway.store.recorder import EventStore
from mcpr.gateway.store.schema import StoreError
from mcpr.gateway.store.writer import RunInfo
from mcpr.gateway.token import ensure_token
from mcpr.gateway.tunnel import EventSink, TunnelClient
from mcpr.proxy.events import EventLog
from mcpr.proxy.forward import Forwarder
from mcpr.proxy.resource import ProxyResource
from mcpr.proxy.routing import Upstream
from mcpr.proxy.widgets import open_source

log = Logger()

HEARTBEAT_SECONDS = 30.0


@options_from(GATEWAY_SETTINGS)
class Options(DaemonOptions):
    """`twist mcpr`'s options: the settings table's, plus `--config` and `--version`."""

    program = "mcpr"

    synopsis = "--mcp URL [--port N | --listen ENDPOINT ...] [options]"
    longdesc = (
        "Serve an MCP server through the MCP-aware proxy. Settings come from the command line, "
        "then MCPR_* environment variables, then mcpr.toml (--config, else the current directory "
        "or its parents), then defaults."
    )
    optFlags = [
        ["version", None, "Print the version and exit."],
    ]
    optParameters = [
        ["config", "c", None, "Path of mcpr.toml (default: ./mcpr.toml or the nearest parent's)."],
    ]

    def opt_version(self) -> None:
        print(f"mcpr {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        self["cli"] = cli = cli_values(GATEWAY_SETTINGS, self)
        try:
            self["settings"] = load_gateway(cli, config=self["config"])
        except ConfigError as e:
            raise SettingError(str(e)) from None

    def stdout_taken(self) -> bool:
        return bool(self["settings"].events == "-")


class _UpstreamCheck(Service):
    """Looks once, at start, whether the MCP server accepts connections, and warns if not: a
    gateway in front of nothing would otherwise say so only in its 502s."""

    def __init__(self, resource: ProxyResource) -> None:
        self._resource = resource

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._check())

    async def _check(self) -> None:
        reachable, error, _ = await self._resource.probe_upstream()
        if not reachable:
            log.warn("upstream {url} is not reachable ({why}): requests get 502 until it is (is the MCP "
                     "server running, and is --mcp right?)", url=self._resource.upstream.url, why=error)


class _Closer(Service):
    """Closes the upstream pool and the events sink last, after the listeners stopped."""

    def __init__(self, resource: ProxyResource) -> None:
        self._resource = resource

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = self._resource.forwarder.close()
        d.addBoth(lambda _: self._resource.events.close())
        d.addBoth(lambda _: self._resource.console.close())
        return d


class _Both:
    """The tunnel's events to the `--events` stream and to the store."""

    def __init__(self, *sinks: EventSink) -> None:
        self._sinks = sinks

    def emit(self, type: str, ts: float, **fields: Any) -> None:
        for sink in self._sinks:
            sink.emit(type, ts, **fields)


def build_store(settings: GatewaySettings, reactor: Any) -> EventStore | None:
    """The event store, its file opened (and migrated) now: one that cannot be used stops `twist` here,
    with one line, as a port that cannot be bound does."""
    if settings.store is None:
        return None
    try:
        return EventStore.open(settings.store, RunInfo(__version__, settings.mcp, settings.listen), reactor)
    except StoreError as e:
        raise ConfigError(str(e)) from None  # one line, as any setting that cannot be used


def build_resource(settings: GatewaySettings, reactor: Any, store: EventStore | None = None) -> ProxyResource:
    forwarder = Forwarder(reactor, headers_timeout=settings.upstream_timeout)
    widgets = open_source(settings.widgets, forwarder) if settings.widgets else None
    # The console line goes to standard output, unless the JSON events do: then to standard error,
    # so that `--events -` stays pure NDJSON for `jq`.
    console = LineWriter(sys.stderr if settings.events == "-" else sys.stdout, reactor)
    return ProxyResource(reactor, Upstream.parse(settings.mcp), forwarder, open_events(settings),
                         csp=settings.csp, widgets=widgets, console=console, recorder=store)


def open_events(settings: GatewaySettings) -> EventLog:
    try:
        return EventLog.open(settings.events)
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(settings.events or "")) or "/"
        advice = (f"create {folder} first, or give a path in an existing folder"
                  if isinstance(e, FileNotFoundError) else "give a path this user can write")
        raise ConfigError(f"{settings.sources.get('events', '--events')}: cannot write {settings.events}: "
                          f"{e.strerror}: {advice}") from None


def build_site(resource: ProxyResource, settings: GatewaySettings, *, via: str = "direct") -> CappedSite:
    site = CappedSite(resource, max_request_body=settings.max_request_body, via=via,
                     too_large=resource.report_too_large)
    site.displayTracebacks = False
    return site


def tunnel_service(settings: GatewaySettings, resource: ProxyResource, reactor: Any,
                   store: EventStore | None = None) -> TunnelClient:
    """The tunnel client, with the token that keeps this gateway's URL (made and saved on first use)."""
    assert settings.relay_url is not None, "tunnel_service needs a relay URL"
    token, saved = ensure_token(settings.tunnel_token, settings.config_path, Path.cwd())
    if saved is not None:
        log.info("tunnel: new token saved in {path} (mode 0600); keep it to keep your URL", path=str(saved))

    def on_url(url: str) -> None:
        resource.public_origin = url
        log.info("Tunnel: {url}", url=url)

    site = build_site(resource, settings, via="tunnel")
    events: EventSink = resource.events if store is None else _Both(resource.events, store)
    return TunnelClient(reactor, settings.relay_url, token, settings.tunnel_subdomain, site, events, on_url, ping_interval=settings.tunnel_ping_interval,
                        ping_timeout=settings.tunnel_ping_timeout, pool=settings.tunnel_pool)


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    plain_autobahn_log()
    with one_line_errors(Options.program):
        return _service_tree(options, reactor)


def _service_tree(options: usage.Options, reactor: Any) -> Daemon:
    if reactor is None:
        from twisted.internet import reactor
    settings: GatewaySettings = options["settings"]
    for warning in settings.warnings:
        log.warn("{warning}", warning=warning)
    top = Daemon(Options.program, freeze_heap=options.parent is not None)  # under twist, not in a test
    store = build_store(settings, reactor)
    resource = build_resource(settings, reactor, store)
    _Closer(resource).setServiceParent(top)
    if store is not None:  # stopped after the listeners and the tunnel, so their last events are kept
        store.setServiceParent(top)
        log.info("event store: {path} (mcpr logs, mcpr status; --no-store to keep none)", path=str(store.settings.path))
    site = build_site(resource, settings)
    addresses: list[str] = []

    def announce(port: IListeningPort) -> None:
        addresses.append(address_of(port))
        log.info("mcpr {version}: http://{address} -> {mcp}", version=__version__,
                 address=address_of(port), mcp=settings.mcp)

    for description in settings.listen:
        listener(description, site, announce, reactor, where=listen_origin(settings.sources)).setServiceParent(top)
    if settings.inspector is not None and store is None:
        log.info("inspector: off, as it shows the event store and --no-store keeps none")
    elif settings.inspector is not None and store is not None:  # stopped before the store it reads
        inspector_service(settings, store, resource, reactor,
                          gateway_url=lambda: f"http://{addresses[0]}" if addresses else None).setServiceParent(top)
    _UpstreamCheck(resource).setServiceParent(top)
    if settings.relay_url:
        tunnel_service(settings, resource, reactor, store).setServiceParent(top)
    ReloadService(reactor, resource, settings,
                  lambda: load_gateway(options["cli"], config=options["config"])).setServiceParent(top)
    heartbeat = TimerService(HEARTBEAT_SECONDS, resource.heartbeat)
    heartbeat.clock = reactor
    heartbeat.setServiceParent(top)
    return top
