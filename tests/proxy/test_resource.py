"""The proxy core against a real upstream and a real client on loopback."""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, ResponseDone, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mcpr.gateway.settings import load_gateway
from mcpr.gateway.tap import build_resource, build_site
from tests.support.collect import Collect
from tests.support.loopback import TrackingSite, client_agent, listen, sleep, track


class FakeUpstream(Resource):
    """An upstream whose every path shows one proxying behaviour."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []
        self.streams: list = []
        self.gone: list = []
        self.hanging: list = []

    def render(self, request):
        self.seen.append(request)
        path = request.path
        if request.method == b"GET" and b"text/event-stream" in (request.getHeader(b"accept") or b""):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b": open\n\n")
            self.streams.append(request)
            request.notifyFinish().addErrback(lambda f: self.gone.append(request))
            return NOT_DONE_YET
        if path == b"/mcp":
            return self._mcp(request)
        if path == b"/cookies":
            request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1; Path=/", b"b=2; Path=/"])
            request.setHeader(b"www-authenticate", b'Bearer resource_metadata="http://up/.well-known/x"')
            return b"ok"
        if path == b"/redirect":
            request.redirect(b"/elsewhere")
            return b""
        if path == b"/gzip":
            request.setHeader(b"content-encoding", b"gzip")
            return b"\x1f\x8b not really gzip"
        if path == b"/hang":
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda f: self.gone.append(request))
            return NOT_DONE_YET
        if path == b"/broken":
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"partial")
            reactor.callLater(0.05, request.channel.transport.abortConnection)
            return NOT_DONE_YET
        body = request.content.read()
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "length": len(body),
        }).encode()

    def _mcp(self, request):
        if request.method == b"DELETE":
            return b""
        message = json.loads(request.content.read())
        if isinstance(message, list):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps([{"jsonrpc": "2.0", "id": m["id"], "result": {}} for m in message if "id" in m]).encode()
        if "id" not in message:
            request.setResponseCode(202)
            return b""
        if message["method"] == "initialize":
            request.setHeader(b"mcp-session-id", b"sess-1")
            request.setHeader(b"content-type", b"text/event-stream")
            result = {"protocolVersion": "2025-11-25", "serverInfo": {"name": "fake", "version": "9"},
                      "capabilities": {}}
            event = {"jsonrpc": "2.0", "id": message["id"], "result": result}
            return b"event: message\ndata: " + json.dumps(event).encode() + b"\n\n"
        if message["method"] == "tools/call" and message["params"]["name"] == "slow":
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda f: self.gone.append(request))
            return NOT_DONE_YET
        if message["method"] == "tools/call" and message["params"]["name"] == "fail":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"jsonrpc": "2.0", "id": message["id"],
                               "error": {"code": -32602, "message": "no such tool"}}).encode()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message}}).encode()


class ProxyTests(TestCase):
    timeout = 20

    async def start(self, **cli) -> None:
        self.upstream = FakeUpstream()
        up_port = await listen(self, TrackingSite(self.upstream))
        self.events_path = Path(self.mktemp())
        cwd = Path(self.mktemp())
        cwd.mkdir()
        settings = load_gateway({"mcp": f"http://127.0.0.1:{up_port}/mcp", "events": str(self.events_path),
                                 **cli}, env={}, cwd=cwd)
        self.resource = build_resource(settings, reactor)
        self.addCleanup(self.resource.forwarder.close)
        self.addCleanup(self.resource.events.close)
        site = track(build_site(self.resource, settings))
        self.port = await listen(self, site)
        self.agent = client_agent(self)
        self.up_port = up_port

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.port}{path}".encode()

    async def request(self, method: bytes, path: str, body: bytes | None = None,
                      headers: dict | None = None):
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        h = Headers({k.encode(): [v.encode()] if isinstance(v, str) else [x.encode() for x in v]
                     for k, v in (headers or {}).items()})
        return await self.agent.request(method, self.url(path), h, producer)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def rpc(self, method: str, id=1, **params) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode()

    def test_jsonrpc_post_goes_to_mcp_url_whatever_the_path(self):
        async def t():
            await self.start()
            response = await self.request(b"POST", "/anything?x=1", self.rpc("tools/call", name="add"),
                                          {"content-type": "application/json"})
            self.assertEqual(response.code, 200)
            answer = json.loads(await readBody(response))
            self.assertEqual(answer["result"]["echo"]["params"]["name"], "add")
            self.assertEqual(self.upstream.seen[-1].uri, b"/mcp?x=1")
            (event,) = [e for e in self.events() if e["type"] == "request"]
            self.assertEqual((event["mcp_method"], event["tool"], event["status"], event["route"]),
                             ("tools/call", "add", 200, "mcp"))
            self.assertGreater(event["bytes_out"], 0)
            self.assertIsNotNone(event["upstream_ms"])
        return Deferred.fromCoroutine(t())

    def test_passthrough_keeps_path_and_query_and_forwards_headers(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/.well-known/oauth-protected-resource?a=b", None,
                                          {"authorization": "Bearer t", "x-forwarded-for": "10.0.0.9",
                                           "connection": "keep-alive, x-drop", "x-drop": "1",
                                           "te": "trailers", "mcp-protocol-version": "2025-11-25",
                                           "last-event-id": "42"})
            raw = await readBody(response)
            self.assertEqual(response.length, len(raw), "a body of known length went out chunked")
            seen = json.loads(raw)
            self.assertEqual(seen["uri"], "/.well-known/oauth-protected-resource?a=b")
            h = seen["headers"]
            self.assertEqual(h["host"], [f"127.0.0.1:{self.up_port}"])
            self.assertEqual(h["authorization"], ["Bearer t"])
            self.assertEqual(h["x-forwarded-for"], ["10.0.0.9, 127.0.0.1"])
            self.assertEqual(h["x-forwarded-host"], [f"127.0.0.1:{self.port}"])
            self.assertEqual(h["x-forwarded-proto"], ["http"])
            self.assertEqual(h["mcp-protocol-version"], ["2025-11-25"])
            self.assertEqual(h["last-event-id"], ["42"])
            for hop in ("x-drop", "te"):
                self.assertNotIn(hop, h)
        return Deferred.fromCoroutine(t())

    def test_repeated_and_auth_headers_pass(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/cookies")
            await readBody(response)
            self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1; Path=/", b"b=2; Path=/"])
            self.assertTrue(response.headers.hasHeader(b"www-authenticate"))
        return Deferred.fromCoroutine(t())

    def test_redirects_returned_not_followed_and_no_decoding(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/redirect")
            await readBody(response)
            self.assertEqual(response.code, 302)
            self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/elsewhere"])
            response = await self.request(b"GET", "/gzip", headers={"accept-encoding": "gzip"})
            self.assertEqual(await readBody(response), b"\x1f\x8b not really gzip")
            self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        return Deferred.fromCoroutine(t())

    def test_sse_events_arrive_one_by_one(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/sse", headers={"accept": "text/event-stream"})
            self.assertEqual(response.code, 200)
            collect = Collect()
            first = collect.next_chunk()
            response.deliverBody(collect)
            self.assertEqual(await first, b": open\n\n")
            stream = self.upstream.streams[0]
            for i in range(3):
                arrived = collect.next_chunk()
                stream.write(f"id: {i}\ndata: event {i}\n\n".encode())
                self.assertEqual(await arrived, f"id: {i}\ndata: event {i}\n\n".encode())
            stream.finish()
            await collect.done
            reason = collect.reason
            self.assertTrue(reason.check(ResponseDone))
        return Deferred.fromCoroutine(t())

    def test_client_disconnect_cancels_upstream_stream(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/sse", headers={"accept": "text/event-stream"})
            collect = Collect()
            first = collect.next_chunk()
            response.deliverBody(collect)
            await first
            collect.transport.stopProducing()
            for _ in range(100):
                if self.upstream.gone:
                    break
                await sleep(0.02)
            self.assertEqual(self.upstream.gone, self.upstream.streams)
            for _ in range(100):
                if self.resource.in_flight == 0:
                    break
                await sleep(0.02)
            (event,) = [e for e in self.events() if e["type"] == "request"]
            self.assertEqual((event["route"], event["outcome"]), ("mcp-stream", "ok"))
        return Deferred.fromCoroutine(t())

    def test_client_disconnect_while_waiting_cancels_upstream_request(self):
        async def t():
            await self.start()
            d = self.request(b"GET", "/hang")
            pending = Deferred.fromCoroutine(d)
            for _ in range(100):
                if self.upstream.hanging:
                    break
                await sleep(0.02)
            pending.cancel()
            for _ in range(100):
                if self.upstream.gone:
                    break
                await sleep(0.02)
            self.assertEqual(self.upstream.gone, self.upstream.hanging)
            self.failureResultOf(pending)
            for _ in range(100):
                if self.resource.in_flight == 0:
                    break
                await sleep(0.02)
            (event,) = [e for e in self.events() if e["type"] == "request"]
            self.assertEqual((event["outcome"], event["status"]), ("client-gone", None))
        return Deferred.fromCoroutine(t())

    def test_upstream_broken_mid_body_is_not_a_clean_end(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/broken")
            collect = Collect()
            response.deliverBody(collect)
            await collect.done
            reason = collect.reason
            self.assertFalse(reason.check(ResponseDone))
            self.assertEqual(b"".join(collect.chunks), b"partial")
        return Deferred.fromCoroutine(t())

    def test_headers_timeout_is_504_jsonrpc_error(self):
        async def t():
            await self.start(upstream_timeout="0.3")
            response = await self.request(b"POST", "/mcp", self.rpc("tools/call", id=7, name="slow"),
                                          {"content-type": "application/json"})
            self.assertEqual(response.code, 504)
            body = json.loads(await readBody(response))
            self.assertEqual(body["id"], 7)
            self.assertEqual(body["error"]["code"], -32001)
            self.assertIn("timed out", body["error"]["message"])
        return Deferred.fromCoroutine(t())

    def test_unreachable_upstream_is_502_with_request_id(self):
        async def t():
            await self.start()
            self.resource.upstream = type(self.resource.upstream).parse("http://127.0.0.1:1/mcp")
            batch = json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                {"jsonrpc": "2.0", "id": "b", "method": "ping"},
                                {"jsonrpc": "2.0", "method": "notifications/x"}]).encode()
            response = await self.request(b"POST", "/mcp", batch, {"content-type": "application/json"})
            self.assertEqual(response.code, 502)
            body = json.loads(await readBody(response))
            self.assertEqual([e["id"] for e in body], [1, "b"])
            self.assertIn("connection refused", body[0]["error"]["message"])
            response = await self.request(b"GET", "/page")
            self.assertEqual(response.code, 502)
            self.assertIn(b"127.0.0.1:1", await readBody(response))
        return Deferred.fromCoroutine(t())

    def test_body_over_cap_is_413(self):
        async def t():
            await self.start(max_request_body="1KiB")
            response = await self.request(b"POST", "/mcp", b"x" * 2048, {"content-type": "application/json"})
            self.assertEqual(response.code, 413)
            body = json.loads(await readBody(response))
            self.assertEqual(body["error"]["code"], -32600)
            self.assertEqual(self.upstream.seen, [])
            response = await self.request(b"POST", "/mcp", self.rpc("ping"), {"content-type": "application/json"})
            self.assertEqual(response.code, 200)
        return Deferred.fromCoroutine(t())

    def test_malformed_json_passes_through(self):
        async def t():
            await self.start()
            response = await self.request(b"POST", "/echo", b"{not json", {"content-type": "application/json"})
            seen = json.loads(await readBody(response))
            self.assertEqual((seen["uri"], seen["length"]), ("/echo", 9))
        return Deferred.fromCoroutine(t())

    def test_large_upload_streams_from_spool(self):
        async def t():
            await self.start()
            body = b"y" * (3 << 20)
            response = await self.request(b"PUT", "/upload", body)
            seen = json.loads(await readBody(response))
            self.assertEqual(seen["length"], len(body))
        return Deferred.fromCoroutine(t())

    def test_sessions_tracked_from_initialize_to_delete(self):
        async def t():
            await self.start()
            init = self.rpc("initialize", protocolVersion="2025-11-25", capabilities={},
                            clientInfo={"name": "tester", "version": "1.2"})
            response = await self.request(b"POST", "/mcp", init,
                                          {"content-type": "application/json",
                                           "accept": "application/json, text/event-stream"})
            await readBody(response)
            session = self.resource.sessions.get("sess-1")
            self.assertEqual((session.client_name, session.server_name), ("tester", "fake"))
            h = {"content-type": "application/json", "mcp-session-id": "sess-1"}
            response = await self.request(b"POST", "/mcp", self.rpc("tools/call", id=2, name="fail"), h)
            await readBody(response)
            response = await self.request(b"DELETE", "/mcp", None, {"mcp-session-id": "sess-1"})
            await readBody(response)
            self.assertIsNone(self.resource.sessions.get("sess-1"))
            events = self.events()
            sessions = [(e["state"], e["requests"]) for e in events if e["type"] == "session"]
            self.assertEqual(sessions, [("active", 1), ("ended", 3)])
            calls = [e for e in events if e["type"] == "request"]
            self.assertEqual([e["session_id"] for e in calls], ["sess-1"] * 3)
            self.assertEqual(calls[1]["error_code"], -32602)
            self.assertEqual(calls[1]["client_name"], "tester")
            self.assertEqual(calls[2]["route"], "session-delete")
        return Deferred.fromCoroutine(t())

    def test_healthz_reports_upstream(self):
        async def t():
            await self.start()
            response = await self.request(b"GET", "/healthz")
            body = json.loads(await readBody(response))
            self.assertEqual(response.code, 200)
            self.assertTrue(body["upstream"]["reachable"])
            self.resource.upstream = type(self.resource.upstream).parse("http://127.0.0.1:1/mcp")
            body = json.loads(await readBody(await self.request(b"GET", "/healthz")))
            self.assertFalse(body["upstream"]["reachable"])
            self.assertEqual(body["upstream"]["error"], "connection refused")
        return Deferred.fromCoroutine(t())

