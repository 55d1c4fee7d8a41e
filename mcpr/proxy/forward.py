"""Sending a request upstream and streaming its answer back.

A pass-through proxy must not use treq's high-level client: it would share one
cookie jar between users, follow redirects and decode gzip.  A bare `Agent`
over our own persistent pool does none of that.  The upstream socket is
registered as the downstream request's producer, so a slow client slows the
upstream read instead of filling our memory.
"""

from __future__ import annotations

import socket
from typing import IO, Any, Callable

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web._newclient import _ensureValidURI
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mcpr.common.bodies import BytesProducer
from mcpr.common.failures import cancelled, describe
from mcpr.common.web import no_delay


class UpstreamError(Exception):
    status = 502

    def __init__(self, url: bytes, reason: str) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason


class UpstreamUnavailable(UpstreamError):
    status = 502


class UpstreamTimeout(UpstreamError):
    status = 504


def body_producer(data: bytes | None, content: IO[bytes] | None) -> IBodyProducer | None:
    """The upstream body: bytes already in memory are written at once, a spool file streams
    from its start with backpressure."""
    if data:
        return BytesProducer(data)
    if content is not None:
        content.seek(0)
        return FileBodyProducer(content)
    return None


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def quick_ack(transport: Any) -> None:
    """Acknowledge at once (Linux).  An upstream that writes its headers and body
    separately without TCP_NODELAY (uvicorn+h11 does) holds the body until our
    ACK, and on a kept-alive connection the kernel delays that ACK by ~40 ms.
    The flag resets itself, so it is set again after every read."""
    handle = getattr(transport, "getHandle", None)
    if _QUICKACK is None or handle is None:
        return
    try:
        handle().setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except (OSError, AttributeError):
        pass


class _QuickAck(ProtocolWrapper):
    """Sits on the TCP connection, under TLS if any, to see every read the socket gives.

    It is also the transport Twisted's HTTP client pauses and resumes, and a
    pause asked for while a read is being handled waits until that read
    returns.  The client pauses the socket as soon as a response's headers are
    in and resumes it when the body gets a reader (`deliverBody`), which the
    proxy does within the same read: applied at once, that pause and resume
    were an `epoll_ctl` DEL and ADD for every request.  No byte can arrive
    before the read returns, so a pause that is still wanted then is applied
    then, and one undone before it never reaches the socket.
    """

    _reading = False
    _pause_wanted = False

    def dataReceived(self, data: bytes) -> None:
        quick_ack(self.transport)
        self._reading = True
        try:
            self.wrappedProtocol.dataReceived(data)
        finally:
            self._reading = False
            if self._pause_wanted:
                self._pause_wanted = False
                self.transport.pauseProducing()  # type: ignore[union-attr]  # a TCP transport

    def pauseProducing(self) -> None:
        if self._reading:
            self._pause_wanted = True
        else:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if self._pause_wanted:
            self._pause_wanted = False  # paused and resumed within one read: the socket never knew
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]


class _QuickAckFactory(WrappingFactory):
    protocol = _QuickAck
    noisy = False


@implementer(IStreamClientEndpoint)
class UpstreamEndpoint:
    """TCP to one upstream (TLS on top for https) with Nagle off and every read acknowledged at once.

    Either alone costs ~40 ms on a small exchange (see `no_delay` and
    `quick_ack`).  Both are set on what `connect()` gives back, so the pool,
    the Agent and their protocol stay Twisted's own; the options go to the
    TCP transport itself, not through TLS, whose handle is not a socket.
    """

    def __init__(self, tcp: IStreamClientEndpoint, tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        self._tcp = tcp
        self._tls = tls

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]  # a log line per connection is noise here
        factory = protocolFactory if self._tls is None else TLSMemoryBIOFactory(self._tls, True, protocolFactory)
        return self._tcp.connect(_QuickAckFactory(factory)).addCallback(self._opened)

    def _opened(self, connection: IProtocol) -> IProtocol:
        # Twisted buffers writes until the reactor's next turn: Nagle is off
        # before the first byte (of the TLS handshake or the request) leaves.
        assert isinstance(connection, _QuickAck)
        no_delay(connection.transport)
        protocol: Any = connection.wrappedProtocol
        return protocol if self._tls is None else protocol.wrappedProtocol


@implementer(IAgentEndpointFactory)
class _UpstreamEndpoints:
    """Endpoints per upstream origin, built once: Agent's default factory builds a
    HostnameEndpoint (and IDNA-encodes the host) for every request."""

    def __init__(self, reactor: Any, connect_timeout: float, max_origins: int = 64) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}
        self._max = max_origins

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            tls = self._tls.creatorForNetloc(uri.host, uri.port) if uri.scheme == b"https" else None
            endpoint = UpstreamEndpoint(HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port,
                                                         timeout=self._timeout), tls)
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key] = endpoint
        return endpoint


