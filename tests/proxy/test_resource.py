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
from mcpr.gateway.tap import build_site
from mcpr.proxy.events import EventLog
from mcpr.proxy.forward import Forwarder
from mcpr.proxy.resource import ProxyResource
from mcpr.proxy.routing import Upstream
from tests.support.collect import Collect
from tests.support.loopback import TrackingSite, client_agent, listen, track


class FakeUpstream(Resource):
    """An upstream whose every path shows one proxying behaviour.

    `holding` fires with the first request it holds open (an SSE stream or a
    hang), `left` with the first held request whose client went away.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []
        self.streams: list = []
        self.gone: list = []
        self.hanging: list = []
        self.broken: list = []
        self.holding: Deferred = Deferred()
        self.left: Deferred = Deferred()

    def render(self, request):
        self.seen.append(request)
        path = request.path
        if request.method == b"GET" and b"text/event-stream" in (request.getHeader(b"accept") or b""):
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b": open\n\n")
            return self._hold(request, self.streams)
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
            return self._hold(request, self.hanging)
        if path == b"/broken":
            # The test breaks the connection off once "partial" reached the client.
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"partial")
            self.broken.append(request)
            return NOT_DONE_YET
        body = request.content.read()
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "length": len(body),
        }).encode()

    def _hold(self, request, into: list):
        into.append(request)
        request.notifyFinish().addErrback(self._lost, request)
        if not self.holding.called:
            self.holding.callback(request)
        return NOT_DONE_YET

    def _lost(self, _reason, request) -> None:
        self.gone.append(request)
        if not self.left.called:
            self.left.callback(request)

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
            return self._hold(request, self.hanging)
        if message["method"] == "tools/call" and message["params"]["name"] == "fail":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"jsonrpc": "2.0", "id": message["id"],
                               "error": {"code": -32602, "message": "no such tool"}}).encode()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message}}).encode()


class EventSink:
    """Where the gateway's events go in these tests: kept parsed, and awaitable by type."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._waiting: list[tuple[str, int, Deferred]] = []

    def write(self, line: str) -> None:
        self.events.append(json.loads(line))
        for waiting in list(self._waiting):
            kind, count, d = waiting
            if self.count(kind) >= count:
                self._waiting.remove(waiting)
                d.callback(None)

    def flush(self) -> None:
        pass

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e["type"] == kind)

    def written(self, kind: str, count: int = 1) -> Deferred:
        """Fires once `count` events of `kind` were written, at once if they already were."""
        d: Deferred = Deferred()
        if self.count(kind) >= count:
            d.callback(None)
        else:
            self._waiting.append((kind, count, d))
        return d


