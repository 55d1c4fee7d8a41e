"""Node-to-node forwarding: a public request for a tunnel that another node holds goes there.

The node that took the public request (`PeerClient`) has done what the edge
does (limits, `X-Forwarded-*`, the access log, the headers timeout) and keeps
the public side; the holder (`InternalResource`) only passes the request into
its local tunnel, and the integrator's `forward` there never forwards again,
so a stale directory entry cannot bounce a request between nodes.

The hop is plain HTTP/1.1 over persistent connections.  Each forwarded
exchange has a connection to itself while it runs, so TCP's own flow control
is per stream: the public client's connection pauses the node-to-node socket
(the sink is given it as its producer), which fills and pauses the tunnel's
stream on the holder, and one slow reader stalls nobody else.  A cancelled
exchange closes its connection instead of returning it to the pool half read.

The internal listener is authenticated by a shared secret sent in clear: it
belongs on loopback or a private network, never on a public address.
"""

from __future__ import annotations

import hmac
import io
import json
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mcpr.common.failures import causes, describe
from mcpr.common.headers import end_to_end_lines
from mcpr.common.host_endpoint import HostEndpoint
from mcpr.common.names import valid_label
from mcpr.common.web import body_length, no_delay
from mcpr.relay.tunnels.contract import ResponseSink, Stream, TunnelRequest
from mcpr.relay.tunnels.http1 import FINISHED, Exchange, body_producer

log = Logger()

SECRET_HEADER = b"x-mcpr-cluster-secret"
SUBDOMAIN_HEADER = b"x-mcpr-subdomain"
EVICT_PATH = b"/_cluster/evict"

# An idle connection to a node is closed before the internal listener would close it (twisted.web's
# idle timeout is 60 s, CappedSite's head deadline the relay's 30 s): a POST sent into a connection
# that the node is closing fails (twisted.web's client retries only body-less idempotent requests).
IDLE_TIMEOUT = 20.0
MAX_IDLE_PER_NODE = 64
# A node on the same network answers a SYN within a millisecond; this allows one retransmission.
CONNECT_TIMEOUT = 2.0
EVICT_TIMEOUT = 5.0

# Not passed into the holder's tunnel: the hop's own fields, and what forwarding.tunnel_request
# also leaves for the tunnel to recompute (Host is set again, first).
_INTERNAL_DROPPED = frozenset({SECRET_HEADER, SUBDOMAIN_HEADER, b"content-length", b"expect", b"host"})
# Set by the client itself, whatever the request said: the hop's fields, and the body's framing.
_OWN = frozenset({SECRET_HEADER, SUBDOMAIN_HEADER, b"content-length"})
_SECRET = re.compile(r"[\x21-\x7e]{16,}")


def parse_secret(value: Any) -> str:
    """The cluster's shared secret (a Setting parser): it travels as a header value, so visible
    ASCII only, and long enough not to be guessed."""
    if not isinstance(value, str) or not _SECRET.fullmatch(value):
        raise ValueError("expected at least 16 visible ASCII characters without spaces "
                         "(e.g. the output of `openssl rand -hex 16`)")
    return value


def _answer(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (message + "\n").encode()


@implementer(IStreamClientEndpoint)
class _NodeEndpoint:
    """TCP to a node with Nagle off: the client writes a request's head and body separately, and
    Nagle would hold the body until the node's delayed ACK (~40 ms) of the head."""

    def __init__(self, tcp: IStreamClientEndpoint) -> None:
        self._tcp = tcp

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]  # a log line per connection is noise here
        return self._tcp.connect(protocolFactory).addCallback(self._opened)

    @staticmethod
    def _opened(protocol: IProtocol) -> IProtocol:
        no_delay(getattr(protocol, "transport", None))
        return protocol


