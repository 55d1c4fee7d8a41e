"""Widget serving: a built folder (types, validators, no way out of it) and a dev server, on one URL with MCP."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mcpr.gateway.settings import load_gateway
from mcpr.gateway.tap import build_resource, build_site
from mcpr.proxy.widgets import WidgetFolder, substitute_html, widget_name
from tests.support.edge_upstream import UPSTREAM_HTML, WIDGET_URI, DevServer, EdgeUpstream
from tests.support.loopback import TrackingSite, client_agent, listen, track

PUBLIC = "https://abc.tunnel.example.com"
LOCAL_HTML = '<!doctype html><div id="root"></div><script type="module" src="/assets/app.js"></script>\n'

# Ways out of the folder (all named like assets, so that they route to it); every one must be a 404.
ESCAPES = [
    b"/../outside.js",
    b"/%2e%2e/outside.js",
    b"/%2E%2E/outside.js",
    b"/assets/..%2f..%2foutside.js",
    b"/assets/%2e%2e%2f%2e%2e%2foutside.js",
    b"/assets/%252e%252e/%252e%252e/outside.js",
    b"/..%5coutside.js",
    b"/link-out/outside.js",
    b"/secret.js",
    b"/greeting.html%00.js",
    b"/%c0%ae%c0%ae/outside.js",
]


def escapes(base: Path) -> list[bytes]:
    """ESCAPES, and absolute paths to the file outside, plain and encoded."""
    outside = str((base / "outside.js").resolve()).encode()
    return [*ESCAPES, b"/" + outside, outside.replace(b"/", b"%2f"), b"/assets/" + outside.replace(b"/", b"%2F")]


def make_folder(base: Path) -> Path:
    root = base / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "chart").mkdir()
    (root / "greeting.html").write_text(LOCAL_HTML)
    (root / "assets" / "app.js").write_text("export const answer = 42;\n")
    (root / "assets" / "app.css").write_text("body { margin: 0 }\n")
    (root / "assets" / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "assets" / "font.woff2").write_bytes(b"wOF2")
    (root / "chart" / "index.html").write_text("<p>chart</p>")
    (base / "outside.js").write_text("SECRET")
    os.symlink(base.resolve(), root / "link-out")
    os.symlink(os.path.join("..", "outside.js"), root / "secret.js")
    os.symlink(os.path.join("assets", "app.js"), root / "alias.js")
    return root


class FolderTests(SynchronousTestCase):
    """WidgetFolder and substitute_html: the files served, the widget names, no path out, metadata kept."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.root = make_folder(self.base)
        self.folder = WidgetFolder(self.root)

    def test_no_way_out(self) -> None:
        for path in escapes(self.base):
            self.assertIsNone(self.folder.find(path), path)

    def test_inside_paths_resolve(self) -> None:
        real = self.root.resolve()
        self.assertEqual(self.folder.find(b"/greeting.html"), real / "greeting.html")
        self.assertEqual(self.folder.find(b"/assets/app%2Ejs"), real / "assets" / "app.js")
        self.assertEqual(self.folder.find(b"/alias.js"), real / "assets" / "app.js")  # a link that stays inside
        self.assertEqual(self.folder.find(b"/chart/"), real / "chart" / "index.html")
        self.assertIsNone(self.folder.find(b"/assets"))
        self.assertIsNone(self.folder.find(b"/missing.js"))

    def test_names_and_paths(self) -> None:
        self.assertEqual(self.folder.names(), ["chart", "greeting"])
        self.assertEqual((self.folder.path_of("greeting"), self.folder.path_of("chart"),
                          self.folder.path_of("nope")), ("/greeting.html", "/chart/", None))

    def test_widget_names(self) -> None:
        self.assertEqual(widget_name("ui://widget/pizza-map.html"), "pizza-map")
        for uri in ("ui://widget/../x.html", "ui://widget/a/b.html", "ui://other/a.html", "ui://widget/.html", None):
            self.assertIsNone(widget_name(uri), uri)

    def test_substitute_keeps_metadata(self) -> None:
        result = {"contents": [{"uri": WIDGET_URI, "blob": "eA==", "_meta": {"k": 1}}, {"uri": "other", "text": "x"}]}
        self.assertTrue(substitute_html(result, WIDGET_URI, "<p>"))
        self.assertEqual(result["contents"], [{"uri": WIDGET_URI, "_meta": {"k": 1}, "text": "<p>"},
                                              {"uri": "other", "text": "x"}])
        self.assertFalse(substitute_html(result, WIDGET_URI, "<p>"))
        self.assertFalse(substitute_html({"contents": "nope"}, WIDGET_URI, "<p>"))


