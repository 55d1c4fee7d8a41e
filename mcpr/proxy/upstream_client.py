"""The gateway's HTTP/1.1 client for its upstream: kept-alive connections per origin, each
response read by `mcpr.common.response_reader`.

twisted.web's `Agent` and `HTTPConnectionPool` were a seventh of the gateway's CPU on a small
request (docs/PERFORMANCE.md, "The gateway's own upstream client"): a line-at-a-time parser,
a `Request`, a `Response`, body producers and Deferreds around each, a timer per request for
the pool, a pause and resume of the socket at every head, and, to work out a URL once, calls
into its private methods.  A pass-through hop needs less: the request's head written in one
piece (with its body when it is in memory), the response's status, header lines and framing,
and the body's bytes handed on as they are read.  treq's high-level client is no alternative:
it shares one cookie jar between users, follows redirects and decodes gzip.

The response is an `IResponse`, so what reads it (the proxy's `BodyPipe`, `readBody`) is
unchanged: its body's transport is a push producer over the connection, so a slow client
slows the upstream read.  A connection is reused only when the response said it may be and
was read to its end; one that sat idle for `idle_timeout` is closed first, since servers such
as uvicorn and Node close theirs after 5 s, and a POST sent into a closing socket is lost.
"""

from __future__ import annotations

from typing import IO, Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from mcpr.common.bodies import Upload
from mcpr.common.headers import FieldLines, content_length
from mcpr.common.host_endpoint import HostEndpoint
from mcpr.common.response_reader import HEAD_BUDGET, ResponseReader
from mcpr.proxy.upstream_endpoint import UpstreamEndpoint

Body = bytes | IO[bytes] | None
"""A request body: bytes already in memory (sent with the head, in one write), a spool file
(streamed from its start with backpressure), or none."""

# Methods a request may be sent again for, on a fresh connection, when a reused one closed
# before a byte of the answer (RFC 9110 §9.2.2): only without a body, as twisted.web's pool does.
_RETRIED = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_VISIBLE = frozenset(range(0x21, 0x7F))
# How an answer's body ends, made once: a Failure per request was 1 % of its CPU, and no reader
# changes the one it is given.
_DONE = Failure(ResponseDone())
_LOST = Failure(PotentialDataLoss())  # read until close: the close was its end


class UpstreamClosed(Exception):
    """The upstream closed the connection before its answer's head."""


class UpstreamBroke(Exception):
    """The upstream's answer stopped before its end, or could not be read."""


class _Origin(Factory):
    """One upstream origin: its endpoint, built once, and the factory of its connections."""

    noisy = False  # a log line per connection is noise here

    def __init__(self, client: UpstreamClient, key: tuple[bytes, bytes, int], endpoint: IStreamClientEndpoint) -> None:
        self.client = client
        self.key = key
        self.endpoint = endpoint
        self.idle: list[UpstreamConnection] = []  # the most recently used last

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self)


class _Target:
    """What a URL needs, worked out once: nearly every request goes to the one MCP URL."""

    __slots__ = ("origin", "path", "host")

    def __init__(self, origin: _Origin, path: bytes, host: bytes) -> None:
        self.origin = origin
        self.path = path
        self.host = host


