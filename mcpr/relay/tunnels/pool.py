"""A tunnel's pooled sockets: plain HTTP/1.1 connections its gateway opened beside the registration.

A public request through a pooled socket costs the relay one HTTP/1.1 head
written and one read (`mcpr.common.response_reader`), where an HTTP/2 stream
inside WebSocket messages costs h2, HPACK and Autobahn framing in both
processes (docs/PERFORMANCE.md, "A design
that reaches localtunnel").  The registration answer hands the gateway a key;
the gateway opens up to `size` sockets with it (`GET /_tunnel/pool`,
`Upgrade: mcpr-pool`); the relay answers 101 and from then on writes requests
into an idle socket, one exchange at a time, and the gateway answers them as
its direct-mode listener would (docs/protocol.md, "Pooled sockets").  When
every pooled socket is busy, requests take the tunnel's HTTP/2 streams, so
the pool is never a queue.  The WebSocket stays the control channel: when it
closes, so do the pooled sockets.

A pooled socket belongs to its gateway, which may be hostile: what it sends
while no request is asked, past a response's end, or anything that is not a
response framed by RFC 9112 (a head that does not end within `HEAD_BUDGET`
bytes included) closes that socket (the request, if any, gets a 502), and
the public side's framing stays the relay's (`forwarding.PublicResponse`
checks every head).  Nothing it does reaches another tunnel.
"""

from __future__ import annotations

import hmac
import secrets
import typing
from typing import Any, Callable

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpr.common import protocol as wire
from mcpr.common.bodies import Upload
from mcpr.common.names import valid_label
from mcpr.common.response_reader import HEAD_BUDGET, ResponseReader
from mcpr.common.web import take_over
from mcpr.relay.tunnels.contract import ResponseSink, Stream, TunnelRequest
from mcpr.relay.tunnels.http1 import WHOLE_BODY, Kept

log = Logger()

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


def request_head(request: TunnelRequest) -> bytes:
    """The request's head as it goes into a pooled socket: its headers as the front made them
    (end-to-end, lower-cased, Host first) and the body's length."""
    lines = [b"%s %s HTTP/1.1" % (request.method, request.path)]
    lines.extend(b"%s: %s" % pair for pair in request.headers)
    if request.body_length or request.method in _BODY_METHODS:
        lines.append(b"content-length: %d" % request.body_length)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


