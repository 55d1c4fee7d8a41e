"""A twisted.web `Request` that refuses oversized bodies before reading them.

twisted.web reads a whole request body (into memory, then a spool file) before
`render` runs and has no limit of its own; the cap must therefore act while
the body arrives: on a too-large Content-Length at once, and by counting the
bytes of a chunked body.
"""

from __future__ import annotations

import io
from typing import Callable

from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from mcpr.proxy import jsonrpc
from mcpr.proxy.forward import no_delay

TOO_LARGE_CODE = -32600


class ProxyRequest(Request):
    _too_large = False
    _received = 0

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_request_body", 0) or 0

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if limit and length is not None and length > limit:
            self.content = io.BytesIO()
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        limit = self._limit()
        if limit and self._received > limit:
            self.content = io.BytesIO()
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

    def _body_is_json(self) -> bool:
        types = self.requestHeaders.getRawHeaders(b"content-type", ())
        return any(b"json" in t.lower() for t in types)

    def _answer_too_large(self, set_header: Callable[[bytes, bytes], None],
                          write: Callable[[bytes], None]) -> None:
        limit = self._limit()
        message = f"request body larger than {limit} bytes"
        if self._body_is_json():
            set_header(b"content-type", b"application/json")
            body = jsonrpc.error_body(None, TOO_LARGE_CODE, message)
        else:
            set_header(b"content-type", b"text/plain; charset=utf-8")
            body = f"413 Request Entity Too Large: {message}\n".encode()
        set_header(b"content-length", str(len(body)).encode())
        write(body)
        reporter = getattr(self.channel.site, "too_large", None)
        if reporter is not None:
            command = getattr(self.channel, "_command", None) or self.method or b"?"
            path = getattr(self.channel, "_path", None) or self.uri or b"?"
            reporter(self, command, path)

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
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + b"".join(chunks))
        transport.loseConnection()


class _NoDelayChannel(HTTPChannel):
    def connectionMade(self) -> None:
        no_delay(self.transport)
        super().connectionMade()


def _channel(site: "ProxySite") -> _GenericHTTPChannelProtocol:
    return _GenericHTTPChannelProtocol(_NoDelayChannel())


class ProxySite(Site):
    """A Site whose requests know the body cap, where they came from and whom to tell of a refusal."""

    requestFactory = ProxyRequest
    protocol = _channel
    noisy = False

    def __init__(self, resource, *, max_request_body: int, via: str = "direct",
                 too_large: Callable | None = None, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.max_request_body = max_request_body
        self.via = via
        self.too_large = too_large

    def log(self, request: Request) -> None:
        """The proxy writes its own line and event per request; no combined-log line."""
