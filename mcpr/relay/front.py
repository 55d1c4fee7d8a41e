"""The relay's public HTTP side: route by Host, forward into tunnels, answer for itself.

`<label>.<domain>` goes into that label's tunnel; any other host only gets the
relay's own endpoints (`/healthz`, `/_tunnel/register`, and a status page on
the bare domain), so the relay can be health-checked on 127.0.0.1 and
registered with through any name that reaches it.
"""

from __future__ import annotations

import html
import json
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpr import __version__
from mcpr.common.headers import HOP_BY_HOP, add_forwarded, end_to_end
from mcpr.common.names import valid_label
from mcpr.common.web import body_length
from mcpr.relay.metrics import RelayMetrics
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import TunnelRequest

log = Logger()

# Recomputed for the tunnel: its framing carries the body's length itself.
_REQUEST_DROPPED = frozenset({b"content-length", b"expect"})


def split_host(host: bytes | None, domain: str) -> tuple[str, str | None]:
    """("tunnel", label) for `<label>.<domain>`, ("bare", None) for the domain, else ("other", None)."""
    if not host:
        return "other", None
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return "other", None
    name = text.rsplit(":", 1)[0] if ":" in text else text
    name = name.rstrip(".")
    if name == domain:
        return "bare", None
    suffix = "." + domain
    if name.endswith(suffix):
        label = name[: -len(suffix)]
        if valid_label(label):
            return "tunnel", label
    return "other", None


