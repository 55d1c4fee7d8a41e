"""A tunnel's pooled sockets: plain HTTP/1.1 connections its gateway opened beside the registration.

A public request through a pooled socket costs the relay one twisted.web
client exchange, where an HTTP/2 stream inside WebSocket messages costs h2,
HPACK and Autobahn framing in both processes (docs/PERFORMANCE.md, "A design
that reaches localtunnel").  The registration answer hands the gateway a key;
the gateway opens up to `size` sockets with it (`GET /_tunnel/pool`,
`Upgrade: mcpr-pool`); the relay answers 101 and from then on writes requests
into an idle socket, one exchange at a time, and the gateway answers them as
its direct-mode listener would (docs/protocol.md, "Pooled sockets").  When
every pooled socket is busy, requests take the tunnel's HTTP/2 streams, so
the pool is never a queue.  The WebSocket stays the control channel: when it
closes, so do the pooled sockets.

A pooled socket belongs to its gateway, which may be hostile: what it sends
while no request is asked, or a response head that does not end within
`HEAD_BUDGET` bytes, closes that socket (the request, if any, gets a 502), and
the public side's framing stays the relay's (`forwarding.PublicResponse`
checks every head).  Nothing it does reaches another tunnel.
"""

from __future__ import annotations

import hmac
import secrets
import typing
from typing import Callable

from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

# twisted.web's HTTP/1.1 client connection and request are the classes behind `Agent`; they live
# in a private module.  The pool drives one connection per socket itself, because an Agent would
# hide which socket an exchange got (and so when its head is in), and would parse a URL and run a
# pool timer for every request.  Used only here; `HTTP11ClientProtocol(quiescentCallback)`,
# `.request(Request)` and `Request._construct` have kept their shape since Twisted 12.1.
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web._newclient import Request as ClientRequest

from mcpr.common import protocol as wire
from mcpr.common.failures import describe
from mcpr.common.names import valid_label
from mcpr.common.web import take_over
from mcpr.relay.tunnels.contract import ResponseSink, Stream, TunnelRequest
from mcpr.relay.tunnels.http1 import Exchange, body_producer

log = Logger()

HEAD_BUDGET = 128 << 10
"""Bytes a response head may take: well above any head a server sends (twisted.web's own lines are
capped at 16 KiB), and more than one read (64 KiB), so that a head and the start of its body read
together never come near it."""


class PooledSocket(Protocol):
    """One pooled socket: twisted.web's client over it, behind the guards its gateway's bytes pass."""

    def __init__(self, pool: SocketPool) -> None:
        self._pool = pool
        self.client = HTTP11ClientProtocol(self._quiescent)
        self.busy = False
        self._head_left: int | None = None  # while a head is awaited: the bytes it may still take

    def connectionMade(self) -> None:
        self.client.makeConnection(self.transport)
        self._pool.idle_again(self)

    def dataReceived(self, data: bytes) -> None:
        left = self._head_left
        if left is not None:
            left -= len(data)
            if left < 0:
                self._pool.offence(self, f"a response head over {HEAD_BUDGET >> 10} KiB")
                return
            self._head_left = left
        elif not self.busy:
            self._pool.offence(self, "bytes while no request was asked")
            return
        self.client.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._head_left = None
        self.client.connectionLost(reason)
        self._pool.lost(self)

    def _quiescent(self, client: HTTP11ClientProtocol) -> None:
        """The response is over and the connection kept: twisted.web calls this before the body's
        receiver hears of the end, so the socket is idle again when the exchange is released."""
        self.busy = False
        self._pool.idle_again(self)

    def send(self, request: TunnelRequest, sink: ResponseSink) -> Exchange:
        self.busy = True
        self._head_left = HEAD_BUDGET
        headers = Headers()
        for name, value in request.headers:
            headers.addRawHeader(name, value)
        exchange = Exchange(request.method, sink, _SocketExchange(self._pool, self))
        out = ClientRequest._construct(request.method, request.path, headers, body_producer(request), persistent=True)
        exchange.send(self.client.request(out))
        return exchange

    def head_in(self) -> None:
        self._head_left = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class _SocketExchange:
    """One exchange's turns, as the pool accounts for them."""

    def __init__(self, pool: SocketPool, socket: PooledSocket) -> None:
        self._pool = pool
        self._socket = socket

    def released(self) -> None:
        self._pool.busy -= 1

    def head_received(self) -> None:
        self._socket.head_in()

    def failed(self, error: BaseException) -> str:
        log.info("tunnel {subdomain}: a pooled socket failed before the response head: {why}",
                 subdomain=self._pool.subdomain, why=describe(error))
        return "pooled socket failed"

    def broke_off(self, reason: Failure) -> str:
        return "pooled socket lost"


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
