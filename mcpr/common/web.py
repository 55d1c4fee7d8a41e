"""The HTTP/1.1 front both daemons serve through: a request's head and body are checked while
they arrive, before any resource sees them.

twisted.web parses leniently, reads a whole request body before `render`
runs, has no limit of its own on the body, answers an oversized line by
closing without a word, and lets a connection idle for as long as it sends a
byte now and then.  `CappedChannel` adds what an edge server needs:

- the body cap: a too-large `Content-Length` is refused at once, a chunked
  body when its count passes the cap (413);
- the framing rules of RFC 9112 (one `Host`, one `Transfer-Encoding: chunked`
  and no `Content-Length` beside it, a request target in origin or absolute
  form, field values without control bytes), so that what passes is exactly
  what an HTTP/2 stream can carry (`mcpr/relay/forwarding.py` relies on it);
  an absolute-form target names the host (§3.2.2), not `Host`;
- 414 / 431 for an oversized request line / header section;
- deadlines (when configured): the whole head within `header`, the body never
  pausing longer than `body` nor falling below `min_body_rate` (408);
- every refusal is framed (`Content-Length`, `Connection: close`) and then
  lingers: the rest of what the client sends is read and dropped, up to
  `lingering_size` bytes and `lingering_time` seconds, so a client still
  writing its request reads the answer instead of a connection reset (as
  nginx's lingering close does).

`CappedSite` can also cap connections (`ConnectionLimits`: per peer and in
all, the oldest idle connection making room for a new one at the global cap)
and knows which peers are trusted front proxies.  A 413 looks the same from
both daemons: a JSON-RPC error (id null, since the body was never read) when
the body is JSON, plain text otherwise; other refusals follow the same rule.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable

from twisted.internet.interfaces import IAddress, IDelayedCall, ISSLTransport, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import directlyProvides, implementedBy, providedBy

from mcpr.common.headers import connection_tokens

log = Logger()

# JSON-RPC "invalid request": what a request the server never read amounts to.
INVALID_REQUEST = -32600
TOO_LARGE_CODE = INVALID_REQUEST

# What a 405 offers: the methods any upstream is likely to serve (the front cannot know more).
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# Who hears of a refused body: (request, method, path); the request is not rendered.
TooLargeReporter = Callable[[Request, bytes, bytes], None]
# Who hears of any other refusal: (status, method, target, host, why); "-" for what never arrived.
RefusalReporter = Callable[[int, bytes, bytes, bytes | None, str], None]

# Reason phrases RFC 9110 names and Twisted's table lacks or spells the old way.
_PHRASES = {**RESPONSES, 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}

_VISIBLE = bytes(range(0x21, 0x7F))
# Control bytes a field value must not hold (RFC 9110 §5.5: VCHAR, obs-text, SP and HTAB only).
_FIELD_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# uri-host [":" port] (RFC 3986 §3.2.2, without userinfo): a reg-name or an IP literal.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")
_ABSOLUTE = re.compile(rb"(?i:https?)://([^/?#]*)(.*)\Z", re.S)


def no_delay(transport: Any) -> None:
    """Disable Nagle: twisted.web writes headers, body and chunk ends separately,
    and Nagle plus delayed ACKs would hold each small write for ~40 ms."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def is_json(content_type: bytes | None) -> bool:
    """Whether a Content-Type names JSON (`application/json`, or any `+json` type)."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def body_length(content: IO[bytes] | None) -> int:
    """The size of a request's body (twisted.web's in-memory buffer or spool file), left at its start."""
    if content is None:
        return 0
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


def refusal_answer(status: int, message: str, json_body: bool) -> tuple[bytes, bytes]:
    """(content type, body) of a refusal: a JSON-RPC error for a JSON request, else plain text."""
    if json_body:
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": INVALID_REQUEST, "message": message}}
        return b"application/json", json.dumps(error).encode()
    phrase = _PHRASES.get(status, b"").decode("latin-1")
    return b"text/plain; charset=utf-8", f"{status} {phrase}: {message}\n".encode()


def too_large_answer(limit: int, json_body: bool) -> tuple[bytes, bytes]:
    """(content type, body) of the 413 answer for a body over `limit` bytes."""
    return refusal_answer(413, f"request body larger than {limit} bytes", json_body)


class Refusal(Exception):
    """A request the front answers itself, with `status`, and then closes."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def request_target(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """(origin-form path, the authority of an absolute-form target or None), or a Refusal.

    Only origin form (`/path?query`) and absolute form (`http://host/path`)
    name something a proxy can forward: authority form belongs to CONNECT
    and asterisk form to server-wide OPTIONS, neither of which either daemon
    serves (CONNECT and TRACE get 405; TRACE would echo credentials back to a
    page's script, "cross-site tracing").  `OPTIONS *` gets 400 like the other
    targets that cannot be forwarded (as nginx answers it), not 501: 501 says
    a method is supported for no resource (RFC 9110 §15.6.2), yet OPTIONS is
    forwarded for every path; and the server as a whole cannot be asked, since
    a gateway maps request paths under its upstream URL, where `*` would turn
    into a bogus path, and the relay has no capabilities of its own to list.
    """
    if target.translate(None, _VISIBLE):
        raise Refusal(400, "the request target holds bytes outside visible ASCII")
    if method == b"CONNECT" or method == b"TRACE":
        raise Refusal(405, f"{method.decode()} is not served here", ((b"Allow", ALLOWED_METHODS),))
    if target[:1] == b"/":
        return target, None
    if target == b"*":
        raise Refusal(400, "the asterisk target (the server as a whole) cannot be forwarded")
    match = _ABSOLUTE.match(target)
    if match is None:
        raise Refusal(400, "the request target must be a path or an absolute http(s) URI")
    authority, rest = match.groups()
    if not authority or not _HOST.match(authority):
        raise Refusal(400, "the request target's authority is not host[:port]")
    if not rest or rest[:1] == b"?":
        rest = b"/" + rest
    elif rest[:1] != b"/":
        raise Refusal(400, "the request target holds a fragment")
    return rest, authority


def check_framing(version: bytes, headers: Headers) -> None:
    """RFC 9112's rules for `Host` (§3.2) and the body's framing (§6.1, §6.3), as a Refusal.

    A request whose length two parties could read differently (smuggling)
    never reaches a resource: one `Transfer-Encoding`, and it is `chunked`
    alone, never beside a `Content-Length` (twisted.web already refuses
    several `Content-Length` and non-numeric ones).
    """
    hosts = headers.getRawHeaders(b"host")
    if hosts is None:
        if version == b"HTTP/1.1":
            raise Refusal(400, "an HTTP/1.1 request needs a Host header")
    elif len(hosts) > 1:
        raise Refusal(400, "more than one Host header")
    elif not _HOST.match(hosts[0]):
        raise Refusal(400, "the Host header is not host[:port]")
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None:
        if version != b"HTTP/1.1":
            raise Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            raise Refusal(400, "Transfer-Encoding other than one 'chunked'")
        if headers.hasHeader(b"content-length"):
            raise Refusal(400, "both Transfer-Encoding and Content-Length")


@dataclass(frozen=True)
class ChannelTimeouts:
    """How long a connection may take over its requests; None turns a deadline off.

    `header`: seconds from when a connection is ready for a request (accepted,
    or done with the previous response) until that request's head is in; a
    connection that sent nothing is closed silently, one that started gets 408.
    Trickling bytes does not extend it.  Setting it also replaces twisted.web's
    idle timeout, which every byte resets.
    `body`: the longest pause within a request body, and the grace before
    `min_body_rate` (bytes per second, 0 for none) applies: after `body`
    seconds a body must have averaged that rate since it began (408).
    `lingering_time` / `lingering_size`: how long and how much of a refused
    client's remaining bytes are read and dropped before the connection closes.
    """

    header: float | None = None
    body: float | None = None
    min_body_rate: int = 0
    lingering_time: float = 5.0
    lingering_size: int = 64 << 20


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # a link-local address's scope is no part of it
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # an IPv4 client of a dual-stack (::) listener
    return ip


# Parsing an address is a few per cent of a connection's CPU at the relay (every connection and
# every registration asks), and the same peers come back: the last ones are remembered.
@functools.lru_cache(maxsize=4096)
def peer_key(host: str) -> str:
    """What the per-peer cap counts by: the IPv4 address, or the IPv6 /64 (anyone who has one
    IPv6 address has the whole /64, so counting single addresses would cap nothing)."""
    ip = _ip(host)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip) if ip is not None else host


class TrustedProxies:
    """The peers (addresses or networks) whose forwarding headers are believed and whose
    connections the per-peer cap does not count: front proxies speak for many clients."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host: object) -> bool:
        ip = _ip(host) if isinstance(host, str) else None
        return ip is not None and any(ip in network for network in self._networks)


def _peer_host(addr: IAddress | None) -> str | None:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else None


class _Refused(Protocol):
    """A connection over a cap: dropped at once, before a byte of HTTP is read."""

    def makeConnection(self, transport: ITransport) -> None:
        transport.abortConnection()  # type: ignore[attr-defined]


class _Counted(ProtocolWrapper):
    """Counts one connection against `ConnectionLimits` for as long as its transport lives.

    A wrapper rather than the channel's own `connectionLost`: Autobahn's
    WebSocketResource takes the transport over from the channel (a gateway's
    registration), after which only the transport's end is seen, here.
    """

    def __init__(self, limits: ConnectionLimits, wrapped: CappedChannel, key: str | None) -> None:
        # ProtocolWrapper wants a WrappingFactory for register/unregister: ConnectionLimits has both.
        super().__init__(limits, wrapped)  # type: ignore[arg-type]
        self.key = key

    def makeConnection(self, transport: ITransport) -> None:
        """As ProtocolWrapper's, but this wrapper does not claim ISSLTransport: Autobahn, taking it
        over for a WebSocket, reads TLS details from any ISSLTransport and insists that it be
        Twisted's TLS protocol itself.  `is_secure` looks through the wrapper instead."""
        directlyProvides(self, *_without_tls(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]  # a transport by delegation


# What a transport class provides, less ISSLTransport, as the flat tuple of interfaces that
# `directlyProvides` takes: zope.interface builds a new declaration (and its resolution order) for
# every subtraction, which cost 7 % of the relay's CPU per registration, and flattens a declaration
# given whole on every call (another 6 %).
_WITHOUT_TLS: dict[Any, tuple[Any, ...]] = {}


def _without_tls(transport: ITransport) -> tuple[Any, ...]:
    spec = providedBy(transport)
    if spec is not implementedBy(type(transport)):  # declarations of its own: not cached, not bounded
        return tuple(spec - ISSLTransport)
    found = _WITHOUT_TLS.get(spec)
    if found is None:
        found = _WITHOUT_TLS[spec] = tuple(spec - ISSLTransport)
    return found


def is_secure(transport: ITransport | None) -> bool:
    """Whether a channel's transport is TLS, through the connection-counting wrapper."""
    if isinstance(transport, _Counted):
        transport = transport.transport
    return ISSLTransport.providedBy(transport)


class ConnectionLimits:
    """Caps on a site's connections: `per_peer` from one address (an IPv6 /64), `total` in all
    (to stay below the process's file descriptor limit); 0 is no cap.

    A connection over the per-peer cap is dropped at once: the cap exists to
    bound what one peer holds, and reading its request to answer 429 would
    spend that very resource (the answer would also race a reset, since the
    request would be left unread).  At the total cap the oldest connection
    that is idle (waiting for or reading a request's head, or lingering after
    a refusal) makes room, so that slow or idle clients cannot lock others
    out; only if none is idle is the new connection dropped.
    """

    def __init__(self, *, total: int = 0, per_peer: int = 0) -> None:
        self.total = total
        self.per_peer = per_peer
        self.open = 0
        self._by_peer: dict[str, int] = {}
        self._idle: dict[CappedChannel, None] = {}  # oldest first
        self._warned: set[str] = set()
        self._full = False

    def admit(self, key: str | None) -> bool:
        """Whether a new connection from `key` (None: not counted per peer) may open."""
        if key is not None and self.per_peer and self._by_peer.get(key, 0) >= self.per_peer:
            if key not in self._warned:
                self._warned.add(key)
                log.warn("{peer}: {cap} connections open, closing its new ones", peer=key, cap=self.per_peer)
            return False
        if self.total and self.open >= self.total:
            if not self._full:
                self._full = True
                log.warn("{cap} connections open (max_connections): new ones replace the oldest idle one",
                         cap=self.total)
            oldest = next(iter(self._idle), None)
            if oldest is None:
                return False
            del self._idle[oldest]
            oldest.evict()  # gone at the next turn of the reactor: the reserve covers the overlap
        return True

    def idle(self, channel: CappedChannel) -> None:
        """`channel` waits for a request (or lingers): it may make room for a new connection."""
        self._idle.pop(channel, None)
        self._idle[channel] = None

    def busy(self, channel: CappedChannel) -> None:
        self._idle.pop(channel, None)

    # What ProtocolWrapper calls, as it would a WrappingFactory's.
    def registerProtocol(self, wrapper: _Counted) -> None:
        self.open += 1
        if wrapper.key is not None:
            self._by_peer[wrapper.key] = self._by_peer.get(wrapper.key, 0) + 1

    def unregisterProtocol(self, wrapper: _Counted) -> None:
        self.open -= 1
        if self._full and self.open < self.total * 0.9:
            self._full = False
        key = wrapper.key
        if key is not None:
            left = self._by_peer[key] - 1
            if left:
                self._by_peer[key] = left
            else:
                del self._by_peer[key]
            if left < self.per_peer:
                self._warned.discard(key)
        channel = wrapper.wrappedProtocol
        if isinstance(channel, CappedChannel):
            self._idle.pop(channel, None)


# The media types twisted.web decodes into `request.args` (only these need its Content-Type parse).
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")


class CappedRequest(Request):
    """A Request that counts its body against the site's `max_request_body` as it arrives, and
    takes its path and host from an absolute-form target (RFC 9112 §3.2.2)."""

    _too_large = False
    _received = 0
    request_line: tuple[bytes, bytes] | None = None
    """(method, target) as the request line said, set by CappedChannel: the 413 report needs them
    before twisted.web sets `method` and `uri`, which it does only once the body is read."""
    target: tuple[bytes, bytes | None] | None = None
    """(origin-form path, authority or None) checked by CappedChannel."""

    def _site(self) -> Any:
        """The CappedSite (or, on a tunnel stream, whatever Site) this request belongs to."""
        return getattr(self.channel, "site", None)

    def _limit(self) -> int:
        return getattr(self._site(), "max_request_body", 0) or 0

    def _discard_body(self) -> None:
        # Twisted declares `content = None` at class level, hence the ignore.
        self.content = io.BytesIO()  # type: ignore[assignment]

    _hidden_type: list[bytes] | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.target is not None:
            path, authority = self.target
            if authority is not None:
                self.requestHeaders.setRawHeaders(b"host", [authority])
        if command == b"POST":
            # twisted.web parses a POST's Content-Type with the email package, to decode HTML
            # form arguments into `args`: about a sixth of a proxied request's CPU.  Neither
            # daemon reads form arguments, so the header sits out that step (`process` puts it back).
            types = self.requestHeaders.getRawHeaders(b"content-type")
            if types and not types[0].lower().startswith(_FORM_TYPES):
                self._hidden_type = list(types)
                self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if limit and length is not None and length > limit:
            self._discard_body()
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        limit = self._limit()
        if limit and self._received > limit:
            self._discard_body()
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self._hidden_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._hidden_type)
            self._hidden_type = None
        if self._too_large:
            if not isinstance(self.channel, CappedChannel):
                # Channels other than HTTP/1.1 (a tunnel's HTTP/2 streams) cannot be answered early.
                self.setResponseCode(413)
                content_type, body = too_large_answer(self._limit(), self.is_json())
                self.setHeader(b"content-type", content_type)
                self.setHeader(b"content-length", str(len(body)).encode())
                self.write(body)
                self._report_too_large()
                self.finish()
            return
        super().process()

    def is_json(self) -> bool:
        return any(is_json(t) for t in self.requestHeaders.getRawHeaders(b"content-type", ()))

    def _report_too_large(self) -> None:
        reporter: TooLargeReporter | None = getattr(self._site(), "too_large", None)
        if reporter is not None:
            method, path = self.request_line or (self.method, self.uri)
            reporter(self, method or b"?", path or b"?")

    def _refuse(self) -> None:
        if self._too_large:
            return
        self._too_large = True
        channel = self.channel
        if isinstance(channel, CappedChannel):
            # The head is parsed but the body is not: answer now; the channel drops the rest.
            self._report_too_large()
            channel.refuse(413, f"request body larger than {self._limit()} bytes", report=False)


# Where a CappedChannel is in the request it reads.
_IDLE, _LINE, _HEADERS, _BODY, _BUSY = range(5)


class CappedChannel(HTTPChannel):
    """HTTP/1.1 with the checks, deadlines and refusals described in the module docstring.

    It follows its request through phases: idle (no byte yet), the request
    line, the headers, the body, then busy while the resource answers.
    twisted.web calls the overridden hooks in that order; a refusal writes
    its answer on the transport, drops everything after, and lingers.
    """

    site: CappedSite
    peer_trusted = False
    """Whether the peer is one of the site's trusted proxies (set when the connection opens)."""

    _phase = _IDLE
    _request_version = b"HTTP/1.1"
    _refused = False
    _dropped = 0
    _head_timer: IDelayedCall | None = None
    _timer: IDelayedCall | None = None  # the body's deadline, or the end of lingering
    _body_started = 0.0
    _body_bytes = 0
    _body_seen = 0
    _body_last = 0.0

    def connectionMade(self) -> None:
        no_delay(self.transport)
        super().connectionMade()
        self._await_request()

    # -- the phases

    def _await_request(self) -> None:
        self._phase = _IDLE
        timeout = self.site.timeouts.header
        if timeout is not None:
            timer = self._head_timer
            if timer is not None and timer.active():
                timer.reset(timeout)
            else:
                self._head_timer = self.callLater(timeout, self._head_overdue)
        if self.site.limits is not None:
            self.site.limits.idle(self)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._drop(len(data))
            return
        if self._phase == _IDLE:
            self._phase = _LINE
        elif self._phase == _BODY:
            self._body_bytes += len(data)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._phase != _LINE:
            super().lineReceived(line)  # a header line: twisted.web counts its bytes and the fields
            return
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before and not self._refused:
            # twisted.web parsed and checked it: exactly method SP target SP version.
            method, target, self._request_version = line.split(b" ")
            self.requests[-1].request_line = (method, target)
            self._phase = _HEADERS

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._phase == _LINE:
            self.refuse(414, f"request line longer than {self.MAX_LENGTH} bytes")
        else:
            self.refuse(431, f"header line longer than {self.MAX_LENGTH} bytes")

    def headerReceived(self, line: bytes) -> bool:
        if _FIELD_CTL.search(line) is not None:
            self.refuse(400, "a header field holds a control character")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        request: CappedRequest = self.requests[-1]
        method, target = request.request_line or (b"", b"")
        try:
            request.target = request_target(method, target)
            check_framing(self._request_version, request.requestHeaders)
        except Refusal as refusal:
            self.refuse(refusal.status, refusal.message, refusal.headers)
            return
        limit = self.site.max_request_body
        if limit and self.length is not None and self.length > limit:
            # Refused here, not in gotLength: twisted.web would still send 100 Continue after it.
            request._discard_body()
            request._refuse()
            return
        super().allHeadersReceived()
        if self._refused:
            return
        # The head's timer runs on: it finds the channel busy if it fires, and is moved on for the
        # next request (cheaper than a new one per request).
        if self.site.limits is not None:
            self.site.limits.busy(self)
        if self.length != 0:
            self._phase = _BODY
            timeout = self.site.timeouts.body
            if timeout is not None:
                self._body_started = self._body_last = self.site.reactor.seconds()
                self._body_bytes = self._body_seen = 0
                self._timer = self.callLater(timeout, self._body_check)
        else:
            self._phase = _BUSY

    def allContentReceived(self) -> None:
        if self._refused:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._phase = _BUSY
        super().allContentReceived()
        if self.transport is None:
            self._taken_over()

    def _taken_over(self) -> None:
        """The resource took the transport over (a WebSocket upgrade: Autobahn's WebSocketResource
        clears `transport`), so this channel will never read again.  Its head timer and the
        upgraded request (a cycle with the channel) would otherwise keep the channel, the request
        and its buffers, 4 KiB, alive until the timer fires: for every registration at the relay."""
        self._stop_deadline()
        self.requests.clear()

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        """Keep-alive unless HTTP/1.0 or `close` is among the Connection header's tokens: twisted.web
        reads only the first Connection line and splits it on spaces, missing `close, te`."""
        if version != b"HTTP/1.1":
            return False
        headers = request.requestHeaders
        if headers.hasHeader(b"connection") and b"close" in connection_tokens(headers):
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def requestDone(self, request: http.Request) -> None:
        if self.persistent:
            self._await_request()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    # twisted.web asks the channel for both addresses in every Request's constructor, and the
    # proxy asks whether it is TLS for every request: the transport would build a new address
    # each time (and make a getsockname system call for the local one), the TLS check would look
    # through the wrapper.  None of it changes while the connection lives, so it is asked once.
    _host: IAddress | None = None
    _peer: IAddress | None = None
    _secure: bool | None = None

    def getHost(self) -> IAddress:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> IAddress:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = is_secure(self.transport)
        return secure

    # -- deadlines

    def _stop_deadline(self) -> None:
        for timer in (self._head_timer, self._timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._phase >= _BODY:
            return  # the head came in time; the next request gets a timer of its own
        if self._phase == _IDLE:
            self.loseConnection()  # nothing asked, nothing to answer (an idle keep-alive connection)
        else:
            self.refuse(408, f"request head not received within {self.site.timeouts.header:g} s")

    def _body_check(self) -> None:
        """The body's deadline, checked when it may have passed rather than moved on every read."""
        self._timer = None
        timeouts = self.site.timeouts
        assert timeouts.body is not None
        now = self.site.reactor.seconds()
        if self._body_bytes != self._body_seen:
            self._body_seen, self._body_last = self._body_bytes, now
        deadline = self._body_last + timeouts.body
        if timeouts.min_body_rate:
            deadline = min(deadline, self._body_started + timeouts.body + self._body_bytes / timeouts.min_body_rate)
        if now >= deadline:
            self.refuse(408, "request body too slow")
        else:
            self._timer = self.callLater(deadline - now, self._body_check)

    def evict(self) -> None:
        """Make room at the connection cap: this idle connection goes at once."""
        self._stop_deadline()
        self._refused = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- refusals

    # twisted.web's own 400 (a malformed request line, header or chunk, or a head over its size or
    # field count) closes without framing or lingering; this private hook is overridden, and reads
    # twisted.web's private counters to tell 431 from 400, so that every refusal is the same.
    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(431, f"request head larger than {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self.refuse(431, f"more than {self.maxHeaders} header fields")
        else:
            self.refuse(400, "malformed request")

    def refuse(self, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = (), *,
               report: bool = True) -> None:
        """Answer `status` on the transport, then drop the rest of the request and linger."""
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._stop_deadline()
        request: CappedRequest | None = self.requests[-1] if self.requests and self._phase >= _HEADERS else None
        content_type, body = refusal_answer(status, message, request is not None and request.is_json())
        head = [b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"")), b"Date: " + datetimeToString(),
                b"Content-Type: " + content_type, b"Content-Length: %d" % len(body), b"Connection: close",
                *(name + b": " + value for name, value in headers)]
        transport = self.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._drop(len(self.clearLineBuffer()))
        if report and self.site.refused is not None:
            method, target = (request.request_line or (b"-", b"-")) if request is not None else (b"-", b"-")
            host = request.requestHeaders.getRawHeaders(b"host", [None])[0] if request is not None else None
            self.site.refused(status, method, target, host, message)
        if not is_secure(transport):
            # FIN after the answer: a client still writing sees the end of our side, not a reset.
            # (TLS has no half-close: there the answer's framing and Connection: close tell.)
            lose_write = getattr(transport, "loseWriteConnection", None)
            if lose_write is not None:
                lose_write()
        if self.site.limits is not None:
            self.site.limits.idle(self)
        self._timer = self.callLater(self.site.timeouts.lingering_time, self._linger_over)

    def _drop(self, size: int) -> None:
        self._dropped += size
        if self._dropped > self.site.timeouts.lingering_size:
            self._linger_over()

    def _linger_over(self) -> None:
        self._stop_deadline()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def take_over(request: Request, protocol: Protocol, answer: bytes) -> None:
    """Hand `request`'s connection to `protocol` after writing `answer` (an upgrade's 101) on it.

    twisted.web has no API for this (Twisted #3204); this is what Autobahn's
    WebSocketResource does: the channel lets go of its transport (so it never
    reads again, `CappedChannel._taken_over`) and whatever wraps the socket (TLS,
    the connection counter) delivers to `protocol` from then on.
    """
    channel = request.channel
    transport: Any = channel.transport
    channel.transport = None
    transport.unregisterProducer()  # twisted.web's channel is its transport's producer
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    elif isinstance(transport.protocol, ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    transport.write(answer)
    protocol.makeConnection(transport)


class CappedSite(Site):
    """A Site whose requests know the body cap, where they came from and whom to tell of a refusal.

    It speaks HTTP/1.1 only: neither daemon offers h2 by ALPN (the relay's
    WebSocket registration cannot run over HTTP/2), so Twisted's protocol
    negotiation wrapper would bring nothing.  Twisted's TLS adds the protocols a
    Site says it accepts to those of the certificate options (Site offers h2
    whenever the h2 package is installed, as `twisted[http2]` does), hence
    `acceptableProtocols`.
    """

    requestFactory = CappedRequest
    # HTTP/1.1 itself rather than Twisted's negotiating wrapper (see above).
    protocol = CappedChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: IResource, *, max_request_body: int, via: str = "direct",
                 too_large: TooLargeReporter | None = None, refused: RefusalReporter | None = None,
                 timeouts: ChannelTimeouts = ChannelTimeouts(), limits: ConnectionLimits | None = None,
                 trusted: TrustedProxies | None = None, **kwargs: Any) -> None:
        if timeouts.header is not None:
            kwargs.setdefault("timeout", None)  # the channel's own deadlines replace the idle timeout
        super().__init__(resource, **kwargs)
        self.max_request_body = max_request_body
        self.via = via
        self.too_large = too_large
        self.refused = refused
        self.timeouts = timeouts
        self.limits = limits
        self.trusted = trusted or TrustedProxies()

    def acceptableProtocols(self) -> list[bytes]:
        """What ALPN may choose: HTTP/1.1, which is all `CappedChannel` speaks."""
        return [b"http/1.1"]

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:  # type: ignore[override]
        host = _peer_host(addr)
        trusted = host is not None and bool(self.trusted) and host in self.trusted
        limits = self.limits
        key = None if host is None or trusted else peer_key(host)
        if limits is not None and not limits.admit(key):
            return _Refused()
        channel: CappedChannel = super().buildProtocol(addr)
        channel.peer_trusted = trusted
        return channel if limits is None else _Counted(limits, channel, key)

    def log(self, request: http.Request) -> None:
        """Each daemon writes its own line per request; no combined-log line."""
