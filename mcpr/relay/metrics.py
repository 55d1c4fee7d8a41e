"""What the relay counts and logs: Prometheus metrics, the access log, registration outcomes.

Each public request reports once, when it ends, to `RequestStats`, which owns
the in-flight count (drain waits on it), the counters and the access-log line;
each registration socket reports to `RegistrationStats`.  The metrics live in
a registry of their own, since tests run several relays in one process.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.twisted import MetricsResource
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from mcpr.common.accesslog import LineWriter
from mcpr.common.protocol import CloseCode, label_of
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import Tunnel

log = Logger()

# Refusals counted under their own label; any other close code is a protocol error.
_REFUSAL_LABELS = frozenset({CloseCode.AUTH_FAILED, CloseCode.IN_USE, CloseCode.INVALID_SUBDOMAIN,
                             CloseCode.TOO_MANY})

# Answers the relay gives itself (no tunnel, overloaded, headers timeout): their message says it all.
_OWN_ANSWERS = frozenset({502, 503, 504})


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
        self.pooled_sockets = Gauge("mcpr_relay_pooled_sockets", "Pooled sockets open, over all tunnels.",
                                    registry=self.registry)
        self.pooled_requests = Counter("mcpr_relay_pooled_requests", "Public requests that took a pooled "
                                       "socket rather than an HTTP/2 stream.", registry=self.registry)
        self.cluster_forwarded = Counter(
            "mcpr_relay_cluster_forwarded", "Requests between cluster nodes: out, sent to the node holding "
            "the tunnel; in, received for a tunnel held here.", ["direction"], registry=self.registry)
        # Children looked up once: they are counted per request and per chunk, and a label lookup
        # costs a lock and a dict.
        self._by_class = [self.requests.labels(label) for label in ("none", "1xx", "2xx", "3xx", "4xx", "5xx")]
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")

    def watch_registry(self, up: Callable[[], bool]) -> None:
        """In cluster mode: whether the cluster's registry answers, as of the last heartbeat."""
        Gauge("mcpr_relay_cluster_registry_up", "1 while the cluster's registry (Redis) answered the last "
              "heartbeat, else 0.", registry=self.registry).set_function(lambda: float(up()))

    def request(self, status: int | None) -> None:
        self._by_class[status // 100 if status and 1 <= status // 100 <= 5 else 0].inc()

    def bytes_in(self, n: int) -> None:
        if n:
            self._bytes_in.inc(n)

    def bytes_out(self, n: int) -> None:
        self._bytes_out.inc(n)

    def resource(self) -> Resource:
        root = Resource()
        metrics = MetricsResource(registry=self.registry)
        root.putChild(b"metrics", metrics)
        root.putChild(b"", metrics)
        return root


class RequestStats:
    """Where every public request reports: in flight, bytes, and one access-log line when it ends."""

    def __init__(self, metrics: RelayMetrics, clock: IReactorTime, access_log: LineWriter | None = None) -> None:
        self._metrics = metrics
        self._clock = clock
        self.access_log = access_log if access_log is not None else LineWriter(None, clock)
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []
        self.bytes_out = metrics.bytes_out  # per chunk: no call in between
        self._forwarded = {direction: metrics.cluster_forwarded.labels(direction) for direction in ("in", "out")}

    def forwarded(self, direction: str) -> None:
        """A request sent to (`out`) or received from (`in`) another cluster node."""
        self._forwarded[direction].inc()

    def started(self, body_length: int) -> None:
        """A request went into a tunnel (one that was answered by the relay itself never starts)."""
        self.in_flight += 1
        self._metrics.in_flight.inc()
        self._metrics.bytes_in(body_length)

    def finished(self, request: Request, subdomain: str, status: int | None, size: int, started: float,
                 outcome: str, *, counted: bool) -> None:
        """A request ended (`outcome` is "ok", "aborted", "client-gone" or the relay's own answer);
        `counted` says whether it had `started`."""
        if counted:
            self.in_flight -= 1
            self._metrics.in_flight.dec()
            if not self.in_flight and self._idle:
                # From the reactor, not from inside the callbacks of the response that just ended.
                waiting, self._idle = self._idle, []
                self._clock.callLater(0, _fire, waiting)
        self._metrics.request(status)
        ms = (self._clock.seconds() - started) * 1000
        if self.access_log.enabled:
            note = "" if outcome == "ok" or status in _OWN_ANSWERS else f" ({outcome})"
            self.access_log.write(f"{subdomain} {request.method.decode('latin-1')} "
                                  f"{request.path.decode('latin-1')} {status if status is not None else '-'} "
                                  f"{size}B {ms:.0f}ms{note}")

    def too_large(self, subdomain: str | None, method: bytes, path: bytes) -> None:
        """A request refused with 413 while its body arrived, before any resource saw it."""
        self._metrics.request(413)
        self.access_log.write(f"{subdomain or '-'} {method.decode('latin-1')} "
                              f"{path.split(b'?')[0].decode('latin-1')} 413 0B 0ms (body too large)")

    def refused(self, subdomain: str | None, status: int, method: bytes, path: bytes, why: str) -> None:
        """A request the front answered itself before any resource saw it (malformed, too slow)."""
        self._metrics.request(status)
        self.access_log.write(f"{subdomain or '-'} {method.decode('latin-1')} "
                              f"{path.split(b'?')[0].decode('latin-1')} {status} 0B 0ms ({why})")

    def when_idle(self) -> Deferred[None]:
        """Fires once no request is in flight (now, if none is); cancellable, e.g. by a timeout."""
        if not self.in_flight:
            return succeed(None)
        waiting: Deferred[None] = Deferred(self._forget)
        self._idle.append(waiting)
        return waiting

    def _forget(self, waiting: Deferred[None]) -> None:
        if waiting in self._idle:
            self._idle.remove(waiting)


def _fire(waiting: list[Deferred[None]]) -> None:
    for d in waiting:
        if not d.called:  # a timeout may have cancelled it in the meantime
            d.callback(None)


class RegistrationStats:
    """Counts and logs what happens on registration sockets (the registration observer)."""

    def __init__(self, metrics: RelayMetrics, registry: Registry) -> None:
        self._metrics = metrics
        self._registry = registry
        self._ok = metrics.registrations.labels("ok")  # looked up once, not per registration

    def registered(self, tunnel: Tunnel, hint: str, peer: str | None, url: str) -> None:
        self._ok.inc()
        self._metrics.tunnels.set(len(self._registry))
        log.info("tunnel {subdomain} registered (token {hint}, from {peer}): {url}", subdomain=tunnel.subdomain,
                 hint=hint, peer=peer, url=url)

    def refused(self, code: int, reason: str, hint: str | None, peer: str | None) -> None:
        result = label_of(code) if code in _REFUSAL_LABELS else "protocol_error"
        self._metrics.registrations.labels(result).inc()
        log.info("registration refused ({code} {reason}; token {hint}, from {peer})", code=code, reason=reason,
                 hint=hint or "-", peer=peer)

    def unregistered(self, tunnel: Tunnel, released: bool) -> None:
        """`released`: the tunnel still held its subdomain (an evicted one did not)."""
        if released:
            log.info("tunnel {subdomain} disconnected", subdomain=tunnel.subdomain)
        self._metrics.tunnels.set(len(self._registry))

    def pooled_sockets(self, delta: int) -> None:
        self._metrics.pooled_sockets.inc(delta)

    def pooled_request(self) -> None:
        self._metrics.pooled_requests.inc()