@implementer(IResponse)
class UpstreamResponse:
    """The upstream's answer once its head is in; its body comes through `deliverBody`.

    The reason phrase is the standard one for the status: a hop passes the
    status on, and HTTP/2 has no phrase at all.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, exchange: _Exchange, code: int, headers: Headers, length: int | object) -> None:
        self._exchange = exchange
        self.code = code
        self.phrase = RESPONSES.get(code, b"")
        self.headers = headers
        self.length = length

    def deliverBody(self, protocol: IProtocol) -> None:
        self._exchange.deliver(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        raise NotImplementedError("an upstream response is never a redirect's")


@implementer(IPushProducer)
class _Exchange:
    """One request through its life: connecting or taking an idle connection, the head, the body.

    It is also the transport its body's protocol sees: pausing it pauses the
    connection's reads, and stopping it (the client left) closes the connection.
    """

    def __init__(self, method: bytes, target: _Target, head: bytes, body: Body) -> None:
        self.method = method
        self.target = target
        self.head = head
        self.body = body
        self.answered: Deferred[UpstreamResponse] = Deferred(self._cancel)
        self.connection: UpstreamConnection | None = None
        self._connecting: Deferred[Any] | None = None
        self._cancelled = False
        self.retried = False
        self.response: UpstreamResponse | None = None
        self._protocol: IProtocol | None = None
        self._early: list[bytes] = []  # body bytes read before the body had a protocol
        self._ended: Failure | None = None
        self.paused = False  # by the body's protocol
        self.stopped = False

    def connect(self) -> None:
        origin = self.target.origin
        self._connecting = connecting = origin.endpoint.connect(origin)
        connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        connection.carry(self)

    def _not_connected(self, reason: Failure) -> None:
        self._connecting = None
        if not self._cancelled:  # cancelled: `answered` fails with CancelledError when `_cancel` returns
            self.answered.errback(reason)

    def _cancel(self, _: Deferred[UpstreamResponse]) -> None:
        """The caller gave up before the head (its timeout, or its client left)."""
        self._cancelled = True
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.connection is not None:
            self.connection.drop(self)

    # -- what the connection reads

    def answer(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        table = Headers()
        lengths = []
        for name, value in headers:
            table.addRawHeader(name, value)
            if name == b"content-length":
                lengths.append(value)
        length: int | object = UNKNOWN_LENGTH
        if lengths:
            try:
                length = content_length(lengths)
            except ValueError:  # a bodiless answer's (HEAD, 204, 304): the reader did not need it
                pass
        self.response = UpstreamResponse(self, status, table, length)
        self.answered.callback(self.response)

    def data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._early.append(data)
            if self.connection is not None:
                self.connection.hold(True)  # one read at most waits for the body's protocol

    def end(self, reason: Failure) -> None:
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol.connectionLost(reason)
        else:
            self._ended = reason

    def deliver(self, protocol: IProtocol) -> None:
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]  # a producer as transport, as twisted.web's
        early, self._early = self._early, []
        for chunk in early:
            protocol.dataReceived(chunk)
        if self._ended is not None:
            reason, self._ended = self._ended, None
            self.end(reason)
        elif self.connection is not None:
            self.connection.hold(False)

    # -- the IPushProducer the body's protocol sees

    def pauseProducing(self) -> None:
        self.paused = True
        if self.connection is not None:
            self.connection.hold_reads()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.connection is not None:
            self.connection.hold_reads()

    def stopProducing(self) -> None:
        """The body's reader wants no more: its protocol hears of the end when the connection closes."""
        self.stopped = True
        if self.connection is not None:
            self.connection.drop(self)

    abortConnection = stopProducing  # what `readBody` calls when cancelled


