"""Public requests into tunnels: limits, headers, the headers timeout, and writing the response back.

One `TunnelForwarder` serves the whole relay; each request gets a
`PublicResponse`, the tunnel's `ResponseSink` for it, which reports to the
`RequestStats` once the request ends, however it ends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpr.common.headers import HOP_BY_HOP, add_forwarded, end_to_end
from mcpr.common.web import body_length
from mcpr.relay.metrics import RequestStats
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import Stream, TunnelRequest

# Recomputed for the tunnel: its framing carries the body's length itself.
_REQUEST_DROPPED = frozenset({b"content-length", b"expect"})


def _text(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (message + "\n").encode()


def _tunnel_headers(request: Request) -> list[tuple[bytes, bytes]]:
    out = end_to_end(request.requestHeaders, _REQUEST_DROPPED)
    add_forwarded(out, client_ip=getattr(request.getClientAddress(), "host", None),
                  host=request.getHeader(b"host"), proto=b"https" if request.isSecure() else b"http")
    return [(name.lower(), value) for name, values in out.getAllRawHeaders() for value in values]


class PublicResponse:
    """Writes one tunnel response into the public request, and reports how it ended, once."""

    def __init__(self, request: Request, subdomain: str, stats: RequestStats, clock: IReactorTime) -> None:
        self.request = request
        self.subdomain = subdomain
        self._stats = stats
        self._clock = clock
        self.started = clock.seconds()
        self.status: int | None = None
        self.bytes = 0
        self.done = False
        self.stream: Stream | None = None
        self._counted = False
        self._client_gone = False
        self._producer = False
        self._timer: IDelayedCall | None = None

    def start(self, headers_timeout: float, body_length: int) -> None:
        """The request goes into a tunnel: it is in flight, and has `headers_timeout` seconds to get a head."""
        self._counted = True
        self._stats.started(body_length)
        self.request.notifyFinish().addErrback(self._connection_lost)
        self._timer = self._clock.callLater(headers_timeout, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.stream is not None:
            self.stream.cancel()
        self.answer(504, "tunnel headers timeout")

    def _connection_lost(self, reason: Failure) -> None:
        self._client_gone = True
        self.client_left()

    # -- the ResponseSink

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.done:
            return
        self._stop_timer()
        self.status = status
        request = self.request
        request.setResponseCode(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                request.responseHeaders.addRawHeader(name, value)
        request.write(b"")  # headers now: the body may take its time (SSE, long tool calls)

    def data(self, chunk: bytes) -> None:
        if self.done:
            return
        self.bytes += len(chunk)
        self._stats.bytes_out(len(chunk))
        self.request.write(chunk)

    def end(self) -> None:
        if self.done:
            return
        self._finish("ok")
        if not self._client_gone:
            self.request.finish()

    def fail(self, reason: str) -> None:
        if self.done:
            return
        self._stop_timer()
        if self.status is None:
            self.answer(502, f"tunnel error: {reason}")
            return
        self._finish("aborted")
        channel = self.request.channel
        transport = getattr(channel, "transport", None) if channel is not None else None
        if transport is not None:
            transport.abortConnection()

    def register(self, producer: IPushProducer) -> None:
        if not self.done and not self._client_gone:
            self.request.registerProducer(producer, True)
            self._producer = True

    # -- endings of the relay's own

    def client_left(self) -> None:
        if self.done:
            return
        self._stop_timer()
        if self.stream is not None:
            self.stream.cancel()
        self._finish("client-gone")

    def answer(self, status: int, message: str) -> None:
        body = _text(self.request, status, message)
        self.status = status
        self.bytes += len(body)
        self._finish(message)
        if not self._client_gone:
            self.request.setHeader(b"content-length", str(len(body)).encode())
            self.request.write(body)
            self.request.finish()

    def _finish(self, outcome: str) -> None:
        self.done = True
        self._stop_timer()
        if self._producer:
            self._producer = False
            if self.request.channel is not None:
                self.request.unregisterProducer()
        self._stats.finished(self.request, self.subdomain, self.status, self.bytes, self.started, outcome,
                             counted=self._counted)


class _TunnelHost(Resource):
    """Any request for one tunnel's host; the front makes one per request, as it knows the label."""

    isLeaf = True

    def __init__(self, forwarder: TunnelForwarder, subdomain: str) -> None:
        super().__init__()
        self._forwarder = forwarder
        self._subdomain = subdomain

    def render(self, request: Request) -> Any:
        return self._forwarder.forward(request, self._subdomain)


class TunnelForwarder:
    """Forwards public requests into the tunnel registered for their label, within the limits."""

    def __init__(self, clock: IReactorTime, registry: Registry, stats: RequestStats, *, max_in_flight: int,
                 headers_timeout: float) -> None:
        self._clock = clock
        self._registry = registry
        self._stats = stats
        self._max_in_flight = max_in_flight
        self._headers_timeout = headers_timeout
        self.draining = False
        """Set by the relay's drain: responses then ask clients to close their connection."""

    def resource(self, subdomain: str) -> IResource:
        return _TunnelHost(self, subdomain)

    def forward(self, request: Request, subdomain: str) -> Any:
        response = PublicResponse(request, subdomain, self._stats, self._clock)
        tunnel = self._registry.get(subdomain)
        if tunnel is None:
            response.answer(502, "tunnel not found")
            return NOT_DONE_YET
        if tunnel.in_flight >= self._max_in_flight:
            response.answer(503, "tunnel overloaded")
            return NOT_DONE_YET
        if self.draining:
            request.setHeader(b"connection", b"close")
        content = request.content
        length = body_length(content)
        response.start(self._headers_timeout, length)
        response.stream = tunnel.open_stream(
            TunnelRequest(request.method, request.uri, _tunnel_headers(request), content, length), response)
        return NOT_DONE_YET
