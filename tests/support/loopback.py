"""Helpers for tests that use real listeners on 127.0.0.1."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import waitUntilAllDisconnected
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site


class TrackingSite(Site):
    """A Site that remembers its connections, so a test can wait for them to close."""

    noisy = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections.append(getattr(protocol, "_channel", protocol))
        return protocol

    def log(self, request) -> None:
        pass


def track(site: Site) -> Site:
    """Give any Site (e.g. the gateway's) the same connection list."""
    original = site.buildProtocol
    site.connections = []

    def buildProtocol(addr):
        protocol = original(addr)
        site.connections.append(getattr(protocol, "_channel", protocol))
        return protocol

    site.buildProtocol = buildProtocol
    return site


async def listen(testcase, site: Site) -> int:
    """Serve `site` on 127.0.0.1:0; the test's cleanup closes it and waits for its connections."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)

    def close() -> Deferred:
        for protocol in site.connections:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return DeferredList([
            Deferred.fromCoroutine(_stop(port)),
            waitUntilAllDisconnected(reactor, list(site.connections)),
        ])

    testcase.addCleanup(close)
    return port.getHost().port


async def _stop(port) -> None:
    await port.stopListening()


def client_agent(testcase) -> Agent:
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return Agent(reactor, pool=pool)


async def sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


