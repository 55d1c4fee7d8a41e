"""What a response needs (OAuth header moves, a body rewriter, Content-Length kept), decided without a connection."""

from __future__ import annotations

import json
from dataclasses import dataclass

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mcpr.proxy import jsonrpc
from mcpr.proxy.rewrite import streaming
from mcpr.proxy.rewrite.csp import CspPolicy
from mcpr.proxy.rewrite.plan import Plan, plan
from mcpr.proxy.rewrite.streaming import EventStreamRewriter, JsonRewriter
from mcpr.proxy.routing import Kind, Route, Upstream

UPSTREAM = Upstream.parse("http://127.0.0.1:9000/mcp")
PUBLIC = "https://abc.tunnel.example.com"
WIDGET = "ui://widget/greeting.html"
META = {"openai/widgetCSP": {"connect_domains": ["http://localhost:9000"]}}


@dataclass
class Head:
    """The part of an upstream `IResponse` a plan is made from: its head, no body."""

    code: int
    headers: Headers
    length: int | object = UNKNOWN_LENGTH


def head(code: int = 200, length: int | object = 10, **headers: str) -> Head:
    return Head(code, Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()}), length)


def request(method: bytes = b"POST", path: bytes = b"/mcp") -> Request:
    """A request as twisted.web hands it to the resource, on a channel that is not connected anywhere."""
    channel = HTTPChannel()
    channel.site = Site(Resource())
    channel.timeOut = None  # no idle timer on the global reactor
    channel.makeConnection(StringTransport())
    req = Request(channel)
    req.method, req.uri, req.path = method, path, path
    req.requestHeaders.setRawHeaders(b"host", [b"gw.example:8080"])
    return req


def mcp(*messages: dict) -> Route:
    body = json.dumps(messages[0] if len(messages) == 1 else list(messages)).encode()
    return Route(Kind.MCP_POST, UPSTREAM.mcp_url(b"/mcp"), jsonrpc.parse(body))


def call(method: str, id=1, **params) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


def decide(rt: Route, response: Head, req: Request | None = None, *, origin: str | None = PUBLIC,
           htmls=None, csp: CspPolicy | None = None) -> Plan:
    return plan(rt, req or request(), response, origin=origin, htmls=htmls or {}, csp=csp or CspPolicy(),
                upstream=UPSTREAM)


def rewritten(changes: Plan, body: dict) -> tuple[dict, Headers]:
    """`body` through the plan's rewriter, as JSON, with the headers it set."""
    out: list[bytes] = []
    headers = Headers()
    rewriter = changes.rewriter(out.append, headers)
    assert rewriter is not None
    rewriter.feed(json.dumps(body).encode())
    rewriter.finish()
    return json.loads(b"".join(out)), headers