class ProxyTests(TestCase):
    """ProxyResource forwarding, streaming, failures, limits and sessions, on loopback."""

    timeout = 20

    async def start(self, mcp: str | None = None, **cli) -> None:
        self.upstream = FakeUpstream()
        self.up_port = await listen(self, TrackingSite(self.upstream))
        self.sink = EventSink()
        self.resource, self.port = await self.gateway(mcp or f"http://127.0.0.1:{self.up_port}/mcp",
                                                      EventLog(self.sink), **cli)
        self.agent = client_agent(self)

    async def gateway(self, mcp: str, events: EventLog, **cli) -> tuple[ProxyResource, int]:
        """The proxy core for `--mcp mcp`, served on a port of its own the way `twist mcpr` serves it."""
        cwd = Path(self.mktemp())
        cwd.mkdir()
        settings = load_gateway({"mcp": mcp, **cli}, env={}, cwd=cwd)
        forwarder = Forwarder(reactor, headers_timeout=settings.upstream_timeout)
        self.addCleanup(forwarder.close)
        resource = ProxyResource(reactor, Upstream.parse(settings.mcp), forwarder, events)
        return resource, await listen(self, track(build_site(resource, settings)))

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.port}{path}".encode()

    async def request(self, method: bytes, path: str, body: bytes | None = None,
                      headers: dict | None = None):
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        h = Headers({k.encode(): [v.encode()] if isinstance(v, str) else [x.encode() for x in v]
                     for k, v in (headers or {}).items()})
        return await self.agent.request(method, self.url(path), h, producer)

    def events(self) -> list[dict]:
        return self.sink.events

    def requests(self) -> list[dict]:
        return [e for e in self.events() if e["type"] == "request"]

    def rpc(self, method: str, id=1, **params) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode()

    async def test_jsonrpc_post_goes_to_mcp_url_whatever_the_path(self):
        await self.start()
        response = await self.request(b"POST", "/anything?x=1", self.rpc("tools/call", name="add"),
                                      {"content-type": "application/json"})
        self.assertEqual(response.code, 200)
        answer = json.loads(await readBody(response))
        self.assertEqual(answer["result"]["echo"]["params"]["name"], "add")
        self.assertEqual(self.upstream.seen[-1].uri, b"/mcp?x=1")
        (event,) = self.requests()
        self.assertEqual((event["mcp_method"], event["tool"], event["status"], event["route"]),
                         ("tools/call", "add", 200, "mcp"))
        self.assertGreater(event["bytes_out"], 0)
        self.assertIsNotNone(event["upstream_ms"])

    async def test_large_json_post_goes_to_mcp_url_unparsed(self):
        await self.start()
        body = self.rpc("tools/call", name="add", pad="x" * (1 << 20))
        response = await self.request(b"POST", "/anything", body, {"content-type": "application/json; charset=utf-8"})
        self.assertEqual(json.loads(await readBody(response))["result"]["echo"]["params"]["name"], "add")
        self.assertEqual(self.upstream.seen[-1].uri, b"/mcp")
        response = await self.request(b"POST", "/anything", body, {"content-type": "text/plain"})
        self.assertEqual(json.loads(await readBody(response))["uri"], "/anything")
        self.assertEqual([(e["route"], e["mcp_method"], e["bytes_in"]) for e in self.requests()],
                         [("mcp", None, len(body)), ("passthrough", None, len(body))])

    async def test_passthrough_keeps_path_and_query_and_forwards_headers(self):
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

    async def test_repeated_and_auth_headers_pass(self):
        await self.start()
        response = await self.request(b"GET", "/cookies")
        await readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1; Path=/", b"b=2; Path=/"])
        self.assertTrue(response.headers.hasHeader(b"www-authenticate"))

    async def test_redirects_returned_not_followed_and_no_decoding(self):
        await self.start()
        response = await self.request(b"GET", "/redirect")
        await readBody(response)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/elsewhere"])
        response = await self.request(b"GET", "/gzip", headers={"accept-encoding": "gzip"})
        self.assertEqual(await readBody(response), b"\x1f\x8b not really gzip")
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])

    async def test_sse_events_arrive_one_by_one(self):
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

    async def test_client_disconnect_cancels_upstream_stream(self):
        await self.start()
        response = await self.request(b"GET", "/sse", headers={"accept": "text/event-stream"})
        collect = Collect()
        first = collect.next_chunk()
        response.deliverBody(collect)
        await first
        reported = self.sink.written("request")
        collect.transport.stopProducing()
        await self.upstream.left
        self.assertEqual(self.upstream.gone, self.upstream.streams)
        await reported
        (event,) = self.requests()
        self.assertEqual((event["route"], event["outcome"]), ("mcp-stream", "ok"))
        self.assertEqual(self.resource.in_flight, 0)

    async def test_client_disconnect_while_waiting_cancels_upstream_request(self):
        await self.start()
        pending = Deferred.fromCoroutine(self.request(b"GET", "/hang"))
        await self.upstream.holding
        reported = self.sink.written("request")
        pending.cancel()
        await self.upstream.left
        self.assertEqual(self.upstream.gone, self.upstream.hanging)
        self.failureResultOf(pending)
        await reported
        (event,) = self.requests()
        self.assertEqual((event["outcome"], event["status"]), ("client-gone", None))
        self.assertEqual(self.resource.in_flight, 0)

    async def test_upstream_broken_mid_body_is_not_a_clean_end(self):
        await self.start()
        response = await self.request(b"GET", "/broken")
        collect = Collect()
        first = collect.next_chunk()
        response.deliverBody(collect)
        self.assertEqual(await first, b"partial")
        self.upstream.broken[0].channel.transport.abortConnection()
        await collect.done
        reason = collect.reason
        self.assertFalse(reason.check(ResponseDone))
        self.assertEqual(b"".join(collect.chunks), b"partial")
        await self.sink.written("request")
        self.assertEqual(self.requests()[0]["outcome"], "upstream-broke")

    async def test_headers_timeout_is_504_jsonrpc_error(self):
        await self.start(upstream_timeout="0.3")
        response = await self.request(b"POST", "/mcp", self.rpc("tools/call", id=7, name="slow"),
                                      {"content-type": "application/json"})
        self.assertEqual(response.code, 504)
        body = json.loads(await readBody(response))
        self.assertEqual(body["id"], 7)
        self.assertEqual(body["error"]["code"], -32001)
        self.assertIn("timed out", body["error"]["message"])

    async def test_unreachable_upstream_is_502_with_request_id(self):
        await self.start(mcp="http://127.0.0.1:1/mcp")
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

    async def test_body_over_cap_is_413(self):
        await self.start(max_request_body="1KiB")
        response = await self.request(b"POST", "/mcp", b"x" * 2048, {"content-type": "application/json"})
        self.assertEqual(response.code, 413)
        body = json.loads(await readBody(response))
        self.assertEqual(body["error"]["code"], -32600)
        self.assertEqual(self.upstream.seen, [])
        response = await self.request(b"POST", "/mcp", self.rpc("ping"), {"content-type": "application/json"})
        self.assertEqual(response.code, 200)

    async def test_malformed_json_passes_through(self):
        await self.start()
        response = await self.request(b"POST", "/echo", b"{not json", {"content-type": "application/json"})
        seen = json.loads(await readBody(response))
        self.assertEqual((seen["uri"], seen["length"]), ("/echo", 9))

    async def test_large_upload_streams_from_spool(self):
        await self.start()
        body = b"y" * (3 << 20)
        response = await self.request(b"PUT", "/upload", body)
        seen = json.loads(await readBody(response))
        self.assertEqual(seen["length"], len(body))

    async def test_sessions_tracked_from_initialize_to_delete(self):
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
        calls = self.requests()
        self.assertEqual([e["session_id"] for e in calls], ["sess-1"] * 3)
        self.assertEqual(calls[1]["error_code"], -32602)
        self.assertEqual(calls[1]["client_name"], "tester")
        self.assertEqual(calls[2]["route"], "session-delete")

    async def test_healthz_reports_upstream(self):
        await self.start()
        response = await self.request(b"GET", "/healthz")
        body = json.loads(await readBody(response))
        self.assertEqual(response.code, 200)
        self.assertEqual(body["status"], "ok")
        self.assertNotIn("reason", body)
        self.assertTrue(body["upstream"]["reachable"])
        _, port = await self.gateway("http://127.0.0.1:1/mcp", EventLog(None))
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{port}/healthz".encode())
        body = json.loads(await readBody(response))
        self.assertEqual(response.code, 200)  # the gateway works; its upstream does not
        self.assertEqual((body["status"], body["reason"]),
                         ("degraded", "upstream http://127.0.0.1:1/mcp unreachable: connection refused"))
        self.assertFalse(body["upstream"]["reachable"])
        self.assertEqual(body["upstream"]["error"], "connection refused")
