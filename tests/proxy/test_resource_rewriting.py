"""The proxy core rewriting widget CSP and OAuth URLs, over real loopback connections.

Two listeners serve the same resource: one as direct mode, one marked as the
tunnel's (`via="tunnel"`), the way the tunnel feeds its streams in.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from mcpr.gateway.settings import load_gateway
from mcpr.gateway.tap import build_resource, build_site
from tests.support.collect import Collect
from tests.support.edge_upstream import EdgeUpstream
from tests.support.loopback import TrackingSite, client_agent, listen, track

PUBLIC = "https://abc.tunnel.example.com"


def rpc(method: str, id=1, **params) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


class ResourceRewritingTests(TestCase):
    """ProxyResource rewriting widget metadata and OAuth URLs for the public origin, on loopback."""

    timeout = 20

    async def start(self, config: str = "", **cli) -> None:
        self.upstream = EdgeUpstream()
        self.upstream.port = await listen(self, TrackingSite(self.upstream))
        cwd = Path(self.mktemp())
        cwd.mkdir()
        (cwd / "mcpr.toml").write_text(config)
        settings = load_gateway({"mcp": f"http://127.0.0.1:{self.upstream.port}/mcp", **cli}, env={}, cwd=cwd)
        self.resource = build_resource(settings, reactor)
        self.addCleanup(self.resource.forwarder.close)
        self.resource.public_origin = PUBLIC  # what the tunnel sets once registered
        self.direct = await listen(self, track(build_site(self.resource, settings)))
        self.tunnel = await listen(self, track(build_site(self.resource, settings, via="tunnel")))
        self.agent = client_agent(self)

    async def request(self, port: int, method: bytes, path: str, body=None, headers: dict | None = None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        h = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        return await self.agent.request(method, f"http://127.0.0.1:{port}{path}".encode(), h, producer)

    async def call(self, port: int, message, **headers) -> tuple[dict, bytes, object]:
        response = await self.request(port, b"POST", "/mcp", message, headers)
        body = await readBody(response)
        return json.loads(body), body, response

    async def test_tools_list_through_the_tunnel_is_rewritten_with_a_new_length(self):
        await self.start()
        answer, body, response = await self.call(self.tunnel, rpc("tools/list"))
        (tool,) = answer["result"]["tools"]
        meta = tool["_meta"]
        self.assertEqual(meta["openai/widgetCSP"]["connect_domains"], [PUBLIC, "https://api.example.com"])
        self.assertEqual(meta["openai/widgetCSP"]["resource_domains"], [PUBLIC, "https://cdn.example.com"])
        self.assertEqual(meta["ui"]["csp"]["connectDomains"], [PUBLIC, "https://api.example.com"])
        self.assertEqual(meta["ui"]["csp"]["frameDomains"], [])
        self.assertEqual(meta["openai/widgetDomain"], PUBLIC)
        self.assertEqual(tool["description"], "Points at http://localhost in prose, which stays.")
        self.assertEqual(response.length, len(body))

    async def test_direct_mode_without_a_domain_keeps_localhost_and_the_bytes(self):
        await self.start()
        _, body, response = await self.call(self.direct, rpc("tools/list"))
        expected = json.dumps({"jsonrpc": "2.0", "id": 1,
                               "result": self.upstream._result(rpc("tools/list"))}).encode()
        self.assertEqual(body, expected)

    async def test_configured_domain_applies_to_direct_requests_and_wins_over_the_tunnel(self):
        await self.start('[csp]\ndomain = "https://mcp.example.org"\nmode = "override"\n'
                         'domains = ["https://fonts.example.org"]\n')
        for port in (self.direct, self.tunnel):
            answer, _, _ = await self.call(port, rpc("resources/read", uri="ui://widget/greeting.html"))
            (content,) = answer["result"]["contents"]
            csp = content["_meta"]["openai/widgetCSP"]
            self.assertEqual(csp["connect_domains"], ["https://mcp.example.org", "https://fonts.example.org"])
            self.assertEqual(content["_meta"]["openai/widgetDomain"], "https://mcp.example.org")
            self.assertEqual(content["text"], "<p>the upstream's HTML</p>")

    async def test_sse_answer_rewritten_event_by_event(self):
        await self.start()
        response = await self.request(self.tunnel, b"POST", "/mcp", rpc("tools/list", id=5),
                                      {"x-answer": "sse", "accept": "application/json, text/event-stream"})
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        collect = Collect()
        first = collect.next_chunk()
        response.deliverBody(collect)
        progress = await first
        # The notification arrived while the answer is still held upstream: still streamed.
        self.assertTrue(progress.startswith(b"event: message\r\nid: p-1\r\ndata: "))
        self.assertIn(b'"http://localhost:', progress)  # not an answer to a widget method: untouched
        (release,) = self.upstream.held
        release()
        await collect.done
        body = b"".join(collect.chunks)
        self.assertIn(b": keep-alive\r\n\r\n", body)
        last = body.rsplit(b"\r\n\r\n", 2)[-2]
        self.assertTrue(last.startswith(b"event: message\r\nid: a-1\r\ndata: "))
        answer = json.loads(last.split(b"data: ", 1)[1])
        self.assertEqual(answer["result"]["tools"][0]["_meta"]["openai/widgetDomain"], PUBLIC)

    async def test_batch_answers(self):
        await self.start()
        batch = [rpc("tools/list", id=1), rpc("ping", id=2),
                 rpc("resources/list", id=3), {"jsonrpc": "2.0", "method": "notifications/initialized"}]
        answer, _, _ = await self.call(self.tunnel, batch)
        by_id = {a["id"]: a["result"] for a in answer}
        self.assertEqual(by_id[2], {})
        self.assertEqual(by_id[1]["tools"][0]["_meta"]["openai/widgetDomain"], PUBLIC)
        declared, bare = by_id[3]["resources"]
        self.assertEqual(declared["_meta"]["ui"]["csp"]["resourceDomains"], [PUBLIC, "https://cdn.example.com"])
        # A ui:// resource that declared nothing gets the public origin, so its assets load.
        self.assertEqual(bare["_meta"]["openai/widgetCSP"], {"connect_domains": [PUBLIC],
                                                              "resource_domains": [PUBLIC]})

    async def test_compressed_answers_pass_untouched(self):
        await self.start()
        response = await self.request(self.tunnel, b"POST", "/mcp", rpc("tools/list"),
                                      {"x-answer": "gzip", "accept-encoding": "gzip"})
        body = await readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertIn(b"localhost", gzip.decompress(body))

    async def test_oauth_discovery_points_at_the_public_origin(self):
        await self.start()
        up = self.upstream.port
        for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-authorization-server",
                     "/.well-known/openid-configuration"):
            response = await self.request(self.tunnel, b"GET", path)
            body = await readBody(response)
            self.assertEqual(response.length, len(body))
            doc = json.loads(body)
            if "resource" in doc:
                self.assertEqual(doc["resource"], f"{PUBLIC}/mcp")
                self.assertEqual(doc["authorization_servers"], [PUBLIC, "http://127.0.0.1:9/other-as"])
                self.assertEqual(doc["resource_documentation"], f"see http://127.0.0.1:{up}/docs")
            else:
                self.assertEqual(doc["issuer"], PUBLIC)
                self.assertEqual(doc["authorization_endpoint"], f"{PUBLIC}/authorize?x=1")
                self.assertEqual(doc["token_endpoint"], f"{PUBLIC}/token")
                self.assertEqual(doc["registration_endpoint"], f"{PUBLIC}/register")
                self.assertEqual(doc["jwks_uri"], "https://keys.example.com/jwks")

    async def test_oauth_in_direct_mode_points_at_the_gateway(self):
        await self.start()
        doc = json.loads(await readBody(await self.request(self.direct, b"GET",
                                                           "/.well-known/oauth-protected-resource")))
        self.assertEqual(doc["resource"], f"http://127.0.0.1:{self.direct}/mcp")

    async def test_www_authenticate_and_location_are_rewritten(self):
        await self.start()
        response = await self.request(self.tunnel, b"GET", "/private")
        await readBody(response)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"),
                         [f'Bearer error="invalid_token", resource_metadata="{PUBLIC}'
                          f'/.well-known/oauth-protected-resource/mcp"'.encode()])
        response = await self.request(self.tunnel, b"GET", "/authorize")
        await readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [f"{PUBLIC}/login?next=%2F".encode()])
