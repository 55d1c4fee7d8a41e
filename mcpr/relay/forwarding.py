"""Public requests into tunnels: limits, headers, the headers timeout, and writing the response back.

One `TunnelForwarder` serves the whole relay; each request gets a
`PublicResponse`, the tunnel's `ResponseSink` for it, which reports to the
`RequestStats` once the request ends, however it ends.

What enters a tunnel is always something an HTTP/2 request can carry: the
front (`mcpr.common.web.CappedChannel`) has refused every method, target and
field that HTTP/2 would refuse (h2's `validate_outbound_headers`, and the
character rules its peer checks), and `tunnel_request` builds the rest: an
origin-form path, one Host (the routing authority), no hop-by-hop or
connection-specific field, lower-case names.  What comes back is checked
before a byte of it reaches the public connection, whose framing is the
relay's own: a status outside 200-599 or a contradictory `Content-Length` is
a 502, and a declared length is held to (`PublicResponse`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from mcpr.common.headers import HOP_BY_HOP, add_forwarded, content_length, end_to_end_lines
from mcpr.common.web import body_length
from mcpr.relay.cluster.directory import DirectoryUnavailable
from mcpr.relay.cluster.node import ClusterNode
from mcpr.relay.cluster.peers import SECRET_HEADER, SUBDOMAIN_HEADER, internal_request
from mcpr.relay.metrics import RequestStats
from mcpr.relay.registry import Registry
from mcpr.relay.tunnels.contract import Stream, TunnelRequest

# Recomputed for the tunnel: its framing carries the body's length itself; Host is the routing
# authority, set again below (a `Connection: host` must not strip it).  The cluster's own fields
# are never a public client's to send.
_REQUEST_DROPPED = frozenset({b"content-length", b"expect", b"host", SECRET_HEADER, SUBDOMAIN_HEADER})
# The internal listener's mark on its 502 for a name this node does not hold (a moved tunnel).
NOT_HELD = b"x-mcpr-not-held"
# Claims about the client that only the edge (or a trusted proxy in front of it) may make.
_CLIENT_CLAIMS = frozenset({b"forwarded", b"x-real-ip"})
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
_VALUE_FORBIDDEN = re.compile(rb"[\x00\r\n]")


def _text(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (message + "\n").encode()


def _forwarded_for(ip: str) -> bytes:
    """A `Forwarded` element naming `ip` (RFC 7239 §4: IPv6 quoted and bracketed)."""
    return (f'for="[{ip}]"' if ":" in ip else f"for={ip}").encode()


def tunnel_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The request's headers as they go into a tunnel: end-to-end ones, lower-cased, with
    the relay's own X-Forwarded-For/-Host/-Proto.

    The relay is the edge: a public client's `X-Forwarded-*`, `Forwarded` and
    `X-Real-IP` are dropped and the trio is set from what the relay saw.  From
    a trusted proxy (`trusted_proxies`) they are kept and extended: its
    address is appended to `X-Forwarded-For` (and to `Forwarded`, if sent),
    and its `X-Forwarded-Host/-Proto` stay, since it saw the public side.  The
    gateway keeps the relay's Host and Proto in turn and appends the relay to
    `X-Forwarded-For` (mcpr/proxy/headers.py).
    """
    out = end_to_end_lines(request.requestHeaders, _REQUEST_DROPPED)
    peer = getattr(request.getClientAddress(), "host", None)
    if getattr(request.channel, "peer_trusted", False):
        prior = [value for name, value in out if name == b"forwarded"]
        if peer and prior:
            out = [line for line in out if line[0] != b"forwarded"]
            out.append((b"forwarded", b", ".join([*prior, _forwarded_for(peer)])))
    else:
        out = [line for line in out if line[0] not in _CLIENT_CLAIMS and not line[0].startswith(b"x-forwarded-")]
    host = request.getHeader(b"host")
    add_forwarded(out, client_ip=peer, host=host, proto=b"https" if request.isSecure() else b"http")
    if host is not None:
        out.insert(0, (b"host", host))
    return out


def tunnel_request(request: Request) -> TunnelRequest:
    """The public request as it enters a tunnel (see the module docstring for what it guarantees)."""
    content = request.content
    return TunnelRequest(request.method, request.uri, tunnel_headers(request), content, body_length(content))


class BadHead(Exception):
    """A tunnel's response head that cannot be passed to the public client."""