class PassThroughTests(SynchronousTestCase):
    """The plan for non-MCP answers: what streams untouched, and the OAuth rewrites."""

    def test_an_ordinary_answer_streams_untouched_with_its_length(self) -> None:
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000/page")
        changes = decide(rt, head(content_type="application/json"), request(b"GET", b"/page"))
        self.assertEqual(changes, Plan(content_length=10))
        self.assertIsNone(changes.rewriter(lambda _: None, Headers()))
        headers = Headers()
        changes.rewrite_headers(headers)
        self.assertEqual(headers.getRawHeaders(b"content-length"), [b"10"])

    def test_no_length_where_the_body_is_absent_or_unknown(self) -> None:
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000/page")
        for method, response in ((b"HEAD", head()), (b"GET", head(204)), (b"GET", head(304)),
                                 (b"GET", head(length=UNKNOWN_LENGTH))):
            self.assertIsNone(decide(rt, response, request(method, b"/page")).content_length, (method, response))

    def test_oauth_challenge_moves_to_the_public_origin(self) -> None:
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000/private")
        response = head(401, www_authenticate='Bearer resource_metadata="http://localhost:9000/.well-known/x"')
        changes = decide(rt, response, request(b"GET", b"/private"))
        self.assertIsNotNone(changes.origins)
        self.assertIsNone(changes.transform)
        changes.rewrite_headers(response.headers)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"),
                         [f'Bearer resource_metadata="{PUBLIC}/.well-known/x"'.encode()])
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"10"])

    def test_redirect_moves_to_the_public_origin(self) -> None:
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000/authorize")
        response = head(302, location="http://127.0.0.1:9000/login")
        changes = decide(rt, response, request(b"GET", b"/authorize"))
        changes.rewrite_headers(response.headers)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [f"{PUBLIC}/login".encode()])

    def test_discovery_document_is_rewritten_and_loses_its_length(self) -> None:
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000/.well-known/oauth-protected-resource")
        get = request(b"GET", b"/.well-known/oauth-protected-resource")
        changes = decide(rt, head(content_type="application/json"), get)
        self.assertIsNone(changes.content_length)
        doc, headers = rewritten(changes, {"resource": "http://127.0.0.1:9000/mcp"})
        self.assertEqual(doc, {"resource": f"{PUBLIC}/mcp"})
        self.assertEqual(headers.getRawHeaders(b"content-length"), [b"%d" % len(json.dumps(doc, separators=(",", ":")))])

    def test_discovery_in_direct_mode_points_at_the_host_the_client_used(self) -> None:
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000/.well-known/oauth-authorization-server")
        get = request(b"GET", b"/.well-known/oauth-authorization-server")
        doc, _ = rewritten(decide(rt, head(content_type="application/json"), get, origin=None),
                           {"issuer": "http://localhost:9000"})
        self.assertEqual(doc, {"issuer": "http://gw.example:8080"})

    def test_discovery_body_is_left_alone_unless_a_plain_json_200_to_a_get(self) -> None:
        path = b"/.well-known/openid-configuration"
        rt = Route(Kind.PASSTHROUGH, b"http://127.0.0.1:9000" + path)
        for method, response in ((b"POST", head(content_type="application/json")),
                                 (b"GET", head(404, content_type="application/json")),
                                 (b"GET", head(content_type="text/html")),
                                 (b"GET", head(content_type="application/json", content_encoding="gzip"))):
            changes = decide(rt, response, request(method, path))
            self.assertIsNone(changes.transform, (method, response))
            self.assertEqual(changes.content_length, 10)


