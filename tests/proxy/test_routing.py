"""Where each kind of request goes."""

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from mcpr.proxy.routing import Kind, Upstream, route

RPC = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}'


class RoutingTests(SynchronousTestCase):
    """route(): the kind of each request and the upstream URL it goes to."""

    up = Upstream.parse("http://localhost:9000/mcp")

    def r(self, method, uri, body=None, **headers):
        h = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        return route(method, uri, h, body, self.up)

    def test_jsonrpc_post(self) -> None:
        rt = self.r(b"POST", b"/", RPC)
        self.assertEqual((rt.kind, rt.url), (Kind.MCP_POST, b"http://localhost:9000/mcp"))
        self.assertEqual(rt.rpc.first.target, "add")
        batch = b"[" + RPC + b"]"
        self.assertEqual(self.r(b"POST", b"/x", batch).kind, Kind.MCP_POST)

    def test_sse_get(self) -> None:
        rt = self.r(b"GET", b"/mcp?a=1", accept="text/event-stream")
        self.assertEqual((rt.kind, rt.url), (Kind.MCP_STREAM, b"http://localhost:9000/mcp?a=1"))

    def test_delete_with_session(self) -> None:
        rt = self.r(b"DELETE", b"/mcp", mcp_session_id="s")
        self.assertEqual((rt.kind, rt.url), (Kind.SESSION_DELETE, b"http://localhost:9000/mcp"))
        self.assertEqual(self.r(b"DELETE", b"/thing").kind, Kind.PASSTHROUGH)

    def test_everything_else_keeps_path_and_query(self) -> None:
        for method, uri, body in ((b"GET", b"/.well-known/oauth-authorization-server?x=1", None),
                                  (b"POST", b"/token", b"grant_type=code"),
                                  (b"POST", b"/register", b'{"redirect_uris":["x"]}'),
                                  (b"POST", b"/mcp", b"{broken")):
            rt = self.r(method, uri, body)
            self.assertEqual((rt.kind, rt.url), (Kind.PASSTHROUGH, b"http://localhost:9000" + uri))

    def test_mcp_url_without_path_keeps_client_path(self) -> None:
        up = Upstream.parse("http://localhost:9000")
        rt = route(b"POST", b"/custom?q", Headers(), RPC, up)
        self.assertEqual(rt.url, b"http://localhost:9000/custom?q")

    def test_mcp_url_with_query(self) -> None:
        up = Upstream.parse("https://api.example/mcp?key=1")
        self.assertEqual(up.port, 443)
        self.assertEqual(route(b"POST", b"/mcp?other", Headers(), RPC, up).url, b"https://api.example/mcp?key=1")

    def test_widget_assets_route_to_the_widget_source_when_there_is_one(self) -> None:
        cases = [
            (b"GET", b"/assets/app.js", None, {}, Kind.WIDGET),
            (b"HEAD", b"/x.CSS?v=1", None, {}, Kind.WIDGET),
            (b"GET", b"/@vite/client", None, {}, Kind.WIDGET),
            (b"GET", b"/node_modules/.vite/deps/react.js?v=1", None, {}, Kind.WIDGET),
            (b"GET", b"/widgets", None, {}, Kind.WIDGET),
            (b"GET", b"/logo", None, {"accept": "image/avif,image/webp,*/*"}, Kind.WIDGET),
            (b"GET", b"/authorize", None, {"accept": "text/html,application/xhtml+xml"}, Kind.PASSTHROUGH),
            (b"GET", b"/", None, {"accept": "text/html"}, Kind.PASSTHROUGH),
            (b"GET", b"/.well-known/oauth-authorization-server", None, {}, Kind.PASSTHROUGH),
            (b"GET", b"/.well-known/thing.js", None, {}, Kind.PASSTHROUGH),
            (b"PUT", b"/app.js", b"x", {}, Kind.PASSTHROUGH),
            (b"POST", b"/app.js", RPC, {}, Kind.MCP_POST),
            (b"GET", b"/mcp.js", None, {"accept": "text/event-stream"}, Kind.MCP_STREAM),
        ]
        for method, uri, body, headers, kind in cases:
            h = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
            rt = route(method, uri, h, body, self.up, widgets=True)
            self.assertEqual(rt.kind, kind, uri)
            if kind is Kind.WIDGET:
                self.assertEqual(rt.url, uri)
            self.assertEqual(route(method, uri, h, body, self.up).kind,
                             Kind.PASSTHROUGH if kind is Kind.WIDGET else kind, uri)