def _text(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (message + "\n").encode()


class PublicResponse:
    """Writes one tunnel response into the public request, and keeps the access log honest."""

    def __init__(self, front: "TunnelForwarder", request: Request, subdomain: str, started: float) -> None:
        self._front = front
        self.request = request
        self.subdomain = subdomain
        self.started = started
        self.status: int | None = None
        self.bytes = 0
        self.done = False
        self.stream = None
        self.counted = False
        self._producer = False
        self._timer = None

    def start_timer(self, seconds: float) -> None:
        self._timer = self._front.reactor.callLater(seconds, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.stream is not None:
            self.stream.cancel()
        self.answer(504, "tunnel headers timeout")

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
        self._front.metrics.bytes_out(len(chunk))
        self.request.write(chunk)

    def end(self) -> None:
        if self.done:
            return
        self._finish("ok")
        if not self.request._disconnected:
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
        if not self.done and not self.request._disconnected:
            self.request.registerProducer(producer, True)
            self._producer = True

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
        if not self.request._disconnected:
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
        self._front.finished(self, outcome)


class TunnelForwarder(Resource):
    """Forwards every request for one host into the tunnel registered for its label."""

    isLeaf = True

    def __init__(self, relay: "RelayFront", subdomain: str) -> None:
        super().__init__()
        self._relay = relay
        self.reactor = relay.reactor
        self.metrics = relay.metrics
        self._subdomain = subdomain

    def render(self, request: Request) -> Any:
        relay = self._relay
        started = self.reactor.seconds()
        tunnel = relay.registry.get(self._subdomain)
        response = PublicResponse(self, request, self._subdomain, started)
        if tunnel is None:
            response.answer(502, "tunnel not found")
            return NOT_DONE_YET
        if tunnel.in_flight >= relay.max_in_flight:
            response.answer(503, "tunnel overloaded")
            return NOT_DONE_YET
        if relay.draining:
            request.setHeader(b"connection", b"close")
        relay.in_flight += 1
        self.metrics.in_flight.inc()
        response.counted = True
        request.notifyFinish().addErrback(lambda _: response.client_left())
        response.start_timer(relay.headers_timeout)
        content = request.content
        length = body_length(content)
        self.metrics.bytes_in(length)
        response.stream = tunnel.open_stream(
            TunnelRequest(request.method, request.uri, self._headers(request), content, length), response)
        return NOT_DONE_YET

    def _headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        out = end_to_end(request.requestHeaders, _REQUEST_DROPPED)
        add_forwarded(out, client_ip=getattr(request.getClientAddress(), "host", None),
                      host=request.getHeader(b"host"), proto=b"https" if request.isSecure() else b"http")
        return [(name.lower(), value) for name, values in out.getAllRawHeaders() for value in values]

    def finished(self, response: PublicResponse, outcome: str) -> None:
        relay = self._relay
        if response.counted:
            relay.in_flight -= 1
            self.metrics.in_flight.dec()
        relay.request_done(response.subdomain, self.request_line(response), response.status, response.bytes,
                           response.started, outcome)

    def request_line(self, response: PublicResponse) -> tuple[str, str]:
        request = response.request
        return request.method.decode("latin-1"), request.path.decode("latin-1")


class _Health(Resource):
    isLeaf = True

    def __init__(self, relay: "RelayFront") -> None:
        super().__init__()
        self._relay = relay

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self._relay.health()).encode()

    render_HEAD = render_GET


class _Status(Resource):
    isLeaf = True

    def __init__(self, relay: "RelayFront") -> None:
        super().__init__()
        self._relay = relay

    def render_GET(self, request: Request) -> bytes:
        h = self._relay.health()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        domain = html.escape(self._relay.domain)
        return (
            "<!doctype html><meta charset=utf-8><title>mcpr relay</title>"
            f"<h1>mcpr relay for {domain}</h1>"
            f"<p>{h['tunnels']} tunnel(s) connected, {h['in_flight']} request(s) in flight, "
            f"up {h['uptime_s']:.0f} s, version {html.escape(__version__)}.</p>"
            f"<p>Gateways connect to <code>wss://{domain}/_tunnel/register</code> and are served at "
            f"<code>https://&lt;name&gt;.{domain}</code>.</p>"
        ).encode()


class RelayFront(Resource):
    """The root resource: picks a child by Host, then by path."""

    def __init__(self, reactor, domain: str, registry: Registry, metrics: RelayMetrics, register: IResource,
                 *, max_in_flight: int, headers_timeout: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.domain = domain
        self.registry = registry
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.headers_timeout = headers_timeout
        self.in_flight = 0
        self.draining = False
        self.started = reactor.seconds()
        self._health = _Health(self)
        self._status = _Status(self)
        self._tunnel_dir = Resource()
        self._tunnel_dir.putChild(b"register", register)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        kind, label = split_host(request.getHeader(b"host"), self.domain)
        if kind == "tunnel":
            return TunnelForwarder(self, label)
        if path == b"healthz":
            return self._health
        if path == b"_tunnel":
            return self._tunnel_dir
        if path == b"" and kind == "bare" and not request.postpath:
            return self._status
        return pages.notFound("Not Found", "No such tunnel or relay page.")

    def render(self, request: Request) -> bytes:
        return self.getChildWithDefault(b"", request).render(request)

    def health(self) -> dict:
        return {
            "status": "draining" if self.draining else "ok",
            "domain": self.domain,
            "tunnels": len(self.registry),
            "in_flight": self.in_flight,
            "uptime_s": round(self.reactor.seconds() - self.started, 3),
            "version": __version__,
        }

    def request_done(self, subdomain: str, line: tuple[str, str], status: int | None, size: int,
                     started: float, outcome: str) -> None:
        ms = (self.reactor.seconds() - started) * 1000
        self.metrics.request(status)
        log.info("{subdomain} {method} {path} {status} {bytes}B {ms:.0f}ms{note}", subdomain=subdomain,
                 method=line[0], path=line[1], status=status if status is not None else "-", bytes=size, ms=ms,
                 note="" if outcome in ("ok",) or status in (502, 503, 504) else f" ({outcome})")

    def too_large(self, request: Request, method: bytes, path: bytes) -> None:
        kind, label = split_host(request.getHeader(b"host"), self.domain)
        self.metrics.request(413)
        log.info("{subdomain} {method} {path} 413 0B 0ms (body too large)", subdomain=label or "-",
                 method=method.decode("latin-1"), path=path.split(b"?")[0].decode("latin-1"))