class _Raw(Protocol):
    """Sends one request exactly as written and keeps the whole answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


class WidgetProxyTests(TestCase):
    """Widget assets and HTML served beside MCP on one URL, from a folder or a dev server, on loopback."""

    timeout = 20

    async def start(self, widgets: str | None = None) -> None:
        self.base = base = Path(self.mktemp()).resolve()
        base.mkdir()
        self.root = make_folder(base)
        self.upstream = EdgeUpstream()
        self.upstream.port = await listen(self, TrackingSite(self.upstream))
        settings = load_gateway({"mcp": f"http://127.0.0.1:{self.upstream.port}/mcp",
                                 "widgets": widgets or str(self.root)}, env={}, cwd=base)
        self.resource = build_resource(settings, reactor)
        self.addCleanup(self.resource.forwarder.close)
        self.resource.public_origin = PUBLIC
        self.direct = await listen(self, track(build_site(self.resource, settings)))
        self.unplugged = build_site(self.resource, settings)  # for connections in memory
        self.tunnel = await listen(self, track(build_site(self.resource, settings, via="tunnel")))
        self.agent = client_agent(self)

    async def get(self, path: str, port: int | None = None, method: bytes = b"GET", **headers):
        h = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
        response = await self.agent.request(method, f"http://127.0.0.1:{port or self.direct}{path}".encode(), h)
        return response, await readBody(response)

    async def read_widget(self, port: int) -> dict:
        body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "resources/read",
                           "params": {"uri": WIDGET_URI}}).encode()
        response = await self.agent.request(b"POST", f"http://127.0.0.1:{port}/mcp".encode(),
                                            Headers({b"content-type": [b"application/json"]}),
                                            FileBodyProducer(io.BytesIO(body)))
        (content,) = json.loads(await readBody(response))["result"]["contents"]
        return content

    async def raw(self, request: bytes) -> bytes:
        protocol = _Raw(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.direct), protocol)
        return await protocol.done

    def answered_at_once(self, request: bytes) -> bytes:
        """The gateway's answer to `request` exactly as written, from a connection in memory.

        For answers written in one go (no file sent): they are complete when `dataReceived` returns.
        """
        channel = self.unplugged.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(request)
        channel.connectionLost(Failure(ConnectionDone()))
        return transport.value()

    async def test_assets_served_with_types_validators_and_cors(self):
        await self.start()
        for path, ctype in (("/greeting.html", b"text/html; charset=utf-8"),
                            ("/assets/app.js", b"text/javascript; charset=utf-8"),
                            ("/assets/app.css", b"text/css; charset=utf-8"),
                            ("/assets/logo.svg", b"image/svg+xml"), ("/assets/font.woff2", b"font/woff2")):
            response, body = await self.get(path)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [ctype], path)
            self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
            self.assertEqual(body, (self.root / path.lstrip("/")).read_bytes())
        response, _ = await self.get("/assets/app.js")
        (etag,) = response.headers.getRawHeaders(b"etag")
        (modified,) = response.headers.getRawHeaders(b"last-modified")
        again, body = await self.get("/assets/app.js", if_none_match=etag.decode())
        self.assertEqual((again.code, body), (304, b""))
        again, body = await self.get("/assets/app.js", if_modified_since=modified.decode())
        self.assertEqual((again.code, body), (304, b""))
        again, body = await self.get("/assets/app.js", if_none_match='"stale"', if_modified_since=modified.decode())
        self.assertEqual(again.code, 200)
        head, body = await self.get("/assets/app.js", method=b"HEAD")
        self.assertEqual((head.code, body, head.length), (200, b"", 0))

    async def test_path_traversal_is_404(self):
        await self.start()
        for path in escapes(self.base):
            answer = self.answered_at_once(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            # A target that is not a path (no leading "/") is refused by the front itself (400).
            status = b"HTTP/1.1 404" if path.startswith(b"/") else b"HTTP/1.1 400"
            self.assertTrue(answer.startswith(status), (path, answer[:40]))
            self.assertNotIn(b"SECRET", answer)
        answer = await self.raw(b"GET /greeting.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"))

    async def test_one_url_serves_mcp_and_assets(self):
        await self.start()
        content = await self.read_widget(self.tunnel)
        self.assertEqual(content["text"], LOCAL_HTML)  # the local build, not the upstream's
        self.assertEqual(content["_meta"]["openai/widgetDescription"], "Says hello.")  # the upstream's meta
        self.assertEqual(content["_meta"]["openai/widgetCSP"]["resource_domains"],
                         [PUBLIC, "https://cdn.example.com"])
        direct = await self.read_widget(self.direct)
        self.assertEqual(direct["text"], LOCAL_HTML)
        _, body = await self.get("/authorize", accept="text/html")
        self.assertEqual(body, b"")  # the upstream's redirect, not the folder
        response, _ = await self.get("/favicon", accept="image/avif,image/webp,*/*")
        self.assertEqual(response.code, 404)  # an image request goes to the folder
        _, body = await self.get("/.well-known/thing.json")
        self.assertEqual(body, b"passthrough /.well-known/thing.json")

    async def test_widget_listing(self):
        await self.start()
        response, body = await self.get("/widgets")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        listing = json.loads(body)
        self.assertEqual(sorted(listing), ["source", "widgets"])
        self.assertNotIn(str(self.base).encode(), body)  # nothing of the developer's disk
        self.assertEqual(listing["source"], "folder")
        self.assertEqual(listing["widgets"], [
            {"name": "chart", "uri": "ui://widget/chart.html", "path": "/chart/"},
            {"name": "greeting", "uri": "ui://widget/greeting.html", "path": "/greeting.html"},
        ])

    async def test_dev_server(self):
        """Assets are proxied to the dev server, and its HTML answers resources/read."""
        dev = DevServer()
        dev_port = await listen(self, TrackingSite(dev))
        await self.start(f"http://127.0.0.1:{dev_port}/")
        response, body = await self.get("/src/main.tsx?t=1")
        self.assertEqual((response.code, body), (200, b"export default 1;"))
        response, _ = await self.get("/@vite/client")
        self.assertEqual(response.code, 404)
        self.assertEqual(dev.seen, [b"/src/main.tsx?t=1", b"/@vite/client"])
        content = await self.read_widget(self.tunnel)
        self.assertEqual(content["text"], "<p>from the dev server</p>")
        self.assertEqual(content["_meta"]["openai/widgetDomain"], PUBLIC)
        body = (await self.get("/widgets"))[1]
        listing = json.loads(body)
        self.assertEqual(listing, {"source": "dev-server", "widgets": None})
        self.assertNotIn(str(dev_port).encode(), body)

    async def test_dev_server_down_keeps_the_upstream_html(self):
        await self.start("http://127.0.0.1:1")
        content = await self.read_widget(self.tunnel)
        self.assertEqual(content["text"], UPSTREAM_HTML)
        response, body = await self.get("/assets/app.js")
        self.assertEqual(response.code, 502)
        self.assertIn(b"127.0.0.1:1", body)
