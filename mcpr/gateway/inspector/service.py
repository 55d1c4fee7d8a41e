"""The inspector in the gateway's service tree: its reader thread, its listener, and the replay
listener, started after the store and stopped before it."""

from __future__ import annotations

import ipaddress
import sqlite3
from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from mcpr import __version__
from mcpr.common.service import address_of, listener
from mcpr.common.settings import ConfigError
from mcpr.common.web import CappedSite
from mcpr.gateway.inspector.feed import LiveFeed
from mcpr.gateway.inspector.reader import StoreReader
from mcpr.gateway.inspector.replay import MAX_BODY, Replayer
from mcpr.gateway.inspector.web import InspectorResource
from mcpr.gateway.settings import DEFAULT_INSPECTOR, GatewaySettings
from mcpr.gateway.store import queries
from mcpr.gateway.store.queries import Filters, RequestRow
from mcpr.gateway.store.recorder import EventStore
from mcpr.proxy.resource import ProxyResource

log = Logger()

# Replays reach the proxy core through this listener of the gateway's own, never offered to anyone.
REPLAY_LISTEN = "tcp:0:interface=127.0.0.1"


class _Watching(Service):
    """The live feed hears of the store's writes while the inspector runs."""

    def __init__(self, store: EventStore, feed: LiveFeed) -> None:
        self._store = store
        self._feed = feed

    def startService(self) -> None:
        super().startService()
        self._store.watch(self._feed.rows_written, lambda: bool(self._feed.subscribers))

    def stopService(self) -> None:
        super().stopService()
        self._store.unwatch(self._feed.rows_written)


class Inspector(MultiService):
    """The inspector's services; `url` once its listener is bound."""

    def __init__(self) -> None:
        super().__init__()
        self.url: str | None = None
        self.replay_origin: str | None = None


def inspector_service(settings: GatewaySettings, store: EventStore, proxy: ProxyResource, reactor: Any, *,
                      gateway_url: Callable[[], str | None]) -> Inspector:
    """The inspector of `settings.inspector` (an endpoint) over `store`, replaying through `proxy`.

    A port that cannot be bound is a start-up error when the endpoint was asked
    for, and a warning when it is the default (`tcp:4040`, which another gateway
    on this machine may hold): the gateway then runs without an inspector.
    """
    assert settings.inspector is not None, "inspector_service needs an endpoint"
    top = Inspector()
    reader = StoreReader(store.settings.path, reactor)
    reader.setServiceParent(top)

    def backfill(filters: Filters, after: int | None, limit: int) -> Deferred[tuple[int, list[RequestRow]]]:
        def question(db: sqlite3.Connection) -> tuple[int, list[RequestRow]]:
            start = queries.last_id(db) if after is None else after
            return start, queries.requests(db, filters, after=start, limit=limit)
        # After the batch being written: it left without rows for the live feed if no page was open.
        return store.settled().addCallback(lambda _: reader.ask(question))

    feed = LiveFeed(backfill)
    _Watching(store, feed).setServiceParent(top)

    def replay_bound(port: IListeningPort) -> None:
        top.replay_origin = f"http://{address_of(port)}"

    replay_site = CappedSite(proxy, max_request_body=settings.max_request_body, via="replay")
    replay_site.displayTracebacks = False
    listener(REPLAY_LISTEN, replay_site, replay_bound, reactor,
             where="the inspector's replay listener").setServiceParent(top)

    def info() -> dict[str, Any]:
        return {"version": __version__, "upstream": settings.mcp, "gateway": gateway_url(),
                "store": str(store.settings.path), "live_pages": len(feed.subscribers)}

    resource = InspectorResource(reactor, reader.ask, feed, Replayer(reactor, lambda: top.replay_origin), info)
    # Replay bodies are capped by `replay.MAX_BODY`; the JSON around one may escape every byte.
    site = CappedSite(resource, max_request_body=6 * MAX_BODY + 4096, via="inspector")
    site.displayTracebacks = False

    explicit = "inspector" in settings.sources
    where = settings.sources.get("inspector", f"--inspector (the default, {DEFAULT_INSPECTOR})")

    def bound(port: IListeningPort) -> None:
        host = getattr(port.getHost(), "host", None)
        if host is not None and not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            # Its Host check stops rebinding pages, not a client of another machine that says
            # `Host: localhost`: the captured traffic and replay stay on this machine.
            port.stopListening()
            raise ConfigError(f"{where}: {settings.inspector} listens on {host}, not on loopback: the inspector "
                              "shows captured requests and replays them, so it listens on this machine only "
                              "(interface=127.0.0.1 or ::1)")
        top.url = f"http://{address_of(port)}/"
        log.info("inspector: {url} (--inspector off turns it off)", url=top.url)

    def unbound(line: str) -> None:
        log.warn("{line}; running without the inspector (--inspector ENDPOINT picks another, --inspector off "
                 "says nothing)", line=line)

    listener(settings.inspector, site, bound, reactor, where=where,
             unbound=None if explicit else unbound).setServiceParent(top)
    return top