class UpstreamConnection(Protocol):
    """One kept-alive connection to an upstream, carrying one exchange at a time."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self._reader = ResponseReader(self, HEAD_BUDGET)
        self.exchange: _Exchange | None = None
        self._upload: Upload | None = None
        self._holding = False  # body bytes wait for their protocol
        self._paused = False  # the transport's reads are paused
        self._eof = False
        self.reused = False
        self.idle_since = 0.0

    def connectionMade(self) -> None:
        self.origin.client.opened(self)

    def carry(self, exchange: _Exchange) -> None:
        """Send `exchange`'s request and read its answer."""
        self.exchange = exchange
        exchange.connection = self
        self._reader.expect(bodiless=exchange.method == b"HEAD")
        transport: Any = self.transport  # a TCP or TLS transport: a consumer as well
        body = exchange.body
        if body is None or isinstance(body, bytes):
            transport.write(exchange.head + body if body else exchange.head)
        else:
            transport.write(exchange.head)
            self._upload = Upload(transport, body)

    def _stop_upload(self) -> bool:
        """Stop a body still being sent; True if there was one."""
        upload, self._upload = self._upload, None
        return upload is not None and upload.stop()

    def drop(self, exchange: _Exchange) -> None:
        """`exchange` is abandoned: read nothing more of it and close the connection, which ends
        its body's protocol, if it has one, when it is lost."""
        if self.exchange is exchange:
            self._reader.stop()
            self._stop_upload()
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:  # nothing was asked: an idle connection cannot be trusted again
            self.origin.client.forget(self)
            self.abort()
            return
        self._reader.feed(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._upload = None
        self.origin.client.forget(self, lost=True)
        exchange = self.exchange
        self._eof = True
        if exchange is None or self._reader.closed():  # closed(): the end of an answer read until close
            return
        self.exchange = None
        exchange.connection = None
        if exchange.response is None:
            if exchange.stopped or exchange.answered.called:
                return
            if self.reused and not exchange.retried and exchange.method in _RETRIED and exchange.body is None:
                exchange.retried = True  # the upstream closed it while it was idle: on a fresh one, once
                exchange.connect()
                return
            if isinstance(reason.value, ConnectionDone):
                exchange.answered.errback(UpstreamClosed("the upstream closed the connection without answering"))
            else:  # the cause is the message: a reset, a TLS handshake's error (a certificate refused)
                exchange.answered.errback(reason)
        elif exchange.stopped:
            exchange.end(reason)
        else:
            exchange.end(Failure(UpstreamBroke("the upstream closed the connection before the answer's end")))

    # -- the ResponseReceiver

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        assert self.exchange is not None
        self.exchange.answer(status, headers)

    def body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.data(data)

    def complete(self, reusable: bool, rest: bytes) -> None:
        """The answer is read.  The connection is idle again before the body's protocol hears of
        the end, so that what the end sets going can take it."""
        exchange, self.exchange = self.exchange, None
        if self._stop_upload() or rest:
            reusable = False  # answered before its body was all sent, or bytes no one asked for
        if exchange is None:
            return
        exchange.connection = None
        if reusable:
            self._holding = False
            self.hold_reads()
            self.reused = True
            self.origin.client.idle(self)
        elif not self._eof:
            self.origin.client.forget(self)
            if self.transport is not None:
                self.transport.loseConnection()
        exchange.end(_LOST if self._eof else _DONE)

    def error(self, reason: str) -> None:
        exchange, self.exchange = self.exchange, None
        self._stop_upload()
        self.origin.client.forget(self)
        self.abort()
        if exchange is None:
            return
        exchange.connection = None
        if exchange.response is None:
            exchange.answered.errback(UpstreamBroke(f"the upstream's answer is not HTTP/1.1: {reason}"))
        else:
            exchange.end(Failure(UpstreamBroke(f"the upstream's answer broke its framing: {reason}")))

    # -- flow control

    def hold(self, holding: bool) -> None:
        self._holding = holding
        self.hold_reads()

    def hold_reads(self) -> None:
        """Reads wait while the exchange's body has no protocol yet, or its protocol paused it."""
        exchange = self.exchange
        want = self._holding or (exchange is not None and exchange.paused)
        if want != self._paused and self.transport is not None:
            self._paused = want
            if want:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]


