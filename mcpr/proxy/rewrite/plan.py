"""What the gateway changes in a response, and when.

Three rewrites make a server written for localhost work behind a public URL:
widget CSP metadata in MCP answers, local widget HTML in `resources/read`,
and OAuth URLs in discovery documents and headers.  Which applies is decided
from the request (its route, its JSON-RPC methods and ids) and the response's
headers, before any body byte flows, so bodies that need nothing keep
streaming untouched, Content-Length included.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from mcpr.proxy import jsonrpc
from mcpr.proxy.answers import is_event_stream, is_json
from mcpr.proxy.jsonrpc import id_key
from mcpr.proxy.rewrite.csp import REWRITTEN_METHODS, CspRewriter
from mcpr.proxy.rewrite.oauth import OriginMap, is_discovery
from mcpr.proxy.rewrite.streaming import BodyRewriter, EventStreamRewriter, JsonRewriter, Transform
from mcpr.proxy.routing import Kind, Route
from mcpr.proxy.widgets import WidgetSource, substitute_html, widget_name

log = Logger()

# (widget URI, local HTML) for the `resources/read` requests of one body, by JSON-RPC id.
LocalHtml = Mapping[Any, tuple[str, str]]


def request_origin(request: Request) -> str:
    """The origin the client addressed, from its Host header (direct mode has no other)."""
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{host}"


async def local_html(batch: jsonrpc.Batch, source: WidgetSource) -> dict[Any, tuple[str, str]]:
    """The local HTML for each `resources/read` of a `ui://widget/<name>.html` in `batch`.

    Never fails: a widget that cannot be read leaves the upstream's HTML in place.
    """
    found: dict[Any, tuple[str, str]] = {}
    for message in batch.requests:
        name = widget_name(message.target) if message.method == "resources/read" else None
        if name is None:
            continue
        try:
            html = await source.html(name)
        except Exception:
            log.failure("reading widget {name} from {source} failed", name=name, source=source.location)
            continue
        if html is not None:
            found[id_key(message.id)] = (message.target, html)
    return found


def answers_transform(batch: jsonrpc.Batch, csp: CspRewriter, htmls: LocalHtml) -> Transform | None:
    """Rewrites the answers to `batch`'s widget-bearing requests; None if it has none."""
    methods = {id_key(m.id): m.method for m in batch.requests if m.method in REWRITTEN_METHODS}
    if not methods or not (csp.active or htmls):
        return None

    def transform(value: Any) -> bool:
        changed = False
        for message in value if isinstance(value, list) else (value,):
            if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or "result" not in message:
                continue
            key = id_key(message.get("id"))
            method = methods.get(key)
            if method is None:
                continue
            if key in htmls:
                changed |= substitute_html(message["result"], *htmls[key])
            changed |= csp.rewrite_result(method, message["result"])
        return changed

    return transform


def mentions_origin(rt: Route, request: Request, response: IResponse) -> bool:
    """Whether the response may carry upstream URLs to move (most answers do not: skip the work)."""
    headers = response.headers
    return (headers.hasHeader(b"www-authenticate") or headers.hasHeader(b"location")
            or (rt.kind is Kind.PASSTHROUGH and request.method == b"GET" and is_discovery(request.path)))


def body_rewriter(rt: Route, request: Request, response: IResponse, headers: Headers, *,
                  csp: CspRewriter, htmls: LocalHtml, oauth: OriginMap | None,
                  write: Callable[[bytes], None]) -> BodyRewriter | None:
    """The rewriter the response body must go through, or None to stream it untouched.

    `headers` are the downstream response headers, not yet sent; Content-Length
    is taken out of them when the body may change.
    """
    if response.code != 200 or _encoded(response.headers):
        return None
    transform: Transform | None = None
    if rt.kind is Kind.MCP_POST and rt.rpc is not None:
        transform = answers_transform(rt.rpc, csp, htmls)
    elif oauth is not None and rt.kind is Kind.PASSTHROUGH and request.method == b"GET" \
            and is_discovery(request.path):
        transform = oauth.document
    if transform is None:
        return None
    content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
    if is_event_stream(content_type):
        headers.removeHeader(b"content-length")
        return EventStreamRewriter(transform, write)
    if is_json(content_type):
        headers.removeHeader(b"content-length")
        return JsonRewriter(transform, write, headers)
    return None


def _encoded(headers: Headers) -> bool:
    """A compressed body cannot be rewritten (the proxy never decodes bodies)."""
    encodings = headers.getRawHeaders(b"content-encoding", ())
    return any(e.strip().lower() not in (b"", b"identity") for e in encodings)
