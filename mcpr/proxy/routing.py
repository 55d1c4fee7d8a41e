"""Where a request goes: the MCP endpoint, or the upstream origin as is.

The gateway serves a whole origin, not one path: MCP traffic is recognised by
what it is (a JSON-RPC body, an SSE GET, a session DELETE) and sent to the
configured MCP URL; widget assets go to the widget source when there is one;
everything else (OAuth, `/.well-known/*`) keeps its path and query on the
upstream origin.
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
    WIDGET = "widget"
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


def _accepts_event_stream(headers: Headers) -> bool:
    return any(b"text/event-stream" in v.lower() for v in headers.getRawHeaders(b"accept", ()))


# Paths a browser loads as widget assets.  HTML pages without an extension
# (OAuth's /authorize, a server's own pages) are not among them: they stay upstream.
ASSET_EXTENSIONS = frozenset({
    b".html", b".htm", b".js", b".mjs", b".cjs", b".jsx", b".ts", b".tsx", b".css", b".map", b".wasm",
    b".png", b".jpg", b".jpeg", b".gif", b".svg", b".webp", b".avif", b".ico",
    b".woff", b".woff2", b".ttf", b".otf", b".mp3", b".mp4", b".webm",
})
_ASSET_MEDIA = (b"text/css", b"text/javascript", b"application/javascript", b"image/", b"font/", b"audio/",
                b"video/")
_DEV_SERVER_PREFIXES = (b"/@", b"/node_modules/")  # Vite's module and client paths


def is_widget_request(method: bytes, path: bytes, headers: Headers) -> bool:
    """A GET for a widget asset: by extension, by a dev server's module path, or by what it accepts."""
    if method not in (b"GET", b"HEAD") or path.startswith(b"/.well-known/"):
        return False
    if path == b"/widgets" or path.startswith(_DEV_SERVER_PREFIXES):
        return True
    name = path.rsplit(b"/", 1)[-1].lower()
    if b"." in name and name[name.rindex(b"."):] in ASSET_EXTENSIONS:
        return True
    accept = headers.getRawHeaders(b"accept", [b""])[0].split(b",", 1)[0].strip().lower()
    return accept.startswith(_ASSET_MEDIA)


def route(method: bytes, uri: bytes, headers: Headers, body: bytes | None, upstream: Upstream, *,
          widgets: bool = False) -> Route:
    """Classify one request; `uri` is the path and query as the client sent them.

    With `widgets`, asset requests route to the widget source; their `url` is
    then the client's own path and query, for the source to resolve.
    """
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
    if widgets and is_widget_request(method, uri.split(b"?", 1)[0], headers):
        return Route(Kind.WIDGET, uri)
    return Route(Kind.PASSTHROUGH, upstream.passthrough_url(uri))