class _UpstreamAgent(Agent):
    """An `Agent` that works out what a URL needs once, not on every request to it.

    `Agent.request` parses its URL (`URI.fromBytes`, whose `http.urlparse`
    goes through twisted.web.http's deprecation proxy), asks for its
    endpoint, rebuilds its origin-form path and computes its `Host` value for
    every request: about 4 % of the gateway's CPU per small request, although
    nearly every request goes to the one MCP URL.  Here that is done once per
    URL (a bounded table) and the request then goes on exactly as in
    `Agent.request`.

    Going on means calling Agent's private `_getEndpoint`, `_computeHostValue`
    and `_requestWithEndpoint` and twisted.web's `_ensureValidURI` (as
    `Agent.request` calls them in Twisted 26.10, the tested version); they are
    used nowhere else, and a Twisted without them fails every test that
    proxies a request.
    """

    _targets: dict[bytes, tuple[URI, tuple[bytes, bytes, int], IStreamClientEndpoint, bytes, bytes]]
    _max_targets = 256

    @classmethod
    def over(cls, reactor: Any, endpoints: IAgentEndpointFactory, pool: HTTPConnectionPool) -> _UpstreamAgent:
        agent = cls.usingEndpointFactory(reactor, endpoints, pool)
        agent._targets = {}
        return agent

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        target = self._targets.get(uri)
        if target is None:
            parsed = URI.fromBytes(_ensureValidURI(uri.strip()))
            try:
                endpoint = self._getEndpoint(parsed)
            except SchemeNotSupported:
                return fail()
            host = self._computeHostValue(parsed.scheme, parsed.host, parsed.port)
            target = (parsed, (parsed.scheme, parsed.host, parsed.port), endpoint, parsed.originForm, host)
            if len(self._targets) >= self._max_targets:
                self._targets.clear()
            self._targets[uri] = target
        parsed, key, endpoint, path, host = target
        if headers is None or not headers.hasHeader(b"host"):
            headers = Headers() if headers is None else headers.copy()  # the caller's stay as they were
            headers.addRawHeader(b"Host", host)
        return self._requestWithEndpoint(key, endpoint, method, parsed, headers, bodyProducer, path)


class Forwarder:
    """Our own connection pool and Agent, with a time limit on the response headers."""

    def __init__(
        self,
        reactor: Any,  # IReactorTCP and IReactorTime (zope interfaces cannot be intersected in a type)
        *,
        headers_timeout: float,
        connect_timeout: float = 10.0,
        max_idle_per_host: int = 64,
        idle_timeout: float = 4.0,
    ) -> None:
        self._reactor = reactor
        self._timeout = headers_timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_idle_per_host
        # Servers such as uvicorn and Node close idle keep-alive connections
        # after 5 s; dropping ours first avoids sending a POST into a socket
        # that is being closed (a POST is not retried automatically).
        self.pool.cachedConnectionTimeout = idle_timeout  # type: ignore[assignment]  # seconds; Twisted's stub says int
        self._agent = _UpstreamAgent.over(reactor, _UpstreamEndpoints(reactor, connect_timeout), self.pool)

    def send(self, method: bytes, url: bytes, headers: Headers, body: IBodyProducer | None) -> Deferred[IResponse]:
        """The upstream response once its headers arrived; the body is still to be read.

        It fails with `UpstreamTimeout`, `UpstreamUnavailable`, or
        `CancelledError` when cancelled.  A Deferred with one callback rather
        than a coroutine: on every request, the coroutine's own Deferred and
        its resumption cost more than the mapping of its outcome.
        """
        d = self._agent.request(method, url, headers, body)
        timer = self._reactor.callLater(self._timeout, d.cancel)

        def settle(result: IResponse | Failure) -> IResponse:
            if timer.active():
                timer.cancel()
            elif isinstance(result, Failure):  # the timer went off and cancelled the request
                raise UpstreamTimeout(url, f"no response headers within {self._timeout:g} s")
            if isinstance(result, Failure):
                if cancelled(result.value):
                    raise CancelledError()
                raise UpstreamUnavailable(url, describe(result.value))
            return result

        return d.addBoth(settle)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class BodyPipe(Protocol):
    """Streams an upstream response body into a downstream request.

    `write` gets each chunk (after any inspection) and `done` fires with None
    on a clean end or fails if the upstream broke off mid-body.
    """

    def __init__(self, write: Callable[[bytes], None], register: Callable[[IPushProducer], None],
                 unregister: Callable[[], None], done: Deferred[None]) -> None:
        self._write = write
        self._register = register
        self._unregister = unregister
        self._done = done
        self._stopped = False

    def connectionMade(self) -> None:
        # deliverBody's transport is the upstream connection's: it is an IPushProducer.
        self._register(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        if not self._stopped:
            self._write(data)

    def stop(self) -> None:
        """The downstream client left: drop the upstream connection."""
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # a producer, as above

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if not self._stopped:
            self._unregister()
        # isinstance rather than `reason.check`, which names every class it is given (reflect.qual)
        # and looks the names up: 1 % of a small request's CPU, for the same answer.
        if self._stopped or isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._done.callback(None)
        else:
            self._done.errback(reason)