def declared_length(values: list[bytes]) -> int:
    """The one length a response's `Content-Length` field lines declare, or BadHead."""
    try:
        return content_length(values)
    except ValueError as e:
        raise BadHead(str(e)) from None


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
        self._left: int | None = None  # body bytes the head declared and the tunnel has yet to send

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
        try:
            passed, length = self._checked_head(status, headers)
        except BadHead as e:
            if self.stream is not None:
                self.stream.cancel()
            self.answer(502, f"tunnel error: {e}")
            return
        self.status = status
        request = self.request
        request.setResponseCode(status)
        own = request.responseHeaders
        for name in {b"date", b"server"}.intersection(name for name, _ in passed):
            own.removeHeader(name)  # the upstream's Date and Server, not a second pair of the relay's
        for name, value in passed:
            own.addRawHeader(name, value)
        if length is not None:
            own.setRawHeaders(b"content-length", [b"%d" % length])
            if request.method != b"HEAD" and status != 304:
                self._left = length
        request.write(b"")  # headers now: the body may take its time (SSE, long tool calls)

    def _checked_head(self, status: int, headers: list[tuple[bytes, bytes]]
                      ) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """The head's end-to-end fields (names lower-cased) and its declared length, or BadHead.

        The public connection's framing is the relay's: a tunnel's
        `Transfer-Encoding` and other hop-by-hop fields never pass, its
        `Content-Length` is one agreed number or the response is a 502, and
        only a final status (200-599) is a response at all (a legacy gateway
        can send a 1xx "response" with a body).  No body for 204 (nor a
        length), 304 or HEAD: twisted.web drops what is written for them.
        """
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            raise BadHead(f"status {status!r} is not a final HTTP status"[:80])
        dropped = HOP_BY_HOP
        lengths: list[bytes] = []
        passed = []
        for name, value in headers:
            if not _TOKEN.match(name) or _VALUE_FORBIDDEN.search(value):
                raise BadHead("malformed header field")
            name = name.lower()
            if name == b"connection":
                dropped = dropped | {t.strip().lower() for t in value.split(b",")}
            elif name == b"content-length":
                lengths.append(value)
            else:
                passed.append((name, value))
        passed = [(name, value) for name, value in passed if name not in dropped]
        length = declared_length(lengths) if lengths else None
        if status in NO_BODY_CODES and status != 304:
            length = None
        return passed, length

    def data(self, chunk: bytes) -> None:
        if self.done:
            return
        left = self._left
        if left is not None:
            if len(chunk) > left:
                self._overlong(chunk[:left])
                return
            self._left = left - len(chunk)
        self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        self._stats.bytes_out(len(chunk))
        self.request.write(chunk)

    def _overlong(self, rest: bytes) -> None:
        """More body than the head declared: the declared bytes go out, the rest never does, and
        the connection closes after this response, so no later request can read the excess."""
        if rest:
            self._write(rest)
        self._left = 0
        if self.stream is not None:
            self.stream.cancel()
        channel = self.request.channel
        if channel is not None:
            channel.persistent = False
        self._complete("tunnel sent more than its content-length")

    def end(self) -> None:
        if self.done:
            return
        if self._left:
            self._cut_short()
            return
        self._complete("ok")

    def _complete(self, outcome: str) -> None:
        self._finish(outcome)
        if not self._client_gone:
            self.request.finish()

    def _cut_short(self) -> None:
        """The tunnel ended before the declared length: the connection closes with the response
        incomplete, which its Content-Length makes plain to the client (RFC 9112 §8).  Closed, not
        reset: a reset would also drop the head and the bytes still in the send buffer."""
        self._finish("tunnel ended before its content-length")
        channel = self.request.channel
        if channel is not None and getattr(channel, "transport", None) is not None:
            channel.loseConnection()

    def _abort(self, outcome: str) -> None:
        """End a started response so that the public client sees it broke off, not a clean end."""
        self._finish(outcome)
        channel = self.request.channel
        transport = getattr(channel, "transport", None) if channel is not None else None
        if transport is not None:
            transport.abortConnection()

    def fail(self, reason: str) -> None:
        if self.done:
            return
        self._stop_timer()
        if self.status is None:
            self.answer(502, f"tunnel error: {reason}")
            return
        self._abort("aborted")

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
                 headers_timeout: float, cluster: ClusterNode | None = None) -> None:
        """`cluster`: this node's part in a cluster, where names it does not hold are looked for."""
        self._clock = clock
        self._registry = registry
        self._stats = stats
        self._max_in_flight = max_in_flight
        self._headers_timeout = headers_timeout
        self._cluster = cluster
        self.draining = False
        """Set by the relay's drain: responses then ask clients to close their connection."""

    def resource(self, subdomain: str) -> IResource:
        return _TunnelHost(self, subdomain)

    def forward(self, request: Request, subdomain: str) -> Any:
        """A public request: into the tunnel held here, or to the cluster node that holds it."""
        if self._registry.get(subdomain) is None and self._cluster is not None:
            response = PublicResponse(request, subdomain, self._stats, self._clock)
            forwarded = tunnel_request(request)
            self._prepare(request, response, forwarded)
            Deferred.fromCoroutine(self._to_node(self._cluster, subdomain, forwarded, response))
            return NOT_DONE_YET
        return self._into_tunnel(request, subdomain, tunnel_request)

    def forward_internal(self, request: Request, subdomain: str) -> Any:
        """A request another node forwarded (its internal listener's only job): into the tunnel
        held here, never to a third node, so a stale directory cannot make a loop."""
        self._stats.forwarded("in")
        return self._into_tunnel(request, subdomain, internal_request)

    def _into_tunnel(self, request: Request, subdomain: str, build: Callable[[Request], TunnelRequest]) -> Any:
        response = PublicResponse(request, subdomain, self._stats, self._clock)
        tunnel = self._registry.get(subdomain)
        if tunnel is None:
            if build is internal_request:
                request.setHeader(NOT_HELD, b"1")  # the forwarding node asks the directory again
            response.answer(502, "tunnel not found")
            return NOT_DONE_YET
        if tunnel.in_flight >= self._max_in_flight:
            response.answer(503, "tunnel overloaded")
            return NOT_DONE_YET
        forwarded = build(request)
        self._prepare(request, response, forwarded)
        response.stream = tunnel.open_stream(forwarded, response)
        return NOT_DONE_YET

    def _prepare(self, request: Request, response: PublicResponse, forwarded: TunnelRequest) -> None:
        if self.draining:
            request.setHeader(b"connection", b"close")
        response.start(self._headers_timeout, forwarded.body_length)

    async def _to_node(self, cluster: ClusterNode, subdomain: str, forwarded: TunnelRequest,
                       response: PublicResponse, *, retried: bool = False) -> None:
        """Look `subdomain` up in the directory and stream the request through its node.  The
        request is in flight (and under the headers timeout) from the start, so a client that
        leaves during the lookup is seen like any other."""
        try:
            node = await cluster.locate(subdomain)
        except DirectoryUnavailable:
            if not response.done:
                response.answer(503, "cluster registry unavailable")
            return
        if response.done:
            return
        if node is None:
            response.answer(502, "tunnel not found")
            return
        self._stats.forwarded("out")

        def again() -> None:
            Deferred.fromCoroutine(self._to_node(cluster, subdomain, forwarded, response, retried=True))

        attempt = _Attempt(response, lambda: cluster.stale(subdomain), None if retried else again)
        response.stream = cluster.peers.open_stream(node, subdomain, forwarded, attempt)


class _Attempt:
    """One node's answer to a forwarded request, passed on to the public response unless the node
    says it does not hold the tunnel (any more: its gateway moved since the directory was last
    asked), in which case the request goes once more to the node the directory names now."""

    def __init__(self, sink: PublicResponse, stale: Callable[[], None], again: Callable[[], None] | None) -> None:
        self._sink = sink
        self._stale = stale
        self._again = again
        self._dropped = False

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status == 502:
            self._stale()
            if (NOT_HELD, b"1") in headers:
                if self._again is not None:
                    self._dropped = True
                    self._again()
                    return
                headers = [(name, value) for name, value in headers if name != NOT_HELD]
        self._sink.head(status, headers)

    def data(self, chunk: bytes) -> None:
        if not self._dropped:
            self._sink.data(chunk)

    def end(self) -> None:
        if not self._dropped:
            self._sink.end()

    def fail(self, reason: str) -> None:
        self._stale()
        if not self._dropped:
            self._sink.fail(reason)

    def register(self, producer: IPushProducer) -> None:
        if not self._dropped:
            self._sink.register(producer)
