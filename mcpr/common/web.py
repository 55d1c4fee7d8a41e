"""A twisted.web `Site` that refuses oversized request bodies before reading them.

twisted.web reads a whole request body (into memory, then a spool file) before
`render` runs and has no limit of its own; the cap must therefore act while
the body arrives: on a too-large Content-Length at once, and by counting the
bytes of a chunked body.  Both daemons serve through it, so a 413 looks the
same from the relay and from the gateway: a JSON-RPC error (id null, since
the body was never read) when the body is JSON, plain text otherwise.
"""

from __future__ import annotations

import io
import json
from typing import IO, Any, Callable

from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

# JSON-RPC "invalid request": what a body the server never read amounts to.
TOO_LARGE_CODE = -32600

# Who hears of a refused body: (request, method, path); the request is not rendered.
TooLargeReporter = Callable[[Request, bytes, bytes], None]


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


def too_large_answer(limit: int, json_body: bool) -> tuple[bytes, bytes]:
    """(content type, body) of the 413 answer for a body over `limit` bytes."""
    message = f"request body larger than {limit} bytes"
    if json_body:
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": TOO_LARGE_CODE, "message": message}}
        return b"application/json", json.dumps(error).encode()
    return b"text/plain; charset=utf-8", f"413 Request Entity Too Large: {message}\n".encode()


class CappedRequest(Request):
    """A Request that counts its body against the site's `max_request_body` as it arrives."""

    _too_large = False
    _received = 0

    def _site(self) -> Any:
        """The CappedSite (or, on a tunnel stream, whatever Site) this request belongs to."""
        return getattr(self.channel, "site", None)

    def _limit(self) -> int:
        return getattr(self._site(), "max_request_body", 0) or 0

    def _discard_body(self) -> None:
        # Twisted declares `content = None` at class level, hence the ignore.
        self.content = io.BytesIO()  # type: ignore[assignment]

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
        if self._too_large:
            if not isinstance(self.channel, HTTPChannel):
                # Channels other than HTTP/1.1 cannot be answered early; answer now.
                self.setResponseCode(413)
                self._answer_too_large(self.setHeader, self.write)
                self.finish()
            return
        super().process()

    def _answer_too_large(self, set_header: Callable[[bytes, bytes], None],
                          write: Callable[[bytes], None]) -> None:
        json_body = any(is_json(t) for t in self.requestHeaders.getRawHeaders(b"content-type", ()))
        content_type, body = too_large_answer(self._limit(), json_body)
        set_header(b"content-type", content_type)
        set_header(b"content-length", str(len(body)).encode())
        write(body)
        reporter: TooLargeReporter | None = getattr(self._site(), "too_large", None)
        if reporter is not None:
            method, path = getattr(self, "request_line", None) or (self.method, self.uri)
            reporter(self, method or b"?", path or b"?")

    def _refuse(self) -> None:
        if self._too_large:
            return
        self._too_large = True
        if not isinstance(self.channel, HTTPChannel):
            return
        # The request line is parsed but the body is not: answer on the raw
        # transport and close, since the rest of the body will not be read.
        lines: list[bytes] = [b"HTTP/1.1 413 Request Entity Too Large"]
        chunks: list[bytes] = []
        self._answer_too_large(lambda k, v: lines.append(k + b": " + v), chunks.append)
        lines.append(b"connection: close")
        transport = self.channel.transport
        assert transport is not None
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + b"".join(chunks))
        transport.loseConnection()


class CappedChannel(HTTPChannel):
    """HTTP/1.1 with Nagle off, remembering each request line for the 413 report.

    twisted.web sets a request's method and URI only once its body is read,
    which a refused body never is; the line is taken here as it arrives.
    """

    def connectionMade(self) -> None:
        no_delay(self.transport)
        super().connectionMade()

    def lineReceived(self, line: bytes) -> None:
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before:
            parts = line.split(b" ")
            self.requests[-1].request_line = (parts[0], parts[1] if len(parts) > 1 else b"")


class CappedSite(Site):
    """A Site whose requests know the body cap, where they came from and whom to tell of a refusal.

    It speaks HTTP/1.1 only: neither daemon offers h2 by ALPN (the relay's
    WebSocket registration cannot run over HTTP/2), so Twisted's protocol
    negotiation wrapper would bring nothing.
    """

    requestFactory = CappedRequest
    # HTTP/1.1 itself rather than Twisted's negotiating wrapper (see above).
    protocol = CappedChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: IResource, *, max_request_body: int, via: str = "direct",
                 too_large: TooLargeReporter | None = None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.max_request_body = max_request_body
        self.via = via
        self.too_large = too_large

    def log(self, request: http.Request) -> None:
        """Each daemon writes its own line per request; no combined-log line."""
