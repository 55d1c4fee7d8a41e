"""What the gateway changes in a response, and when: one decision per response.

Three rewrites make a server written for localhost work behind a public URL:
widget CSP metadata in MCP answers, local widget HTML in `resources/read`,
and OAuth URLs in discovery documents and headers.  Which applies is decided
from the request (its route, its JSON-RPC methods and ids) and the response's
head, before any body byte flows, so bodies that need nothing keep streaming
untouched, Content-Length included.  `plan` makes that decision in one place
and returns it as a `Plan`, which can be checked without a connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from mcpr.common.web import is_json
from mcpr.proxy import jsonrpc
from mcpr.proxy.answers import is_event_stream
from mcpr.proxy.jsonrpc import id_key
from mcpr.proxy.rewrite.csp import REWRITTEN_METHODS, SCREENED_METHODS, CspPolicy, CspRewriter, could_change
from mcpr.proxy.rewrite.oauth import OriginMap, is_discovery
from mcpr.proxy.rewrite.streaming import BodyRewriter, EventStreamRewriter, JsonRewriter, Screen, Transform
from mcpr.proxy.routing import Kind, Route, Upstream
from mcpr.proxy.widgets import substitute_html

# (widget URI, local HTML) for the `resources/read` requests of one body, by JSON-RPC id.
LocalHtml = Mapping[Any, tuple[str, str]]


@dataclass(slots=True)
class Plan:
    """What one response needs before its body flows.

    `origins` moves upstream URLs in `WWW-Authenticate` and `Location`;
    `transform`, if any, changes the JSON of the body, which then goes
    through a rewriter (event by event when `event_stream`);
    `content_length` is the upstream's, kept when the body passes unchanged;
    `screen`, if any, lets a body (or an event) whose bytes cannot need the
    transform pass without being parsed.
    """

    origins: OriginMap | None = None
    transform: Transform | None = None
    event_stream: bool = False
    content_length: int | None = None
    screen: Screen | None = None

    def rewrite_headers(self, headers: Headers) -> None:
        """Apply the plan to the downstream response headers, not yet sent."""
        if self.origins is not None:
            self.origins.headers(headers)
        if self.content_length is not None:
            headers.setRawHeaders(b"content-length", [b"%d" % self.content_length])

    def rewriter(self, write: Callable[[bytes], None], headers: Headers) -> BodyRewriter | None:
        """The rewriter the body goes through on its way to `write`, or None to stream it untouched.

        A rewritten JSON body gets its new Content-Length in `headers` once complete.
        """
        if self.transform is None:
            return None
        if self.event_stream:
            return EventStreamRewriter(self.transform, write, screen=self.screen)
        return JsonRewriter(self.transform, write, headers, screen=self.screen)


def plan(rt: Route, request: Request, response: IResponse, *, origin: str | None, htmls: LocalHtml,
         csp: CspPolicy, upstream: Upstream) -> Plan:
    """Decide what `response` to `request` needs.

    `origin` is the public origin the request came through (None in direct
    mode without `[csp].domain`), `htmls` the local widget HTML read for its
    `resources/read` requests, `csp` the policy in force.
    """
    headers = response.headers
    content_type = headers.getRawHeaders(b"content-type", [None])[0]
    event_stream = is_event_stream(content_type)
    discovery = rt.kind is Kind.PASSTHROUGH and request.method == b"GET" and is_discovery(request.path)
    origins = None
    if discovery or headers.hasHeader(b"www-authenticate") or headers.hasHeader(b"location"):
        origins = OriginMap(upstream, origin or request_origin(request))
    transform: Transform | None = None
    screen: Screen | None = None
    if response.code == 200 and (event_stream or is_json(content_type)) and not _encoded(headers):
        if rt.kind is Kind.MCP_POST and rt.rpc is not None:
            methods = _rewritten_methods(rt.rpc)
            if methods:
                transform = _answers_transform(methods, CspRewriter(csp, origin, upstream.host), htmls)
                if transform is not None and not htmls and SCREENED_METHODS.issuperset(methods.values()):
                    screen = could_change
        elif origins is not None and discovery:
            transform = origins.document
    length = response.length
    keep = (transform is None and isinstance(length, int) and request.method != b"HEAD"
            and response.code not in (204, 304))
    return Plan(origins, transform, event_stream, length if keep else None, screen)


def request_origin(request: Request) -> str:
    """The origin the client addressed, from its Host header (direct mode has no other)."""
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{host}"


def answers_transform(batch: jsonrpc.Batch, csp: CspRewriter, htmls: LocalHtml) -> Transform | None:
    """Rewrites the answers to `batch`'s widget-bearing requests; None if it has none."""
    methods = _rewritten_methods(batch)
    return _answers_transform(methods, csp, htmls) if methods else None


def _rewritten_methods(batch: jsonrpc.Batch) -> dict[Any, str]:
    """The method of each request in `batch` whose answer may carry widget metadata, by JSON-RPC id."""
    return {id_key(m.id): m.method for m in batch.requests if m.method in REWRITTEN_METHODS}


def _answers_transform(methods: dict[Any, str], csp: CspRewriter, htmls: LocalHtml) -> Transform | None:
    if not (csp.active or htmls):
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


def _encoded(headers: Headers) -> bool:
    """A compressed body cannot be rewritten (the proxy never decodes bodies)."""
    encodings = headers.getRawHeaders(b"content-encoding", ())
    return any(e.strip().lower() not in (b"", b"identity") for e in encodings)