class McpAnswerTests(SynchronousTestCase):
    """The plan for MCP answers: when widget metadata is rewritten, as JSON or event by event."""

    def answer(self, result: dict, id=1) -> dict:
        return {"jsonrpc": "2.0", "id": id, "result": result}

    def test_widget_metadata_through_the_tunnel_is_rewritten_as_json(self) -> None:
        changes = decide(mcp(call("tools/list")), head(content_type="application/json"))
        self.assertEqual((changes.event_stream, changes.content_length, changes.origins), (False, None, None))
        self.assertIsInstance(changes.rewriter(lambda _: None, Headers()), JsonRewriter)
        answer, _ = rewritten(changes, self.answer({"tools": [{"name": "t", "_meta": dict(META)}]}))
        csp = answer["result"]["tools"][0]["_meta"]["openai/widgetCSP"]
        self.assertEqual(csp["connect_domains"], [PUBLIC])

    def test_an_sse_answer_is_rewritten_event_by_event(self) -> None:
        changes = decide(mcp(call("tools/list")), head(content_type="text/event-stream", length=UNKNOWN_LENGTH))
        self.assertTrue(changes.event_stream)
        self.assertIsInstance(changes.rewriter(lambda _: None, Headers()), EventStreamRewriter)

    def test_an_sse_stream_is_flagged_even_when_nothing_is_rewritten(self) -> None:
        changes = decide(mcp(call("ping")), head(content_type="text/event-stream", length=UNKNOWN_LENGTH))
        self.assertEqual(changes, Plan(event_stream=True))

    def test_methods_without_widget_metadata_stream_untouched(self) -> None:
        for method in ("ping", "initialize", "prompts/get"):
            changes = decide(mcp(call(method)), head(content_type="application/json"))
            self.assertEqual(changes, Plan(content_length=10), method)

    def parses(self) -> list[bytes | str]:
        """What the rewriters parse from now on."""
        parsed: list[bytes | str] = []
        real = streaming.loads_or_none

        def counted(text: bytes | str):
            parsed.append(text)
            return real(text)

        self.patch(streaming, "loads_or_none", counted)
        return parsed

    def test_a_tools_call_answer_without_metadata_passes_unparsed(self) -> None:
        body = b'{"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "3"}]}}'
        for content_type in ("application/json", "text/event-stream"):
            parsed = self.parses()
            changes = decide(mcp(call("tools/call")), head(content_type=content_type))
            out: list[bytes] = []
            rewriter = changes.rewriter(out.append, Headers())
            assert rewriter is not None
            sent = body if content_type == "application/json" else b"event: message\ndata: " + body + b"\n\n"
            rewriter.feed(sent)
            rewriter.finish()
            self.assertEqual((b"".join(out), parsed), (sent, []), content_type)

    def test_a_tools_call_answer_with_metadata_or_a_widget_resource_is_still_rewritten(self) -> None:
        meta = self.answer({"content": [], "_meta": dict(META)})
        answer, _ = rewritten(decide(mcp(call("tools/call")), head(content_type="application/json")), meta)
        self.assertIn("https://abc.tunnel.example.com", answer["result"]["_meta"]["openai/widgetCSP"]["connect_domains"])
        embedded = self.answer({"content": [{"type": "resource", "resource": {
            "uri": WIDGET, "mimeType": "text/html+skybridge", "text": "<p>hi</p>"}}]})
        answer, _ = rewritten(decide(mcp(call("tools/call")), head(content_type="application/json")), embedded)
        self.assertIn("_meta", answer["result"]["content"][0]["resource"])

    def test_metadata_named_with_an_escape_is_still_found(self) -> None:
        parsed = self.parses()
        changes = decide(mcp(call("tools/call")), head(content_type="application/json"))
        out: list[bytes] = []
        headers = Headers()
        rewriter = changes.rewriter(out.append, headers)
        assert rewriter is not None
        rewriter.feed(b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"_m\\u0065ta":'
                      + json.dumps(META).encode() + b"}}")
        rewriter.finish()
        self.assertEqual(len(parsed), 1)
        self.assertIn("https://abc.tunnel.example.com", b"".join(out).decode())

    def test_direct_mode_without_a_csp_setting_has_nothing_to_do(self) -> None:
        changes = decide(mcp(call("tools/list")), head(content_type="application/json"), origin=None)
        self.assertEqual(changes, Plan(content_length=10))

    def test_a_csp_setting_applies_in_direct_mode(self) -> None:
        policy = CspPolicy(domains=("https://fonts.example.org",))
        changes = decide(mcp(call("tools/list")), head(content_type="application/json"), origin=None, csp=policy)
        answer, _ = rewritten(changes, self.answer({"tools": [{"name": "t", "_meta": dict(META)}]}))
        csp = answer["result"]["tools"][0]["_meta"]["openai/widgetCSP"]
        self.assertIn("https://fonts.example.org", csp["connect_domains"])

    def test_local_html_replaces_the_upstreams_in_direct_mode(self) -> None:
        changes = decide(mcp(call("resources/read", id=4, uri=WIDGET)), head(content_type="application/json"),
                         origin=None, htmls={4: (WIDGET, "<p>local</p>")})
        answer, _ = rewritten(changes, self.answer({"contents": [{"uri": WIDGET, "text": "<p>up</p>"}]}, id=4))
        self.assertEqual(answer["result"]["contents"][0]["text"], "<p>local</p>")

    def test_only_a_plain_json_or_sse_200_is_rewritten(self) -> None:
        for response in (head(500, content_type="application/json"), head(content_type="text/plain"),
                         head(content_type="application/json", content_encoding="br"), head()):
            changes = decide(mcp(call("tools/list")), response)
            self.assertIsNone(changes.transform, response)
            self.assertEqual(changes.content_length, 10)

    def test_a_json_suffix_media_type_counts_as_json(self) -> None:
        changes = decide(mcp(call("tools/list")), head(content_type="application/vnd.mcp+json; charset=utf-8"))
        self.assertIsInstance(changes.rewriter(lambda _: None, Headers()), JsonRewriter)

    def test_a_batch_is_rewritten_only_in_its_widget_answers(self) -> None:
        changes = decide(mcp(call("tools/list", id=1), call("ping", id=2)), head(content_type="application/json"))
        tools = {"tools": [{"name": "t", "_meta": dict(META)}]}
        out: list[bytes] = []
        rewriter = changes.rewriter(out.append, Headers())
        rewriter.feed(json.dumps([self.answer(tools, 1), self.answer(dict(tools), 2)]).encode())
        rewriter.finish()
        first, second = json.loads(b"".join(out))
        self.assertEqual(first["result"]["tools"][0]["_meta"]["openai/widgetCSP"]["connect_domains"], [PUBLIC])
        self.assertEqual(second["result"], tools)