@implementer(IPushProducer)
class PooledSocket(Protocol):
    """One pooled socket: one exchange at a time, its response read by a `ResponseReader` and
    passed into the sink.  The socket is the sink's producer, so a slow public reader pauses it,
    and the `Stream` its caller may cancel: a cancelled exchange closes the socket rather than
    reading the rest of its response."""

    def __init__(self, pool: SocketPool) -> None:
        self._pool = pool
        self._reader = ResponseReader(self, HEAD_BUDGET)
        self._sink: ResponseSink | None = None  # while an exchange runs
        self._upload: Upload | None = None
        self._paused = False
        self._head = False
        self.busy = False

    def connectionMade(self) -> None:
        self._pool.idle_again(self)

    def send(self, request: TunnelRequest, sink: ResponseSink) -> Stream:
        self.busy = True
        self._sink = sink
        self._head = False
        self._reader.expect(bodiless=request.method == b"HEAD")
        head = request_head(request)
        body, length = request.body, request.body_length
        transport: Any = self.transport  # a TCP or TLS transport: a consumer as well
        if body is None or not length:
            transport.write(head)
        elif length <= WHOLE_BODY:  # with its head, in one write
            body.seek(0)
            transport.write(head + body.read(length))
            body.seek(0)  # as the other hops leave a spool: ready to be sent again
        else:
            transport.write(head)
            body.seek(0)
            self._upload = Upload(transport, Kept(body))
        return _Exchange(self, sink)

    def _stop_upload(self) -> bool:
        """Stop a body still being sent; True if there was one."""
        upload, self._upload = self._upload, None
        return upload is not None and upload.stop()

    # -- the gateway's bytes

    def dataReceived(self, data: bytes) -> None:
        if not self.busy:
            self._pool.offence(self, "bytes while no request was asked")
            return
        self._reader.feed(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._upload = None
        if self.busy and not self._reader.closed():  # closed() ends a response read until close
            sink, self._sink = self._sink, None
            self._over()
            if sink is not None:
                if not self._head:
                    log.info("tunnel {subdomain}: a pooled socket closed before the response head",
                             subdomain=self._pool.subdomain)
                sink.fail("pooled socket lost" if self._head else "pooled socket failed")
        self._pool.lost(self)

    # -- the ResponseReceiver

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._head = True
        sink = self._sink
        if sink is not None:
            sink.head(status, headers)
            if self._sink is sink:  # not cancelled by what the sink made of the head
                sink.register(self)

    def body(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.data(data)

    def complete(self, reusable: bool, rest: bytes) -> None:
        """The response is read.  The socket is idle again before the sink hears of the end, so
        that the next request the end lets in can take it."""
        sink, self._sink = self._sink, None
        if self._stop_upload():
            reusable = False  # answered before its body was all sent
        self._over()
        if rest:
            self._pool.offence(self, "bytes past the end of a response")
        elif reusable:
            if self._paused:
                self.resumeProducing()
            self._pool.idle_again(self)
        else:
            self._pool.lost(self)
            if self.transport is not None:
                self.transport.loseConnection()
        if sink is not None:
            sink.end()

    def error(self, reason: str) -> None:
        sink, self._sink = self._sink, None
        self._stop_upload()
        self._over()
        self._pool.offence(self, reason)
        if sink is not None:
            sink.fail("pooled socket lost" if self._head else "pooled socket failed")

    def _over(self) -> None:
        if self.busy:
            self.busy = False
            self._pool.busy -= 1

    # -- the Stream

    def cancel(self, sink: ResponseSink | None) -> None:
        """`sink`'s exchange is over for its caller: if it still runs, the rest of its response is
        not read and the socket closes."""
        if self._sink is not sink or sink is None:
            return
        self._sink = None
        self._reader.stop()
        self._stop_upload()
        self._over()
        self._pool.lost(self)
        self.abort()

    # -- the IPushProducer the sink pauses

    def pauseProducing(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.cancel(self._sink)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _Exchange:
    """One exchange as its caller may cancel it: only while it runs, never a later one on the
    same socket."""

    __slots__ = ("_socket", "_sink")

    def __init__(self, socket: PooledSocket, sink: ResponseSink) -> None:
        self._socket = socket
        self._sink = sink

    def cancel(self) -> None:
        self._socket.cancel(self._sink)


class PoolObserver(typing.Protocol):
    """Told of the relay's pooled sockets (metrics)."""

    def pooled_sockets(self, delta: int) -> None:
        """Pooled sockets opened (+1) or closed (-1)."""

    def pooled_request(self) -> None:
        """A public request took a pooled socket."""


class _Unobserved:
    def pooled_sockets(self, delta: int) -> None:
        pass

    def pooled_request(self) -> None:
        pass


INITIAL = 4
"""Pooled sockets a gateway opens at registration; more when the relay asks (`SocketPool.wanted`)."""


class SocketPool:
    """One tunnel's pooled sockets: who may add one (the key), how many, which are idle.

    The gateway opens `wanted` sockets at first.  A request that finds none
    idle takes an HTTP/2 stream and, once the gateway has opened what it was
    asked for, doubles `wanted` (up to `size`) through `ask`, a control message
    on the registration socket: an idle tunnel costs a few sockets, a busy one
    gets as many as its concurrency needs.
    """

    def __init__(self, subdomain: str, size: int, observer: PoolObserver = _Unobserved(),
                 ask: Callable[[int], None] | None = None) -> None:
        self.subdomain = subdomain
        self.size = size
        self.wanted = min(INITIAL, size)
        self._ask = ask
        self._observer = observer
        self.key = secrets.token_urlsafe(32)
        self.busy = 0
        """Exchanges running on a pooled socket."""
        self._sockets: set[PooledSocket] = set()
        self._idle: list[PooledSocket] = []  # the most recently used last: taken first, its caches warm
        self._closed = False

    def __len__(self) -> int:
        return len(self._sockets)

    def matches(self, key: bytes) -> bool:
        return hmac.compare_digest(key, self.key.encode("ascii"))

    def adopt(self) -> PooledSocket | None:
        """A new pooled socket, or None when the pool is full or closed."""
        if self._closed or len(self._sockets) >= self.size:
            return None
        socket = PooledSocket(self)
        self._sockets.add(socket)
        self._observer.pooled_sockets(1)
        return socket

    def open_stream(self, request: TunnelRequest, sink: ResponseSink) -> Stream | None:
        """`request` on an idle pooled socket, or None if none is idle."""
        if not self._idle:
            self._grow()
            return None
        socket = self._idle.pop()
        self.busy += 1
        self._observer.pooled_request()
        return socket.send(request, sink)

    def _grow(self) -> None:
        delivered = len(self._sockets) >= self.wanted  # the gateway opened what it was asked for
        if self._ask is not None and not self._closed and delivered and self.wanted < self.size:
            self.wanted = min(self.size, 2 * self.wanted)
            self._ask(self.wanted)

    def idle_again(self, socket: PooledSocket) -> None:
        if not self._closed and socket in self._sockets:
            self._idle.append(socket)

    def lost(self, socket: PooledSocket) -> None:
        if socket in self._sockets:
            self._sockets.remove(socket)
            self._observer.pooled_sockets(-1)
        if socket in self._idle:
            self._idle.remove(socket)

    def offence(self, socket: PooledSocket, why: str) -> None:
        log.warn("tunnel {subdomain}: closing a pooled socket: {why}", subdomain=self.subdomain, why=why)
        self.lost(socket)
        socket.abort()

    def close(self) -> None:
        """The tunnel is gone: so are its pooled sockets (a request on one fails as its socket does)."""
        self._closed = True
        self._idle.clear()
        for socket in list(self._sockets):
            socket.abort()


_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + wire.POOL_UPGRADE + b"\r\n\r\n"


class PoolResource(Resource):
    """`/_tunnel/pool`: a gateway's socket joins its tunnel's pool, given the pool's key.

    A key that no tunnel held here has and a subdomain no tunnel holds get the
    same 403, so the endpoint tells a stranger nothing; a full pool gets 429.
    """

    isLeaf = True

    def __init__(self, find: Callable[[str], SocketPool | None]) -> None:
        super().__init__()
        self._find = find

    def render(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            return _refuse(request, 405, "a pooled socket is opened with GET")
        upgrade = request.getHeader(b"upgrade") or b""
        if wire.POOL_UPGRADE not in {token.strip().lower() for token in upgrade.split(b",")}:
            request.setHeader(b"upgrade", wire.POOL_UPGRADE)
            return _refuse(request, 426, f"expected Upgrade: {wire.POOL_UPGRADE.decode()}")
        subdomain, _, key = (request.getHeader(wire.POOL_HEADER) or b"").partition(b" ")
        label = subdomain.decode("latin-1")
        pool = self._find(label) if valid_label(label) else None
        if pool is None or not pool.matches(key):
            return _refuse(request, 403, "no tunnel on this relay holds that pool key")
        socket = pool.adopt()
        if socket is None:
            return _refuse(request, 429, f"the tunnel's pool is full ({pool.size} sockets)")
        take_over(request, socket, _SWITCHING)
        return NOT_DONE_YET


def _refuse(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status, b"Upgrade Required" if status == 426 else None)  # twisted.web lacks 426
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"connection", b"close")
    request.channel.persistent = False  # the gateway closes a refused socket; no need to keep it
    return (message + "\n").encode()