@implementer(IAgentEndpointFactory)
class _NodeEndpoints:
    """Plain TCP to a node URL's address (`HostEndpoint`: node URLs are meant to hold addresses,
    and a name is resolved once in a while, not per connect)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _NodeEndpoint(HostEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, timeout=CONNECT_TIMEOUT))


class PeerClient:
    """Opens forwarded streams to other nodes over persistent HTTP/1.1 connections."""

    def __init__(self, reactor: Any, secret: str, *, max_per_node: int = 1024) -> None:
        self._reactor = reactor
        self._secret = parse_secret(secret).encode("ascii")
        self._max_per_node = max_per_node
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_IDLE_PER_NODE
        self._pool.cachedConnectionTimeout = IDLE_TIMEOUT  # type: ignore[assignment]  # seconds; the stub says int
        self._agent = Agent.usingEndpointFactory(reactor, _NodeEndpoints(reactor), self._pool)
        self._open: dict[str, int] = {}
        self._down: set[str] = set()
        """Nodes whose last connection attempt failed: logged once, not once per request."""

    def open_stream(self, node: str, subdomain: str, request: TunnelRequest, sink: ResponseSink) -> Stream:
        """Forward `request` to `node` (a node URL, `http://ADDR:PORT`), whose tunnel `subdomain`
        answers into `sink`.  The sink hears of every outcome but cancellation (the caller's own):
        "cluster node busy" at once over `max_per_node` streams to that node, "cluster node
        unreachable" when it cannot be connected to, "cluster node failed" when it broke off before
        the head, "cluster node connection lost" after it."""
        headers = Headers()
        for name, value in request.headers:
            if name.lower() not in _OWN:
                headers.addRawHeader(name, value)
        headers.setRawHeaders(SECRET_HEADER, [self._secret])
        headers.setRawHeaders(SUBDOMAIN_HEADER, [subdomain.encode("ascii")])
        url = node.rstrip("/").encode("ascii") + request.path
        open_now = self._open.get(node, 0)
        if open_now >= self._max_per_node:
            sink.fail("cluster node busy")
            return FINISHED
        self._open[node] = open_now + 1
        exchange = Exchange(request.method, sink, _NodeExchange(self, node))
        exchange.send(self._agent.request(request.method, url, headers, body_producer(request)))
        return exchange

    def _released(self, node: str) -> None:
        """One stream to `node` is over (however it ended)."""
        left = self._open[node] - 1
        if left:
            self._open[node] = left
        else:
            del self._open[node]

    def _reached(self, node: str) -> None:
        if node in self._down:
            self._down.discard(node)
            log.info("cluster node {node} is reachable again", node=node)

    def _unreachable(self, node: str, error: BaseException) -> None:
        if node not in self._down:
            self._down.add(node)
            log.warn("cluster node {node} unreachable: {why}", node=node, why=describe(error))

    def evict(self, node: str, subdomain: str, value: str) -> Deferred[None]:
        """Tell `node`, the previous holder of `subdomain`, to evict its tunnel of that name unless it
        holds exactly `value`, the new claim's (so that a late eviction never closes the new tunnel).
        Failures are logged, never raised: the old holder's heartbeat finds the name lost anyway
        (the fencing backstop)."""
        return Deferred.fromCoroutine(self._evict(node, subdomain, value))

    async def _evict(self, node: str, subdomain: str, value: str) -> None:
        headers = Headers({b"content-type": [b"application/json"], SECRET_HEADER: [self._secret]})
        body = FileBodyProducer(io.BytesIO(json.dumps({"subdomain": subdomain, "value": value}).encode()))
        url = node.rstrip("/").encode("ascii") + EVICT_PATH
        try:
            response = await self._agent.request(b"POST", url, headers, body).addTimeout(
                EVICT_TIMEOUT, self._reactor)
            answer = await readBody(response).addTimeout(EVICT_TIMEOUT, self._reactor)
        except TimeoutError:
            why = f"no answer within {EVICT_TIMEOUT:g} s"
        except Exception as e:  # logged, never raised
            why = describe(e)
        else:
            if response.code == 204:
                return
            why = f"it answered {response.code} {answer[:100].decode('utf-8', 'replace').strip()}"
        log.warn("could not tell cluster node {node} to evict {subdomain}: {why}",
                 node=node, subdomain=subdomain, why=why)

    async def close(self) -> None:
        """Close the idle connections (the relay stops); streams still open end on their own."""
        await self._pool.closeCachedConnections()


class _NodeExchange:
    """What one forwarded exchange does to its client's account of `node`."""

    def __init__(self, client: PeerClient, node: str) -> None:
        self._client = client
        self._node = node

    def released(self) -> None:
        self._client._released(self._node)

    def head_received(self) -> None:
        self._client._reached(self._node)

    def failed(self, error: BaseException) -> str:
        if any(isinstance(cause, (ConnectError, DNSLookupError)) for cause in causes(error)):
            self._client._unreachable(self._node, error)
            return "cluster node unreachable"
        log.warn("cluster node {node} failed before the response head: {why}", node=self._node,
                 why=describe(error))
        return "cluster node failed"

    def broke_off(self, reason: Failure) -> str:
        log.info("the response from cluster node {node} broke off: {why}", node=self._node,
                 why=describe(reason.value))
        return "cluster node connection lost"


def internal_request(request: Request) -> TunnelRequest:
    """The forwarded request as it enters the holder's local tunnel: the headers as the sending node
    built them (its `X-Forwarded-*` included: it was the edge), without the hop's own fields and
    hop-by-hop ones, Host first: the same shape as `forwarding.tunnel_request`."""
    headers = end_to_end_lines(request.requestHeaders, _INTERNAL_DROPPED)
    host = request.getHeader(b"host")
    if host is not None:
        headers.insert(0, (b"host", host))
    content = request.content
    return TunnelRequest(request.method, request.uri, headers, content, body_length(content))


class InternalResource(Resource):
    """The root of the internal listener's site: forwarded requests and evictions from other nodes.

    The secret is checked before anything else is read.  A forwarded request
    always carries `SUBDOMAIN_HEADER` and an eviction never does, so a public
    request for the path `EVICT_PATH` is forwarded like any other.
    """

    isLeaf = True

    def __init__(self, secret: str, forward: Callable[[Request, str], Any],
                 evict: Callable[[str, str], None]) -> None:
        super().__init__()
        self._secret = parse_secret(secret).encode("ascii")
        self._forward = forward
        self._evict = evict

    def render(self, request: Request) -> Any:
        given = request.requestHeaders.getRawHeaders(SECRET_HEADER)
        if given is None or len(given) != 1 or not hmac.compare_digest(given[0], self._secret):
            peer = getattr(request.getClientAddress(), "host", "-")
            log.warn("refused a cluster request from {peer}: wrong or missing secret", peer=peer)
            return _answer(request, 403, "forbidden")
        labels = request.requestHeaders.getRawHeaders(SUBDOMAIN_HEADER)
        if labels is None:
            if request.path == EVICT_PATH:
                return self._eviction(request)
            return _answer(request, 400, "missing subdomain header")
        subdomain = labels[0].decode("latin-1") if len(labels) == 1 else ""
        if not valid_label(subdomain):
            return _answer(request, 400, "invalid subdomain header")
        return self._forward(request, subdomain)

    def _eviction(self, request: Request) -> Any:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _answer(request, 405, "evictions are POSTed")
        try:
            message = json.loads(request.content.read() if request.content is not None else b"")
        except ValueError:
            message = None
        if not (isinstance(message, dict) and valid_label(message.get("subdomain"))
                and isinstance(message.get("value"), str)):
            return _answer(request, 400, 'expected {"subdomain": <label>, "value": <string>}')
        self._evict(message["subdomain"], message["value"])
        request.setResponseCode(204)
        request.finish()
        return NOT_DONE_YET
