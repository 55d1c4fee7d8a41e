"""End to end: the SDK example server's widget, written for localhost, served by `twist mcpr` through a
public origin (the tunnel's URL, or `[csp].domain`) and in direct mode, every part a real process."""

from __future__ import annotations

import io
import itertools
import json
import re
import signal
from pathlib import Path

from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mcpr.proxy.sse import SSEParser
from tests.support.loopback import client_agent
from tests.support.processes import Process, free_port, start_gateway, start_upstream, twist

WIDGET_URI = "ui://widget/greeting.html"
LOCAL_HTML = '<!doctype html><div id="greeting"></div><script type="module" src="/greeting.js"></script>\n'
RELAY_DOMAIN = "tunnel.example.test"  # not a local name: a tunnel URL under it is a real public origin


class McpClient:
    """Just enough of an MCP client to read raw tool and resource metadata (JSON or SSE answers)."""

    def __init__(self, testcase: TestCase, url: str, host: str | None = None) -> None:
        self.agent = client_agent(testcase)
        self.url = url
        self.host = host
        self.session: bytes | None = None
        self.ids = itertools.count(1)

    def headers(self, **extra: str) -> Headers:
        h = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in extra.items()})
        if self.host:
            h.setRawHeaders(b"host", [self.host.encode()])
        if self.session:
            h.setRawHeaders(b"mcp-session-id", [self.session])
        return h

    async def post(self, message: dict):
        h = self.headers(content_type="application/json", accept="application/json, text/event-stream")
        response = await self.agent.request(b"POST", f"{self.url}/mcp".encode(), h,
                                            FileBodyProducer(io.BytesIO(json.dumps(message).encode())))
        self.session = self.session or response.headers.getRawHeaders(b"mcp-session-id", [None])[0]
        return response, await readBody(response)

    async def call(self, method: str, **params) -> dict:
        id = next(self.ids)
        response, body = await self.post({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if content_type.startswith(b"text/event-stream"):
            messages = [json.loads(e.data) for e in SSEParser().feed(body) if e.data]
        else:
            messages = [json.loads(body)]
        (answer,) = [m for m in messages if m.get("id") == id]
        return answer["result"]

    async def start(self) -> None:
        await self.call("initialize", protocolVersion="2025-06-18", capabilities={},
                        clientInfo={"name": "e2e-widgets", "version": "1"})
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await self.agent.request(b"GET", f"{self.url}{path}".encode(), self.headers())
        return response.code, await readBody(response)

    async def widget(self) -> tuple[dict, dict]:
        """The tool's meta from tools/list and the widget's contents from resources/read."""
        tools = {t["name"]: t for t in (await self.call("tools/list"))["tools"]}
        (contents,) = (await self.call("resources/read", uri=WIDGET_URI))["contents"]
        return tools["show_greeting"]["_meta"], contents


def build_folder(base: Path) -> Path:
    folder = base / "dist"
    folder.mkdir(parents=True)
    (folder / "greeting.html").write_text(LOCAL_HTML)
    (folder / "greeting.js").write_text("document.getElementById('greeting').textContent = 'hi';\n")
    return folder


def csp(meta: dict) -> dict:
    """The directives, checked to be the same in the OpenAI and the Claude shape."""
    openai, claude = meta["openai/widgetCSP"], meta["ui"]["csp"]
    assert openai["connect_domains"] == claude["connectDomains"], meta
    assert openai["resource_domains"] == claude["resourceDomains"], meta
    return {"connect": openai["connect_domains"], "resource": openai["resource_domains"]}


class WidgetEndToEndTests(TestCase):
    """A local widget build served by `twist mcpr` directly, with `[csp].domain`, and through a tunnel."""

    timeout = 120

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.folder = build_folder(self.base)

    async def test_direct_mode_without_a_domain_keeps_localhost(self) -> None:
        _, upstream = start_upstream(self)
        _, base = start_gateway(self, upstream, "--widgets", str(self.folder))
        client = McpClient(self, base)
        await client.start()
        tool_meta, contents = await client.widget()
        self.assertEqual(tool_meta, {"openai/outputTemplate": WIDGET_URI, "ui": {"resourceUri": WIDGET_URI}})
        self.assertEqual(csp(contents["_meta"]), {
            "connect": ["http://localhost:9000", "https://api.open-meteo.com"],
            "resource": ["http://localhost:5173", "https://fonts.gstatic.com"]})
        self.assertNotIn("openai/widgetDomain", contents["_meta"])
        self.assertEqual(contents["text"], LOCAL_HTML)  # the local build answers resources/read
        self.assertEqual(await client.get("/greeting.js"), (200, (self.folder / "greeting.js").read_bytes()))

    async def test_configured_domain_and_reload_on_sighup(self) -> None:
        _, upstream = start_upstream(self)
        config = self.base / "mcpr.toml"
        config.write_text('[csp]\ndomain = "https://demo.example.com"\n')
        gateway, base = start_gateway(self, upstream, "--widgets", str(self.folder), "--config", str(config))
        client = McpClient(self, base)
        await client.start()
        _, contents = await client.widget()
        self.assertEqual(csp(contents["_meta"]), {
            "connect": ["https://demo.example.com", "https://api.open-meteo.com"],
            "resource": ["https://demo.example.com", "https://fonts.gstatic.com"]})
        self.assertEqual(contents["_meta"]["openai/widgetDomain"], "https://demo.example.com")
        self.assertEqual(contents["_meta"]["openai/widgetDescription"], "A card that greets someone.")

        config.write_text('upstream_timeout = 12\n[csp]\ndomain = "https://demo.example.com"\nmode = "override"\n'
                          'domains = ["https://cdn.example.net"]\n')
        gateway.popen.send_signal(signal.SIGHUP)
        await gateway.line("reload: [csp] applied", 10)
        _, contents = await client.widget()
        self.assertEqual(csp(contents["_meta"]), {
            "connect": ["https://demo.example.com", "https://cdn.example.net"],
            "resource": ["https://demo.example.com", "https://cdn.example.net"]})
        self.assertIn("changed setting(s) upstream_timeout need a restart", gateway.output())
        self.assertIsNone(gateway.popen.poll())

    async def test_through_the_tunnel_url(self) -> None:
        _, upstream = start_upstream(self)
        relay_port = free_port()
        relay = Process(self, twist("mcpr-relay", "--domain", RELAY_DOMAIN,
                                    "--listen", f"tcp:{relay_port}:interface=127.0.0.1",
                                    "--public-url", f"http://*.{RELAY_DOMAIN}:{relay_port}"), name="relay")
        relay.wait_for("listening on")
        cwd = self.base / "gateway"
        cwd.mkdir()
        gateway = Process(self, twist("mcpr", "--mcp", upstream, "--listen", "tcp:0:interface=127.0.0.1",
                                      "--relay-url", f"http://127.0.0.1:{relay_port}", "--subdomain", "demo",
                                      "--widgets", str(self.folder)), name="gateway", cwd=str(cwd))
        public = re.search(r"Tunnel: (\S+)", gateway.wait_for("Tunnel: ")).group(1)
        self.assertEqual(public, f"http://demo.{RELAY_DOMAIN}:{relay_port}")
        client = McpClient(self, f"http://127.0.0.1:{relay_port}", host=public.split("://", 1)[1])
        await client.start()
        tool_meta, contents = await client.widget()
        self.assertEqual(tool_meta, {"openai/outputTemplate": WIDGET_URI, "ui": {"resourceUri": WIDGET_URI}})
        self.assertEqual(csp(contents["_meta"]), {
            "connect": [public, "https://api.open-meteo.com"],
            "resource": [public, "https://fonts.gstatic.com"]})
        self.assertEqual(contents["_meta"]["openai/widgetDomain"], public)
        self.assertEqual(contents["text"], LOCAL_HTML)
        # The widget's assets come from the same public URL as the MCP endpoint.
        self.assertEqual(await client.get("/greeting.js"), (200, (self.folder / "greeting.js").read_bytes()))
        self.assertEqual(json.loads((await client.get("/widgets"))[1])["widgets"],
                         [{"name": "greeting", "uri": WIDGET_URI, "path": "/greeting.html"}])