class UpstreamClient:
    """Requests to the upstream over kept-alive connections, at most `max_idle_per_origin` idle
    per origin, none idle longer than `idle_timeout` seconds."""

    def __init__(self, reactor: Any, *, connect_timeout: float = 10.0, max_idle_per_origin: int = 64,
                 idle_timeout: float = 4.0, max_origins: int = 64, max_targets: int = 256,
                 endpoint: Callable[[URI], IStreamClientEndpoint] | None = None) -> None:
        """`endpoint` connects to an origin: by default TCP with `UpstreamEndpoint`'s options, TLS
        for https."""
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._endpoint = endpoint or self._upstream_endpoint
        self._max_idle = max_idle_per_origin
        self._idle_timeout = idle_timeout
        self._max_origins = max_origins
        self._max_targets = max_targets
        self._tls = BrowserLikePolicyForHTTPS()
        self._origins: dict[tuple[bytes, bytes, int], _Origin] = {}
        self._targets: dict[bytes, _Target] = {}
        self._open: set[UpstreamConnection] = set()
        self._closing: list[Deferred[None]] = []
        self._sweep: Any = None

    def request(self, method: bytes, url: bytes, headers: FieldLines, body: Body) -> Deferred[UpstreamResponse]:
        """The answer once its head is in.  Raises ValueError for a URL that cannot be sent;
        the Deferred fails with `SchemeNotSupported`, the connect's error, `UpstreamClosed` or
        `UpstreamBroke`, or `CancelledError` when cancelled."""
        target = self._targets.get(url)
        if target is None:
            try:
                target = self._target(url)
            except SchemeNotSupported as e:
                failed: Deferred[UpstreamResponse] = Deferred()
                failed.errback(e)
                return failed
        exchange = _Exchange(method, target, _head(method, target, headers, body), body)
        connection = self._take(target.origin)
        if connection is None:
            exchange.connect()
        else:
            connection.carry(exchange)
        return exchange.answered

    def _target(self, url: bytes) -> _Target:
        if not _VISIBLE.issuperset(url):
            raise ValueError(f"not a URL that can be sent: {url[:200]!r}")
        parsed = URI.fromBytes(url)
        if parsed.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {parsed.scheme!r}")
        key = (parsed.scheme, parsed.host, parsed.port)
        origin = self._origins.get(key)
        if origin is None:
            origin = _Origin(self, key, self._endpoint(parsed))
            if len(self._origins) >= self._max_origins:  # a table, not a leak: forgotten origins' idle ones close
                for old in self._origins.values():
                    self._close_idle(old, float("inf"))
                self._origins.clear()
                self._targets.clear()
            self._origins[key] = origin
        host = b"[%s]" % parsed.host if b":" in parsed.host else parsed.host
        if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
            host = b"%s:%d" % (host, parsed.port)
        target = _Target(origin, parsed.originForm, host)
        if len(self._targets) >= self._max_targets:
            self._targets.clear()
        self._targets[url] = target
        return target

    def _upstream_endpoint(self, uri: URI) -> IStreamClientEndpoint:
        tls = self._tls.creatorForNetloc(uri.host, uri.port) if uri.scheme == b"https" else None
        tcp = HostEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connect_timeout)
        return UpstreamEndpoint(tcp, tls)

    # -- the pool

    def _take(self, origin: _Origin) -> UpstreamConnection | None:
        idle = origin.idle
        while idle:
            connection = idle.pop()
            if self._reactor.seconds() - connection.idle_since < self._idle_timeout:
                return connection
            self.forget(connection)
            connection.transport.loseConnection()  # type: ignore[union-attr]
        return None

    def opened(self, connection: UpstreamConnection) -> None:
        self._open.add(connection)

    def idle(self, connection: UpstreamConnection) -> None:
        origin = connection.origin
        if len(origin.idle) >= self._max_idle or self._origins.get(origin.key) is not origin:
            self.forget(connection)
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        connection.idle_since = self._reactor.seconds()
        origin.idle.append(connection)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self._idle_timeout, self._swept)

    def forget(self, connection: UpstreamConnection, lost: bool = False) -> None:
        """`connection` carries nothing more: it is closing, or `lost`."""
        idle = connection.origin.idle
        if connection in idle:
            idle.remove(connection)
        if lost:
            self._open.discard(connection)
            if not self._open:
                closing, self._closing = self._closing, []
                for waiting in closing:
                    waiting.callback(None)

    def _swept(self) -> None:
        """One timer for every idle connection, not one per request: those idle for
        `idle_timeout` close, and it comes back when the next would."""
        self._sweep = None
        now = self._reactor.seconds()
        oldest = None
        for origin in self._origins.values():
            self._close_idle(origin, now - self._idle_timeout)
            if origin.idle:
                first = origin.idle[0].idle_since
                oldest = first if oldest is None else min(oldest, first)
        if oldest is not None:
            self._sweep = self._reactor.callLater(max(0.0, oldest + self._idle_timeout - now), self._swept)

    def _close_idle(self, origin: _Origin, before: float) -> None:
        """Close `origin`'s connections idle since `before` or earlier."""
        idle = origin.idle
        while idle and idle[0].idle_since <= before:
            connection = idle.pop(0)
            connection.transport.loseConnection()  # type: ignore[union-attr]

    def close(self) -> Deferred[None]:
        """Close every connection, busy ones too (the gateway is stopping); fires once all are lost."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for origin in self._origins.values():
            origin.idle.clear()
        if not self._open:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._closing.append(waiting)
        for connection in list(self._open):
            connection.abort()
        return waiting


def _head(method: bytes, target: _Target, headers: FieldLines, body: Body) -> bytes:
    """The request's head in one piece: the origin-form path, Host (the caller's, if it set one)
    first, the caller's other field lines as they are, and the body's length."""
    host = target.host
    lines = [b"%s %s HTTP/1.1" % (method, target.path), b""]
    for name, value in headers:
        if name == b"host":
            host = value
        else:
            lines.append(name + b": " + value)
    lines[1] = b"Host: " + host
    if isinstance(body, bytes):
        lines.append(b"Content-Length: %d" % len(body))
    elif body is not None:
        start = body.tell()
        body.seek(0, 2)
        lines.append(b"Content-Length: %d" % (body.tell() - start))
        body.seek(start)
    elif method in _BODY_METHODS:
        lines.append(b"Content-Length: 0")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)

