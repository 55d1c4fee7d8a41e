"""Where a request goes: the MCP endpoint, or the upstream origin as is.

The gateway serves a whole origin, not one path: MCP traffic is recognised by
what it is (a JSON-RPC body, an SSE GET, a session DELETE) and sent to the
configured MCP URL; everything else (OAuth, `/.well-known/*`, assets) keeps
its path and query on the upstream origin.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.web.http_headers import Headers

from mcpr.proxy import jsonrpc


class Kind(enum.Enum):
    MCP_POST = "mcp"
    MCP_STREAM = "mcp-stream"
    SESSION_DELETE = "session-delete"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class Upstream:
    """The `--mcp` URL split into what routing needs."""

    url: str
    origin: bytes
    path: bytes
    query: bytes
    host: str
    port: int
    secure: bool

    @classmethod
    def parse(cls, url: str) -> "Upstream":
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        origin = f"{parts.scheme}://{parts.netloc}".encode()
        path = parts.path.encode() if parts.path not in ("", "/") else b""
        return cls(url, origin, path, parts.query.encode(), parts.hostname or "", port, secure)

    def mcp_url(self, incoming: bytes) -> bytes:
        """The MCP endpoint; a `--mcp` without a path keeps the client's path."""
        if not self.path:
            return self.origin + incoming
        if self.query:
            return self.origin + self.path + b"?" + self.query
        _, sep, query = incoming.partition(b"?")
        return self.origin + self.path + sep + query

    def passthrough_url(self, incoming: bytes) -> bytes:
        return self.origin + incoming


@dataclass(frozen=True)
class Route:
    kind: Kind
    url: bytes
    rpc: jsonrpc.Batch | None = None

    @property
    def is_mcp(self) -> bool:
        return self.kind is not Kind.PASSTHROUGH


def _accepts_event_stream(headers: Headers) -> bool:
    return any(b"text/event-stream" in v.lower() for v in headers.getRawHeaders(b"accept", ()))


def route(method: bytes, uri: bytes, headers: Headers, body: bytes | None, upstream: Upstream) -> Route:
    """Classify one request; `uri` is the path and query as the client sent them."""
    if not uri.startswith(b"/"):
        uri = b"/" + uri
    if method == b"POST" and body:
        batch = jsonrpc.parse(body)
        if batch is not None:
            return Route(Kind.MCP_POST, upstream.mcp_url(uri), batch)
    elif method == b"GET" and _accepts_event_stream(headers):
        return Route(Kind.MCP_STREAM, upstream.mcp_url(uri))
    elif method == b"DELETE" and headers.hasHeader(b"mcp-session-id"):
        return Route(Kind.SESSION_DELETE, upstream.mcp_url(uri))
    return Route(Kind.PASSTHROUGH, upstream.passthrough_url(uri))
