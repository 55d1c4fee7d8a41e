"""Prometheus metrics of one relay, in a registry of its own (tests run several relays in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tunnels = Gauge("mcpr_relay_tunnels_connected", "Tunnels currently registered.",
                             registry=self.registry)
        self.registrations = Counter("mcpr_relay_registrations", "Tunnel registrations by result.",
                                     ["result"], registry=self.registry)
        self.requests = Counter("mcpr_relay_requests", "Public requests by status class.", ["status_class"],
                                registry=self.registry)
        self.bytes = Counter("mcpr_relay_bytes", "Body bytes relayed.", ["direction"], registry=self.registry)
        self.in_flight = Gauge("mcpr_relay_in_flight", "Public requests being served.", registry=self.registry)

    def request(self, status: int | None) -> None:
        self.requests.labels(f"{status // 100}xx" if status else "none").inc()

    def bytes_in(self, n: int) -> None:
        if n:
            self.bytes.labels("in").inc(n)

    def bytes_out(self, n: int) -> None:
        self.bytes.labels("out").inc(n)

    def resource(self) -> Resource:
        root = Resource()
        metrics = MetricsResource(registry=self.registry)
        root.putChild(b"metrics", metrics)
        root.putChild(b"", metrics)
        return root
