"""An upstream written for localhost: widget metadata, OAuth discovery documents, and a widget dev server."""

from __future__ import annotations

import gzip
import json

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

WIDGET_URI = "ui://widget/greeting.html"
UPSTREAM_HTML = "<p>the upstream's HTML</p>"


def widget_meta(port: int) -> dict:
    """What a server written for localhost declares, in both shapes."""
    return {
        "openai/widgetCSP": {
            "connect_domains": [f"http://localhost:{port}", "https://api.example.com"],
            "resource_domains": [f"http://127.0.0.1:{port}", "https://cdn.example.com"],
        },
        "ui": {"csp": {"connectDomains": [f"http://localhost:{port}"], "frameDomains": ["http://localhost:5173"]}},
        "openai/widgetDescription": "Says hello.",
    }


class EdgeUpstream(Resource):
    """`POST /mcp` answers in JSON, or in SSE when asked with `X-Answer: sse` (a progress event
    first, then the answer when `release` fires); OAuth documents name the upstream's own origin."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.held: list = []

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def render(self, request):
        path = request.path
        if path == b"/mcp" and request.method == b"POST":
            return self._mcp(request)
        if path.startswith(b"/.well-known/oauth-protected-resource"):
            return self._json(request, {
                "resource": f"{self.origin}/mcp",
                "authorization_servers": [f"http://localhost:{self.port}", "http://127.0.0.1:9/other-as"],
                "scopes_supported": ["mcp"],
                "resource_documentation": f"see {self.origin}/docs",
            })
        if path in (b"/.well-known/oauth-authorization-server", b"/.well-known/openid-configuration"):
            return self._json(request, {
                "issuer": f"http://localhost:{self.port}",
                "authorization_endpoint": f"http://localhost:{self.port}/authorize?x=1",
                "token_endpoint": f"{self.origin}/token",
                "registration_endpoint": f"http://[::1]:{self.port}/register",
                "jwks_uri": "https://keys.example.com/jwks",
                "code_challenge_methods_supported": ["S256"],
            })
        if path == b"/private":
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", f'Bearer error="invalid_token", resource_metadata="{self.origin}'
                                                   f'/.well-known/oauth-protected-resource/mcp"'.encode())
            return b""
        if path == b"/authorize":
            request.redirect(f"{self.origin}/login?next=%2F".encode())
            return b""
        return b"passthrough " + path

    def _json(self, request, value) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    def _result(self, message: dict) -> dict:
        method = message.get("method")
        meta = widget_meta(self.port)
        if method == "tools/list":
            return {"tools": [{"name": "greet", "inputSchema": {"type": "object"},
                               "description": "Points at http://localhost in prose, which stays.",
                               "_meta": {"openai/outputTemplate": WIDGET_URI, **meta}}]}
        if method == "resources/read":
            uri = message["params"]["uri"]
            return {"contents": [{"uri": uri, "mimeType": "text/html+skybridge", "text": UPSTREAM_HTML,
                                  "_meta": meta}]}
        if method == "resources/list":
            return {"resources": [{"uri": WIDGET_URI, "name": "greeting", "_meta": meta},
                                  {"uri": "ui://widget/other.html", "name": "other"}]}
        return {}

    def _mcp(self, request):
        body = json.loads(request.content.read())
        messages = body if isinstance(body, list) else [body]
        answers = [{"jsonrpc": "2.0", "id": m["id"], "result": self._result(m)} for m in messages if "id" in m]
        value = answers if isinstance(body, list) else answers[0]
        mode = request.getHeader(b"x-answer")
        if mode == b"gzip":
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", b"application/json")
            return gzip.compress(json.dumps(value).encode())
        if mode != b"sse":
            return self._json(request, value)
        request.setHeader(b"content-type", b"text/event-stream")
        progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": 1, "progress": 1, "_meta": widget_meta(self.port)}}
        request.write(b"event: message\r\nid: p-1\r\ndata: " + json.dumps(progress).encode() + b"\r\n\r\n")
        request.write(b": keep-alive\r\n\r\n")

        def release() -> None:
            request.write(b"event: message\r\nid: a-1\r\ndata: " + json.dumps(value).encode() + b"\r\n\r\n")
            request.finish()

        self.held.append(release)
        return NOT_DONE_YET


class DevServer(Resource):
    """A widget dev server: HTML at /<name>.html, and assets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request):
        self.seen.append(request.uri)
        if request.path == b"/greeting.html":
            request.setHeader(b"content-type", b"text/html")
            return b"<p>from the dev server</p>"
        if request.path == b"/src/main.tsx":
            request.setHeader(b"content-type", b"text/javascript")
            return b"export default 1;"
        request.setResponseCode(404)
        return b"not here"
