"""The relay's public side and lifecycle in memory: a Clock, in-memory HTTP connections, and
tunnels the test plays the gateway of."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from mcpr.common.accesslog import LineWriter
from mcpr.relay.auth import Authenticator
from mcpr.relay.cluster.node import ClusterNode
from mcpr.relay.forwarding import TunnelForwarder
from mcpr.relay.front import RelayFront
from mcpr.relay.metrics import RelayMetrics, RequestStats
from mcpr.relay.registry import Registry
from mcpr.relay.service import RelayService
from mcpr.relay.settings import RelaySettings, load_relay
from mcpr.relay.tap import public_site
from mcpr.relay.tunnels.contract import ResponseSink, TunnelRequest

DOMAIN = "tunnel.test"


class FakeStream:
    def __init__(self, tunnel: FakeTunnel, request: TunnelRequest, sink: ResponseSink) -> None:
        self._tunnel = tunnel
        self.request = request
        self.sink = sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self._tunnel.streams.remove(self)

    def respond(self, status: int, body: bytes) -> None:
        """The gateway's whole response."""
        self._tunnel.streams.remove(self)
        self.sink.head(status, [(b"content-type", b"text/plain")])
        self.sink.data(body)
        self.sink.end()


class FakeTunnel:
    """A registered tunnel: it records the streams the front opens and how the relay closes it."""

    def __init__(self, subdomain: str, owner: str = "owner") -> None:
        self.subdomain = subdomain
        self.owner = owner
        self.streams: list[FakeStream] = []
        self.closes: list[tuple[int, str]] = []

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> FakeStream:
        stream = FakeStream(self, request, sink)
        self.streams.append(stream)
        return stream

    def message(self, payload: bytes, is_binary: bool) -> None:
        raise AssertionError("no gateway messages in memory")

    def evict(self) -> None:
        self.closes.append((4002, "evicted"))

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def closed(self) -> None:
        pass


def relay_settings(testcase: Any, *static_tokens: str, **cli: str) -> RelaySettings:
    """Settings as `twist mcpr-relay --domain tunnel.test` (plus `cli`) would read them, from an
    empty directory and no environment."""
    directory = Path(testcase.mktemp())
    directory.mkdir(parents=True)
    return load_relay({"domain": DOMAIN, **cli, "static_tokens": static_tokens or None}, env={}, cwd=directory)


class Client:
    """One public client's connection, in memory."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)

    def value(self) -> bytes:
        """Everything the relay wrote to this client so far."""
        return self.transport.value()

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class MemoryRelay:
    """A relay without listeners (as `makeService` builds it), serving requests sent with `request`."""

    def __init__(self, settings: RelaySettings, read: Callable[[], RelaySettings] | None = None,
                 cluster: Callable[[Registry], ClusterNode] | None = None) -> None:
        """`cluster` makes this relay a cluster node, given its registry."""
        self.clock = Clock()
        self.settings = settings
        self.metrics = RelayMetrics()
        self.registry = Registry.for_settings(self.clock, settings)
        self.access = io.StringIO()
        self.stats = RequestStats(self.metrics, self.clock, LineWriter(self.access, self.clock))
        self.forwarder = TunnelForwarder(self.clock, self.registry, self.stats,
                                         max_in_flight=settings.max_in_flight,
                                         headers_timeout=settings.headers_timeout,
                                         cluster=cluster(self.registry) if cluster else None)
        self.front = RelayFront(self.clock, DOMAIN, self.registry, self.forwarder, self.stats, Resource(),
                                public_url=settings.public_url, public_url_set=settings.public_url_set)
        # The channels' deadlines go on the Clock too, never on the global reactor.
        self.site = public_site(self.front, settings, self.clock, max_connections=1000)
        self.auth = Authenticator(self.clock, settings.tokens)
        self.service = RelayService(self.clock, settings, auth=self.auth, registry=self.registry,
                                    forwarder=self.forwarder, stats=self.stats, read=read)

    def tunnel(self, subdomain: str, owner: str = "owner") -> FakeTunnel:
        tunnel = FakeTunnel(subdomain, owner)
        self.registry.claim(tunnel, peer="127.0.0.1")
        return tunnel

    def request(self, host: str, path: str = "/") -> Client:
        """Send a GET on a connection of its own."""
        return self.request_bytes(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

    def request_bytes(self, data: bytes) -> Client:
        """Send `data` as it is on a connection of its own."""
        client = Client(self.site.buildProtocol(None))
        client.channel.dataReceived(data)
        return client
